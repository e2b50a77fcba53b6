//! Message journeys: the messaging spans of one message, across traces, services
//! and attempts. A journey starts at a publication and follows what continued it:
//! process spans that have the publication as parent or link, forward spans (retry
//! and dead-letter publications, which link the original publication and the failed
//! attempt), the process spans of those, and so on. Any instrumentation's spans
//! take part: a consumer span continuing a producer span is a hop whoever made it.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use mqtrace_testing::{format_micros, AttrValue, Kind, RecordedSpan, SpanStatus};

/// The link attribute mqtrace's forward spans carry.
pub(crate) const RELATIONSHIP: &str = "mqtrace.link.relationship";

/// What a span is in a message's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// A publication (send, or create in a batch).
    Send,
    /// A re-publication to a retry or dead-letter destination, linking the
    /// original publication and the failed attempt.
    Forward,
    /// Processing one message.
    Process,
    /// Processing a batch (per-message spans below it are the hops).
    Batch,
    /// A receive or poll call.
    Receive,
    /// Any other messaging span (settle calls, batch sends).
    OtherMessaging,
    /// Not a messaging span.
    Other,
}

impl Role {
    /// The hop a journey shows for this role.
    pub(crate) fn hop_name(self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::Process => "process",
            _ => "send",
        }
    }
}

/// How a span points at another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    Parent,
    Link,
}

fn is_messaging(span: &RecordedSpan) -> bool {
    [
        "messaging.system.name",
        "messaging.system",
        "messaging.operation.type",
        "messaging.operation",
    ]
    .iter()
    .any(|k| span.attributes.contains_key(*k))
}

fn operation(span: &RecordedSpan) -> &str {
    span.attr("messaging.operation.type")
        .or_else(|| span.attr("messaging.operation"))
        .and_then(AttrValue::as_str)
        .unwrap_or("")
}

fn role_of(span: &RecordedSpan) -> Role {
    if !is_messaging(span) {
        return Role::Other;
    }
    let batch = span
        .attributes
        .contains_key("messaging.batch.message_count");
    match span.kind {
        Kind::Producer => {
            if span
                .links
                .iter()
                .any(|l| l.attributes.contains_key(RELATIONSHIP))
            {
                Role::Forward
            } else {
                Role::Send
            }
        }
        Kind::Consumer if batch => Role::Batch,
        Kind::Consumer => match operation(span) {
            "receive" => Role::Receive,
            _ => Role::Process,
        },
        _ => match operation(span) {
            "receive" | "poll" => Role::Receive,
            _ => Role::OtherMessaging,
        },
    }
}

/// The spans of a capture, indexed (borrowed, never copied).
#[derive(Debug)]
pub(crate) struct Index<'a> {
    pub(crate) spans: Vec<&'a RecordedSpan>,
    by_id: HashMap<&'a str, usize>,
    roles: Vec<Role>,
}

impl<'a> Index<'a> {
    pub(crate) fn new(spans: impl IntoIterator<Item = &'a RecordedSpan>) -> Self {
        let spans: Vec<&'a RecordedSpan> = spans.into_iter().collect();
        Self {
            by_id: spans
                .iter()
                .enumerate()
                .map(|(i, s)| (s.span_id.as_str(), i))
                .collect(),
            roles: spans.iter().map(|s| role_of(s)).collect(),
            spans,
        }
    }

    pub(crate) fn role(&self, i: usize) -> Role {
        self.roles[i]
    }

    pub(crate) fn find(&self, span_id: &str) -> Option<usize> {
        self.by_id.get(span_id).copied()
    }

