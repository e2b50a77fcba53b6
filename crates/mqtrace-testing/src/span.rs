//! Spans as received over OTLP, and their rendering as normalised trees: names, kinds,
//! parents, links, attributes and status, with ids and timestamps left out so a test
//! can compare a whole trace to the text it expects.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};

/// A span kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// INTERNAL (and unspecified).
    Internal,
    /// SERVER.
    Server,
    /// CLIENT.
    Client,
    /// PRODUCER.
    Producer,
    /// CONSUMER.
    Consumer,
}

impl Kind {
    /// From the OTLP enum value.
    pub fn from_otlp(kind: i32) -> Self {
        match kind {
            2 => Self::Server,
            3 => Self::Client,
            4 => Self::Producer,
            5 => Self::Consumer,
            _ => Self::Internal,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Internal => "INTERNAL",
            Self::Server => "SERVER",
            Self::Client => "CLIENT",
            Self::Producer => "PRODUCER",
            Self::Consumer => "CONSUMER",
        })
    }
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    /// A string.
    Str(String),
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A double.
    Double(f64),
    /// Arrays, maps, bytes: their debug form.
    Other(String),
}

impl AttrValue {
    /// The string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if it is one.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Self::Int(i) => Some(*i),
            _ => None,
        }
    }
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Str(s) => write!(f, "{s:?}"),
            Self::Bool(b) => write!(f, "{b}"),
            Self::Int(i) => write!(f, "{i}"),
            Self::Double(d) => write!(f, "{d}"),
            Self::Other(o) => f.write_str(o),
        }
    }
}

/// Span status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpanStatus {
    /// Not set.
    Unset,
    /// Ok.
    Ok,
    /// Error, with its description.
    Error(String),
}

/// A span event.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    /// Event name.
    pub name: String,
    /// Event attributes.
    pub attributes: BTreeMap<String, AttrValue>,
}

/// A span link.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedLink {
    /// Linked trace id (hex).
    pub trace_id: String,
    /// Linked span id (hex).
    pub span_id: String,
    /// Link attributes.
    pub attributes: BTreeMap<String, AttrValue>,
}

/// A span as received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedSpan {
    /// The resource's `service.name`.
    pub service: String,
    /// Trace id (hex).
    pub trace_id: String,
    /// Span id (hex).
    pub span_id: String,
    /// Parent span id (hex), if any.
    pub parent_span_id: Option<String>,
    /// Span name.
    pub name: String,
    /// Span kind.
    pub kind: Kind,
    /// Start time.
    pub start_unix_nano: u64,
    /// End time.
    pub end_unix_nano: u64,
    /// Attributes.
    pub attributes: BTreeMap<String, AttrValue>,
    /// Events.
    pub events: Vec<RecordedEvent>,
    /// Links.
    pub links: Vec<RecordedLink>,
    /// Status.
    pub status: SpanStatus,
}

impl RecordedSpan {
    /// An attribute.
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        self.attributes.get(key)
    }

    /// Duration in microseconds.
    pub fn duration_micros(&self) -> u64 {
        self.end_unix_nano.saturating_sub(self.start_unix_nano) / 1_000
    }
}

/// How a tree is rendered.
#[derive(Debug, Clone, Default)]
pub struct TreeOptions {
    /// Show only these attribute keys (`None`: all of them).
    pub only: Option<Vec<String>>,
    /// Never show these attribute keys.
    pub hide: Vec<String>,
    /// Show these keys with `*` instead of their value (present, but varying).
    pub mask: Vec<String>,
    /// Show each span's service.
    pub services: bool,
    /// Show durations (not for comparisons).
    pub durations: bool,
    /// Show events (exceptions).
    pub events: bool,
}

impl TreeOptions {
    /// Everything but durations, with the attributes that vary between runs
    /// (`mqtrace.message.queue_time`) masked.
    pub fn normalised() -> Self {
        Self {
            mask: vec!["mqtrace.message.queue_time".to_owned()],
            events: true,
            ..Self::default()
        }
    }

    /// Only these attributes (none for an empty list): the tree's shape.
    pub fn only(keys: &[&str]) -> Self {
        Self {
            only: Some(keys.iter().map(|k| (*k).to_owned()).collect()),
            ..Self::default()
        }
    }
}

/// Spans grouped by trace, traces ordered by start time.
#[derive(Debug, Clone)]
pub struct Forest {
    traces: Vec<Vec<RecordedSpan>>,
    /// The number each trace is shown with (from 1, in order, unless renumbered).
    numbers: Vec<usize>,
}

impl Forest {
    /// Groups spans by trace.
    pub fn new(mut spans: Vec<RecordedSpan>) -> Self {
        spans.sort_by(|a, b| (a.start_unix_nano, &a.name).cmp(&(b.start_unix_nano, &b.name)));
        let mut order: Vec<String> = Vec::new();
        let mut by_trace: HashMap<String, Vec<RecordedSpan>> = HashMap::new();
        for span in spans {
            if !by_trace.contains_key(&span.trace_id) {
                order.push(span.trace_id.clone());
            }
            by_trace
                .entry(span.trace_id.clone())
                .or_default()
                .push(span);
        }
        let traces: Vec<Vec<RecordedSpan>> = order
            .into_iter()
            .filter_map(|id| by_trace.remove(&id))
            .collect();
        let numbers = (1..=traces.len()).collect();
        Self { traces, numbers }
    }