    /// The contexts a span continues: its parent, then its links, as span ids.
    pub(crate) fn contexts(&self, i: usize) -> impl Iterator<Item = (&'a str, Via)> + '_ {
        let span: &'a RecordedSpan = self.spans[i];
        span.parent_span_id
            .as_deref()
            .map(|p| (p, Via::Parent))
            .into_iter()
            .chain(span.links.iter().map(|l| (l.span_id.as_str(), Via::Link)))
    }

    /// The publication a process span continues (parent first, then links), and how.
    pub(crate) fn producer_of(&self, i: usize) -> Option<(usize, Via)> {
        self.contexts(i).find_map(|(id, via)| {
            let j = self.find(id)?;
            matches!(self.roles[j], Role::Send | Role::Forward).then_some((j, via))
        })
    }

    /// The attempt a process span is, when its instrumentation says.
    pub(crate) fn attempt(&self, i: usize) -> Option<i64> {
        let span = &self.spans[i];
        span.attr("mqtrace.message.attempt")
            .or_else(|| span.attr("mqtrace.aws_sqs.receive_count"))
            .and_then(AttrValue::as_i64)
    }

    /// Seconds between publication and the start of processing: mqtrace's own
    /// attribute (from the broker's timestamp), else from the start of the producer
    /// span when it is in the capture.
    pub(crate) fn queue_time(&self, i: usize) -> Option<f64> {
        let span = &self.spans[i];
        if let Some(AttrValue::Double(q)) = span.attr("mqtrace.message.queue_time") {
            return Some(*q);
        }
        let (p, _) = self.producer_of(i)?;
        let produced = self.spans[p].start_unix_nano;
        let nanos = i128::from(span.start_unix_nano) - i128::from(produced);
        Some(nanos as f64 / 1e9)
    }
}

/// Where a messaging span sends to or consumes from.
pub(crate) fn destination(span: &RecordedSpan) -> String {
    span.attr("messaging.destination.template")
        .or_else(|| span.attr("messaging.destination.name"))
        .and_then(AttrValue::as_str)
        .map_or_else(|| "(unnamed)".to_owned(), str::to_owned)
}

pub(crate) fn disposition(span: &RecordedSpan) -> Option<&str> {
    span.attr("mqtrace.message.disposition")
        .and_then(AttrValue::as_str)
}

pub(crate) fn error_of(span: &RecordedSpan) -> Option<String> {
    match &span.status {
        SpanStatus::Error(message) => Some(
            span.attr("error.type")
                .and_then(AttrValue::as_str)
                .map_or_else(|| message.clone(), str::to_owned),
        ),
        _ => None,
    }
}

/// One message's hops, in start order.
#[derive(Debug, Clone)]
pub(crate) struct Journey {
    pub(crate) hops: Vec<usize>,
}

fn root(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

fn join(parent: &mut [usize], a: usize, b: usize) {
    let (a, b) = (root(parent, a), root(parent, b));
    if a != b {
        parent[a.max(b)] = a.min(b);
    }
}

/// The journeys of the capture, ordered by their first hop.
pub(crate) fn journeys(index: &Index<'_>) -> Vec<Journey> {
    let n = index.spans.len();
    let mut parent: Vec<usize> = (0..n).collect();
    for i in 0..n {
        match index.role(i) {
            Role::Process => {
                if let Some((p, _)) = index.producer_of(i) {
                    join(&mut parent, i, p);
                }
            }
            Role::Forward => {
                for (id, _) in index.contexts(i).collect::<Vec<_>>() {
                    if let Some(j) = index.find(id) {
                        if matches!(index.role(j), Role::Send | Role::Forward | Role::Process) {
                            join(&mut parent, i, j);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in 0..n {
        if matches!(index.role(i), Role::Send | Role::Forward | Role::Process) {
            groups.entry(root(&mut parent, i)).or_default().push(i);
        }
    }
    let mut out: Vec<Journey> = groups
        .into_values()
        .map(|mut hops| {
            hops.sort_by_key(|&i| (index.spans[i].start_unix_nano, i));
            Journey { hops }
        })
        .collect();
    out.sort_by_key(|j| j.hops.first().map(|&i| (index.spans[i].start_unix_nano, i)));
    out
}

impl Journey {
    /// What became of the message: the last attempt's disposition, else
    /// `processed` / `failed`, else `not consumed`.
    pub(crate) fn outcome<'s>(&self, index: &'s Index<'_>) -> &'s str {
        let Some(&last) = self
            .hops
            .iter()
            .rev()
            .find(|&&i| index.role(i) == Role::Process)
        else {
            return "not consumed";
        };
        let span = &index.spans[last];
        disposition(span).unwrap_or(if error_of(span).is_some() {
            "failed"
        } else {
            "processed"
        })
    }

    /// The message id of its first publication, when it has one.
    pub(crate) fn message_id<'s>(&self, index: &'s Index<'_>) -> Option<&'s str> {
        self.hops
            .iter()
            .map(|&i| &index.spans[i])
            .find(|s| s.kind == Kind::Producer)
            .and_then(|s| s.attr("messaging.message.id"))
            .and_then(AttrValue::as_str)
    }

    pub(crate) fn attempts(&self, index: &Index<'_>) -> usize {
        self.hops
            .iter()
            .filter(|&&i| index.role(i) == Role::Process)
            .count()
    }

    pub(crate) fn traces(&self, index: &Index<'_>) -> usize {
        let mut ids: Vec<&str> = self
            .hops
            .iter()
            .map(|&i| index.spans[i].trace_id.as_str())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }

    /// The first publication's destination.
    pub(crate) fn destination(&self, index: &Index<'_>) -> String {
        self.hops
            .first()
            .map_or_else(String::new, |&i| destination(index.spans[i]))
    }
}

fn seconds(s: f64) -> String {
    if s < 0.0 {
        return format!("-{}", seconds(-s));
    }
    format_micros((s * 1e6).round() as u64)
}

/// Renders a journey: a header, then one line per hop.
pub(crate) fn render(
    journey: &Journey,
    number: usize,
    index: &Index<'_>,
    trace_number: &dyn Fn(&str) -> usize,
    timings: bool,
) -> String {
    let mut out = format!("journey #{number} · {}", journey.destination(index));
    if let Some(id) = journey.message_id(index) {
        let _ = write!(out, " · message {id:?}");
    }
    let attempts = journey.attempts(index);
    let traces = journey.traces(index);
    let _ = writeln!(
        out,
        " · {attempts} attempt{} · {traces} trace{} · {}",
        if attempts == 1 { "" } else { "s" },
        if traces == 1 { "" } else { "s" },
        journey.outcome(index),
    );
    for &i in &journey.hops {
        let span = &index.spans[i];
        let what = index.role(i).hop_name();
        let _ = write!(
            out,
            "  {what:<8} {:<24} {:<16} trace #{}",
            destination(span),
            span.service,
            trace_number(&span.trace_id)
        );
        if index.role(i) == Role::Process {
            if let Some(attempt) = index.attempt(i) {
                let _ = write!(out, "  attempt {attempt}");
            }
            if index.producer_of(i).is_none() {
                out.push_str("  (publication not found)");
            }
            if timings {
                if let Some(q) = index.queue_time(i) {
                    let _ = write!(out, "  queued {}", seconds(q));
                }
                let _ = write!(out, "  took {}", format_micros(span.duration_micros()));
            }
            if let Some(error) = error_of(span) {
                let _ = write!(out, "  ERROR {error}");
            }
            if let Some(d) = disposition(span) {
                let _ = write!(out, "  → {d}");
            }
        }
        out.push('\n');
    }
    out
}

/// Figures of one destination's processing.
#[derive(Debug, Default)]
pub(crate) struct DestinationSummary {
    pub(crate) messages: usize,
    pub(crate) attempts: usize,
    pub(crate) failures: usize,
    pub(crate) process: Vec<u64>,
    pub(crate) queue: Vec<f64>,
}

/// Per destination of process spans: messages (journeys), attempts, failures,
/// process and queue times.
pub(crate) fn summaries(
    index: &Index<'_>,
    journeys: &[Journey],
) -> BTreeMap<String, DestinationSummary> {
    let mut out: BTreeMap<String, DestinationSummary> = BTreeMap::new();
    for journey in journeys {
        let mut seen: Vec<String> = Vec::new();
        for &i in &journey.hops {
            if index.role(i) != Role::Process {
                continue;
            }
            let span = &index.spans[i];
            let dest = destination(span);
            let summary = out.entry(dest.clone()).or_default();
            if !seen.contains(&dest) {
                summary.messages += 1;
                seen.push(dest);
            }
            summary.attempts += 1;
            if error_of(span).is_some() {
                summary.failures += 1;
            }
            summary.process.push(span.duration_micros());
            if let Some(q) = index.queue_time(i) {
                summary.queue.push(q);
            }
        }
    }
    out
}

/// The nearest-rank quantile `q` of `values` (sorted here).
fn quantile<T: Copy + PartialOrd>(values: &mut [T], q: f64) -> Option<T> {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if values.is_empty() {
        return None;
    }
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values.get(rank - 1).copied()
}

/// One line per destination.
pub(crate) fn render_summaries(
    summaries: &mut BTreeMap<String, DestinationSummary>,
    timings: bool,
) -> String {
    let mut out = String::new();
    for (dest, s) in summaries.iter_mut() {
        let _ = write!(
            out,
            "{dest}: {} message{}, {} attempt{}, {} failed",
            s.messages,
            if s.messages == 1 { "" } else { "s" },
            s.attempts,
            if s.attempts == 1 { "" } else { "s" },
            s.failures
        );
        if timings {
            if let (Some(p50), Some(p99)) = (
                quantile(&mut s.process, 0.5),
                quantile(&mut s.process, 0.99),
            ) {
                let _ = write!(
                    out,
                    ", process p50 {} p99 {}",
                    format_micros(p50),
                    format_micros(p99)
                );
            }
            if let (Some(p50), Some(p99)) =
                (quantile(&mut s.queue, 0.5), quantile(&mut s.queue, 0.99))
            {
                let _ = write!(out, ", queued p50 {} p99 {}", seconds(p50), seconds(p99));
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
pub(crate) mod fixture {
    //! Spans built by hand, as other instrumentations and broken set-ups make them.
    use std::collections::BTreeMap;

    use mqtrace_testing::{AttrValue, Kind, RecordedLink, RecordedSpan, SpanStatus};

    /// A capture under construction; span ids are `s{n}` padded, trace ids `t{n}`.
    #[derive(Debug, Default)]
    pub(crate) struct Spans {
        pub(crate) spans: Vec<RecordedSpan>,
    }

    pub(crate) const MS: u64 = 1_000_000;
    /// 2026-12-01, in nanoseconds since the epoch.
    pub(crate) const T0: u64 = 1_796_083_200_000_000_000;

    impl Spans {
        /// Adds a span and returns its id.
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn add(
            &mut self,
            service: &str,
            trace: &str,
            parent: Option<&str>,
            kind: Kind,
            name: &str,
            start_ms: u64,
            attributes: &[(&str, AttrValue)],
        ) -> String {
            let id = format!("{:016x}", self.spans.len() + 1);
            let (operation, dest) = name.split_once(' ').unwrap_or((name, ""));
            let mut attrs: BTreeMap<String, AttrValue> = BTreeMap::new();
            if kind != Kind::Internal {
                attrs.insert(
                    "messaging.system.name".into(),
                    AttrValue::Str("rabbitmq".into()),
                );
                attrs.insert(
                    "messaging.operation.type".into(),
                    AttrValue::Str(operation.into()),
                );
                attrs.insert(
                    "messaging.destination.name".into(),
                    AttrValue::Str(dest.into()),
                );
            }
            for (k, v) in attributes {
                attrs.insert((*k).to_owned(), v.clone());
            }
            self.spans.push(RecordedSpan {
                service: service.to_owned(),
                trace_id: format!("{trace:0>32}"),
                span_id: id.clone(),
                parent_span_id: parent.map(str::to_owned),
                name: name.to_owned(),
                kind,
                start_unix_nano: T0 + start_ms * MS,
                end_unix_nano: T0 + (start_ms + 1) * MS,
                attributes: attrs,
                events: Vec::new(),
                links: Vec::new(),
                status: SpanStatus::Unset,
            });
            id
        }

        pub(crate) fn link(&mut self, from: &str, to: &str, relationship: Option<&str>) {
            let trace_id = self
                .spans
                .iter()
                .find(|s| s.span_id == to)
                .map_or_else(|| "f".repeat(32), |s| s.trace_id.clone());
            self.link_to(from, &trace_id, to, relationship);
        }

        pub(crate) fn link_to(
            &mut self,
            from: &str,
            trace_id: &str,
            to: &str,
            relationship: Option<&str>,
        ) {
            let mut attributes = BTreeMap::new();
            if let Some(r) = relationship {
                attributes.insert(super::RELATIONSHIP.to_owned(), AttrValue::Str(r.into()));
            }
            if let Some(span) = self.spans.iter_mut().find(|s| s.span_id == from) {
                span.links.push(RecordedLink {
                    trace_id: trace_id.to_owned(),
                    span_id: to.to_owned(),
                    attributes,
                });
            }
        }

        pub(crate) fn fail(&mut self, id: &str, error_type: &str) {
            if let Some(span) = self.spans.iter_mut().find(|s| s.span_id == id) {
                span.status = SpanStatus::Error(error_type.to_owned());
                span.attributes
                    .insert("error.type".into(), AttrValue::Str(error_type.into()));
            }
        }

        /// A message sent by `shop` and processed by `worker`: parent and link, as
        /// mqtrace does by default. Returns (send, process).
        pub(crate) fn healthy(&mut self, trace: &str, at_ms: u64) -> (String, String) {
            let send = self.add(
                "shop",
                trace,
                None,
                Kind::Producer,
                "send orders",
                at_ms,
                &[],
            );
            let process = self.add(
                "worker",
                trace,
                Some(&send),
                Kind::Consumer,
                "process orders",
                at_ms + 2,
                &[
                    ("mqtrace.message.attempt", AttrValue::Int(1)),
                    (
                        "mqtrace.message.disposition",
                        AttrValue::Str("settled".into()),
                    ),
                ],
            );
            self.link(&process, &send, None);
            (send, process)
        }

        /// A message retried once through a forward, then settled:
        /// (send, process 1, forward, process 2).
        pub(crate) fn retried(&mut self, trace: &str, at_ms: u64) -> [String; 4] {
            let (send, first) = self.healthy(trace, at_ms);
            self.fail(&first, "timeout");
            self.set(
                &first,
                "mqtrace.message.disposition",
                AttrValue::Str("retried".into()),
            );
            let forward = self.add(
                "worker",
                trace,
                Some(&first),
                Kind::Producer,
                "send orders.retry",
                at_ms + 3,
                &[],
            );
            self.link(&forward, &send, Some("original_message"));
            self.link(&forward, &first, Some("processing_attempt"));
            let second = self.add(
                "worker",
                trace,
                Some(&forward),
                Kind::Consumer,
                "process orders.retry",
                at_ms + 5,
                &[
                    ("mqtrace.message.attempt", AttrValue::Int(2)),
                    (
                        "mqtrace.message.disposition",
                        AttrValue::Str("settled".into()),
                    ),
                ],
            );
            self.link(&second, &forward, None);
            [send, first, forward, second]
        }

        pub(crate) fn set(&mut self, id: &str, key: &str, value: AttrValue) {
            if let Some(span) = self.spans.iter_mut().find(|s| s.span_id == id) {
                span.attributes.insert(key.to_owned(), value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::fixture::Spans;
    use super::*;

    fn numbers(id: &str) -> usize {
        id.trim_start_matches('0').parse().unwrap_or(0)
    }

    #[test]
    fn a_retried_message_is_one_journey_across_its_attempts() {
        let mut c = Spans::default();
        c.healthy("1", 0);
        c.retried("2", 10);
        let index = Index::new(&c.spans);
        let journeys = journeys(&index);
        assert_eq!(journeys.len(), 2);
        let text = render(&journeys[1], 2, &index, &numbers, false);
        assert_eq!(
            text,
            "journey #2 · orders · 2 attempts · 1 trace · settled\n\
             \x20 send     orders                   shop             trace #2\n\
             \x20 process  orders                   worker           trace #2  attempt 1  ERROR timeout  → retried\n\
             \x20 forward  orders.retry             worker           trace #2\n\
             \x20 process  orders.retry             worker           trace #2  attempt 2  → settled\n"
        );
        let mut sums = summaries(&index, &journeys);
        assert_eq!(
            render_summaries(&mut sums, true),
            "orders: 2 messages, 2 attempts, 1 failed, process p50 1.0ms p99 1.0ms, queued p50 2.0ms p99 2.0ms\n\
             orders.retry: 1 message, 1 attempt, 0 failed, process p50 1.0ms p99 1.0ms, queued p50 2.0ms p99 2.0ms\n"
        );
    }

    #[test]
    fn a_downstream_publication_in_a_handler_starts_its_own_journey() {
        let mut c = Spans::default();
        let (_, process) = c.healthy("1", 0);
        c.add(
            "worker",
            "1",
            Some(&process),
            Kind::Producer,
            "send shipments",
            1,
            &[],
        );
        let index = Index::new(&c.spans);
        let journeys = journeys(&index);
        assert_eq!(journeys.len(), 2);
        assert_eq!(journeys[1].outcome(&index), "not consumed");
        assert_eq!(journeys[1].destination(&index), "shipments");
    }

    #[test]
    fn a_link_only_consumer_in_another_trace_joins_the_journey() {
        let mut c = Spans::default();
        let send = c.add("shop", "1", None, Kind::Producer, "send orders", 0, &[]);
        let process = c.add(
            "worker",
            "2",
            None,
            Kind::Consumer,
            "process orders",
            3,
            &[],
        );
        c.link(&process, &send, None);
        let index = Index::new(&c.spans);
        let journeys = journeys(&index);
        assert_eq!(journeys.len(), 1);
        assert_eq!(journeys[0].traces(&index), 2);
        assert_eq!(journeys[0].outcome(&index), "processed");
        // No mqtrace attribute: queue time from the producer span's end.
        assert_eq!(index.queue_time(1), Some(0.003));
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let mut v = vec![5, 1, 4, 2, 3];
        assert_eq!(quantile(&mut v, 0.5), Some(3));
        assert_eq!(quantile(&mut v, 0.99), Some(5));
        assert_eq!(quantile::<u64>(&mut [], 0.5), None);
    }
}