    /// Shows each trace with the number `number` gives its trace id (a viewer that
    /// numbers traces as they arrive keeps its numbers across renderings).
    pub fn renumber(&mut self, number: impl Fn(&str) -> usize) {
        self.numbers = self
            .traces
            .iter()
            .map(|spans| spans.first().map_or(0, |s| number(&s.trace_id)))
            .collect();
    }

    /// The index of the trace with this id.
    pub fn position(&self, trace_id: &str) -> Option<usize> {
        self.traces
            .iter()
            .position(|spans| spans.first().is_some_and(|s| s.trace_id == trace_id))
    }

    /// The traces, each a list of spans ordered by start time.
    pub fn traces(&self) -> &[Vec<RecordedSpan>] {
        &self.traces
    }

    /// Renders every trace.
    pub fn render(&self, options: &TreeOptions) -> String {
        let mut out = String::new();
        for i in 0..self.traces.len() {
            out.push_str(&self.render_trace(i, options));
        }
        out
    }

    /// Renders one trace: a header line `trace #N`, then the tree. Spans whose parent
    /// is not in the trace are roots marked `(parent missing)`.
    pub fn render_trace(&self, index: usize, options: &TreeOptions) -> String {
        let Some(spans) = self.traces.get(index) else {
            return String::new();
        };
        let ids: HashMap<&str, &RecordedSpan> =
            spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
        let number = self.numbers.get(index).copied().unwrap_or(index + 1);
        let mut out = format!("trace #{number}\n");
        for root in spans.iter().filter(|s| {
            s.parent_span_id
                .as_deref()
                .is_none_or(|p| !ids.contains_key(p))
        }) {
            self.render_span(root, spans, options, "", &mut out);
        }
        out
    }

    fn render_span(
        &self,
        span: &RecordedSpan,
        trace: &[RecordedSpan],
        options: &TreeOptions,
        indent: &str,
        out: &mut String,
    ) {
        let _ = write!(out, "{indent}{} [{}]", span.name, span.kind);
        if options.services {
            let _ = write!(out, " ({})", span.service);
        }
        if options.durations {
            let _ = write!(out, " {}", format_micros(span.duration_micros()));
        }
        if span.parent_span_id.is_some()
            && !trace
                .iter()
                .any(|s| Some(&s.span_id) == span.parent_span_id.as_ref())
        {
            out.push_str(" (parent missing)");
        }
        if let SpanStatus::Error(message) = &span.status {
            let _ = write!(out, " ERROR({message:?})");
        }
        write_attributes(&span.attributes, options, out);
        out.push('\n');
        let inner = format!("{indent}    ");
        for link in &span.links {
            let _ = write!(
                out,
                "{inner}~> {}",
                self.describe_link(link, &span.trace_id)
            );
            write_attributes(&link.attributes, &TreeOptions::default(), out);
            out.push('\n');
        }
        if options.events {
            for event in &span.events {
                let _ = write!(out, "{inner}! {}", event.name);
                write_attributes(&event.attributes, &TreeOptions::default(), out);
                out.push('\n');
            }
        }
        for child in trace
            .iter()
            .filter(|s| s.parent_span_id.as_deref() == Some(span.span_id.as_str()))
        {
            self.render_span(child, trace, options, &inner, out);
        }
    }

    fn describe_link(&self, link: &RecordedLink, own_trace: &str) -> String {
        for (i, trace) in self.traces.iter().enumerate() {
            if let Some(target) = trace.iter().find(|s| s.span_id == link.span_id) {
                return if target.trace_id == own_trace {
                    format!("{} (this trace)", target.name)
                } else {
                    let number = self.numbers.get(i).copied().unwrap_or(i + 1);
                    format!("{} (trace #{number})", target.name)
                };
            }
        }
        "span not received".to_owned()
    }
}

fn write_attributes(
    attributes: &BTreeMap<String, AttrValue>,
    options: &TreeOptions,
    out: &mut String,
) {
    for (key, value) in attributes {
        let shown = options.only.as_ref().is_none_or(|only| only.contains(key));
        if !shown || options.hide.contains(key) {
            continue;
        }
        if options.mask.contains(key) {
            let _ = write!(out, " {key}=*");
        } else {
            let _ = write!(out, " {key}={value}");
        }
    }
}

/// A duration in µs, ms or s, as the trees show it.
pub fn format_micros(micros: u64) -> String {
    if micros >= 1_000_000 {
        format!("{:.2}s", micros as f64 / 1e6)
    } else if micros >= 1_000 {
        format!("{:.1}ms", micros as f64 / 1e3)
    } else {
        format!("{micros}µs")
    }
}
