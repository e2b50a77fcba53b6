//! `mqtrace doctor`: broken propagation in a capture, each finding with the spans
//! it is about, its likely cause and its fix.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use mqtrace_testing::{spans_of, AttrValue, RecordedSpan};

use crate::journey::{destination, disposition, journeys, Index, Role, Via, RELATIONSHIP};
use crate::receive::{listen, print, stopped, ListenArgs, ReceiveError};

/// Options of `mqtrace doctor`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  mqtrace demo --save run.jsonl && mqtrace doctor run.jsonl
  mqtrace doctor collector-output.jsonl --allow link_only_parenting
  mqtrace doctor --listen-for 2m        judge what services export to 127.0.0.1:4317/4318

Exit status: 0 when nothing is wrong, 1 with findings, 2 when the capture cannot be read.")]
pub(crate) struct DoctorArgs {
    /// A capture: OTLP JSON lines, as `mqtrace view --save`, `mqtrace demo --save`
    /// or the OpenTelemetry Collector's file exporter write them.
    #[arg(value_name = "CAPTURE", required_unless_present = "listen_for")]
    capture: Option<PathBuf>,
    /// Listen for OTLP this long instead (Ctrl-C ends it early), then judge.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION", conflicts_with = "capture")]
    listen_for: Option<Duration>,
    #[command(flatten)]
    listen: ListenArgs,
    /// While listening, spans kept to judge; later ones are counted, not kept.
    #[arg(long, default_value_t = 200_000, value_name = "N")]
    max_spans: usize,
    /// Publications this close to the end of the capture are not judged unconsumed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    grace: Duration,
    /// A failed attempt marked for retry is judged only when the capture goes on
    /// this long after it.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    retry_window: Duration,
    /// Do not report this check (repeatable).
    #[arg(long, value_name = "CHECK")]
    allow: Vec<Check>,
}

/// Judges the capture or what arrives, prints the report, returns the number of
/// findings.
pub(crate) async fn run(args: DoctorArgs) -> Result<usize, ReceiveError> {
    let spans = match &args.capture {
        Some(path) => crate::receive::capture::load(path)?.spans,
        None => {
            let (collector, mut requests) = listen(&args.listen).await?;
            print(&format!(
                "mqtrace doctor: listening for OTLP for {}: gRPC {}, HTTP {}/v1/traces\n",
                humantime::format_duration(args.listen_for.unwrap_or_default()),
                collector.grpc_endpoint(),
                collector.http_endpoint()
            ));
            let mut spans = Vec::new();
            let mut over = 0;
            let mut take = |request: &_| {
                let arrived = spans_of(request);
                let room = args.max_spans.saturating_sub(spans.len());
                over += arrived.len().saturating_sub(room);
                spans.extend(arrived.into_iter().take(room));
            };
            let stop = stopped(args.listen_for);
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    request = requests.recv() => match request {
                        Some(request) => take(&request),
                        None => break,
                    },
                    () = &mut stop => break,
                }
            }
            drop(collector);
            while let Ok(request) = requests.try_recv() {
                take(&request);
            }
            if over > 0 {
                print(&format!(
                    "mqtrace doctor: kept the first {} spans (--max-spans); {over} more arrived and are not judged\n",
                    args.max_spans
                ));
            }
            spans
        }
    };
    let options = Options {
        grace: args.grace,
        retry_window: args.retry_window,
        allow: args.allow,
    };
    let findings = diagnose(&spans, &options);
    print(&report(&spans, &findings));
    Ok(findings.len())
}

/// The checks, in the order they are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub(crate) enum Check {
    /// A consumer span with neither parent nor link, while its message's producer
    /// span is in the capture.
    ContextNotContinued,
    /// A consumer span continues an X-Ray trace no captured producer has, while the
    /// destination's producers inject W3C.
    XrayOnly,
    /// Parents or links of messaging spans that never arrived.
    MissingSpans,
    /// Producer spans that no consumer continued.
    NotConsumed,
    /// SQS publications whose trace context was left out for size.
    ContextOmitted,
    /// Attempts above 1 that continue a fresh publication with no link to the
    /// failed attempt.
    RetryWithoutForwardLink,
    /// Consumer spans that continue their producer by link only, starting a new
    /// trace.
    LinkOnlyParenting,
    /// Services whose spans run under messaging spans that never arrived, while
    /// sending none themselves.
    NoMessagingSpans,
    /// Processing that starts before its publication.
    NegativeQueueTime,
    /// Failed attempts marked for retry whose next attempt never came.
    RetryNeverArrived,
}

impl Check {
    /// The check's name, as `--allow` takes it (clap's value name, so the two
    /// cannot drift apart).
    pub(crate) fn code(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }

    fn cause(self) -> &'static str {
        match self {
            Self::ContextNotContinued => {
                "the consumer found no trace context in the message: the two sides use \
                 different propagators, a serializer or a bridge dropped the headers, or the \
                 consumer extracted from the current context instead of the message"
            }
            Self::XrayOnly => {
                "the consumer reads only AWSTraceHeader (X-Ray) while the producer writes only \
                 W3C traceparent"
            }
            Self::MissingSpans => {
                "the spans were never exported here: their service exports elsewhere, sampled \
                 them out, or stopped before flushing; or the capture started after them"
            }
            Self::NotConsumed => {
                "no consumer continued these messages: the consumer is not instrumented, is \
                 down, or ignores the message's context"
            }
            Self::ContextOmitted => {
                "the message was too close to SQS's size limit (or its 10 message \
                 attributes) for the trace context to fit, so consumers start new traces"
            }
            Self::RetryWithoutForwardLink => {
                "the retry was re-published as a new message: nothing links it to the failed \
                 attempt or the original publication"
            }
            Self::LinkOnlyParenting => {
                "the consumer uses link-only parenting: traces stay correct, but service graphs \
                 (Jaeger, Tempo, X-Ray) need a parent to draw the producer → consumer edge"
            }
            Self::NoMessagingSpans => {
                "the service's instrumenter exports nowhere: it is bound to a no-op tracer \
                 provider (built before the SDK was installed, or from another provider)"
            }
            Self::NegativeQueueTime => {
                "the producer's, broker's and consumer's clocks disagree (clock skew)"
            }
            Self::RetryNeverArrived => {
                "the failure was reported for retry but the broker never redelivered it: for \
                 Lambda, an event source mapping without ReportBatchItemFailures, which deletes \
                 the whole batch; elsewhere, a retry destination nobody consumes"
            }
        }
    }

    fn fix(self) -> &'static str {
        match self {
            Self::ContextNotContinued => {
                "use the same propagators on both sides (mqtrace-telemetry installs W3C trace \
                 context and baggage), carry the headers through every hop, and extract from \
                 the message (mqtrace's tracers do)"
            }
            Self::XrayOnly => {
                "inject both on the producer (mqtrace-aws-sqs adds X-Ray to W3C) or extract \
                 W3C on the consumer (mqtrace-aws-lambda reads both)"
            }
            Self::MissingSpans => {
                "point every service at this collector (OTEL_EXPORTER_OTLP_ENDPOINT), use a \
                 parent-based sampler, flush before exit (TelemetryGuard), capture longer"
            }
            Self::NotConsumed => {
                "instrument the consumer (DeliveryTracer, RecordTracer, MessageTracer or the \
                 adapters' consumers) and make sure it runs; if the capture ended first, \
                 capture longer"
            }
            Self::ContextOmitted => {
                "keep bodies under the limit with room for the context (about 1 KiB), or send \
                 large payloads by reference (an S3 pointer)"
            }
            Self::RetryWithoutForwardLink => {
                "re-publish through mqtrace's lifecycle (Instrumenter::settle with a retry \
                 route) so the forward span links both, or add those links yourself"
            }
            Self::LinkOnlyParenting => {
                "ProcessParenting::ParentAndLink (the default) keeps the link and adds the \
                 parent"
            }
            Self::NoMessagingSpans => {
                "build the instrumenter from the telemetry set-up (TelemetryGuard::instrumenter) \
                 or give it the exporting provider (InstrumenterBuilder::tracer_provider)"
            }
            Self::NegativeQueueTime => "synchronise the hosts' clocks (NTP, chrony)",
            Self::RetryNeverArrived => {
                "turn on ReportBatchItemFailures on the mapping (or \
                 partial_batch_responses(false) to fail the whole batch), or consume the \
                 retry destination"
            }
        }
    }
}

/// What the checks judge against.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// Producer spans ending this close to the end of the capture are not judged
    /// unconsumed (the consumer may not have got to them yet).
    pub(crate) grace: Duration,
    /// A retried attempt is judged only when the capture goes on this long after it.
    pub(crate) retry_window: Duration,
    pub(crate) allow: Vec<Check>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(10),
            retry_window: Duration::from_secs(60),
            allow: Vec::new(),
        }
    }
}

/// One finding: a check, what it is about, the spans.
#[derive(Debug, Clone)]
pub(crate) struct Finding {
    pub(crate) check: Check,
    pub(crate) summary: String,
    pub(crate) spans: Vec<usize>,
}

/// Runs every check not allowed in `options`.
pub(crate) fn diagnose(spans: &[RecordedSpan], options: &Options) -> Vec<Finding> {
    let index = Index::new(spans);
    let end = spans.iter().map(|s| s.end_unix_nano).max().unwrap_or(0);
    let mut groups: BTreeMap<(Check, String), Vec<usize>> = BTreeMap::new();
    let mut add = |check: Check, about: String, i: usize| {
        groups.entry((check, about)).or_default().push(i);
    };
    let continued = continued_producers(&index);
    let xray = xray_only(&index);
    let facts = Facts::new(&index);
    for (i, span) in spans.iter().enumerate() {
        let dest = destination(span);
        match index.role(i) {
            Role::Process => {
                if xray.contains(&i) {
                    add(Check::XrayOnly, format!("process spans on {dest}"), i);
                } else if not_continued(&index, &facts, i) {
                    add(
                        Check::ContextNotContinued,
                        format!("process spans on {dest}"),
                        i,
                    );
                }
                if retry_without_forward(&index, &facts, i) {
                    add(
                        Check::RetryWithoutForwardLink,
                        format!("attempts on {dest}"),
                        i,
                    );
                }
                if link_only(&index, i) {
                    add(
                        Check::LinkOnlyParenting,
                        format!("process spans of {} on {dest}", span.service),
                        i,
                    );
                }
                if clock_skew(&index, i) {
                    add(
                        Check::NegativeQueueTime,
                        format!("process spans on {dest}"),
                        i,
                    );
                }
                if disposition(span) == Some("retried")
                    && end.saturating_sub(span.end_unix_nano) >= nanos(options.retry_window)
                    && !retried_later(&index, &facts, i)
                {
                    add(Check::RetryNeverArrived, format!("attempts on {dest}"), i);
                }
            }
            Role::Send | Role::Forward => {
                if span
                    .attributes
                    .contains_key("mqtrace.aws_sqs.context_omitted")
                {
                    add(Check::ContextOmitted, format!("publications to {dest}"), i);
                }
                if !continued.contains(span.span_id.as_str())
                    && !dead_letter(&index, i)
                    && end.saturating_sub(span.end_unix_nano) >= nanos(options.grace)
                {
                    add(Check::NotConsumed, format!("publications to {dest}"), i);
                }
            }
            _ => {}
        }
        if index.role(i) != Role::Other && !xray.contains(&i) && missing(&index, i) {
            add(
                Check::MissingSpans,
                format!("{} spans of {}", span.name, span.service),
                i,
            );
        }
    }
    for (service, members) in silent_services(&index) {
        groups.insert(
            (
                Check::NoMessagingSpans,
                format!("spans of {service} with a parent that never arrived"),
            ),
            members,
        );
    }
    groups
        .into_iter()
        .filter(|((check, _), _)| !options.allow.contains(check))
        .map(|((check, about), spans)| Finding {
            summary: format!("{} {about}", spans.len()),
            check,
            spans,
        })
        .collect()
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Span ids of producer spans some consumer-side span continues.
fn continued_producers<'a>(index: &Index<'a>) -> HashSet<&'a str> {
    let mut out = HashSet::new();
    for i in 0..index.spans.len() {
        if matches!(index.role(i), Role::Process | Role::Batch | Role::Receive) {
            for (id, _) in index.contexts(i) {
                out.insert(id);
            }
        }
    }
    out
}

/// A forward to a dead-letter destination: nobody is expected to consume it.
fn dead_letter(index: &Index<'_>, i: usize) -> bool {
    index.role(i) == Role::Forward
        && (disposition(index.spans[i]) == Some("dead_lettered")
            || index.spans[i].links.iter().any(|l| {
                l.attributes.get(RELATIONSHIP).and_then(AttrValue::as_str)
                    == Some("processing_attempt")
                    && index
                        .find(&l.span_id)
                        .is_some_and(|j| disposition(index.spans[j]) == Some("dead_lettered"))
            }))
}

/// The identity of a message as its spans carry it: message id, or Kafka's
/// partition and offset.
fn identity(span: &RecordedSpan) -> Option<(String, String)> {
    let dest = destination(span);
    if let Some(id) = span
        .attr("messaging.message.id")
        .and_then(AttrValue::as_str)
    {
        return Some((dest, format!("id {id}")));
    }
    let offset = [
        "kafka.offset",
        "messaging.kafka.offset",
        "messaging.kafka.message.offset",
    ]
    .iter()
    .find_map(|k| span.attr(k).and_then(AttrValue::as_i64))?;
    let partition = span
        .attr("messaging.destination.partition.id")
        .map(ToString::to_string)
        .unwrap_or_default();
    Some((dest, format!("partition {partition} offset {offset}")))
}

/// A process span with neither parent nor link to a publication, nor any link,
/// whose message's publication is in the capture.
fn not_continued(index: &Index<'_>, facts: &Facts, i: usize) -> bool {
    let span = &index.spans[i];
    if !span.links.is_empty() || index.producer_of(i).is_some() {
        return false;
    }
    // A parent that never arrived is the missing-spans check's.
    if span
        .parent_span_id
        .as_deref()
        .is_some_and(|p| index.find(p).is_none())
    {
        return false;
    }
    identity(span).is_some_and(|id| facts.published.contains(&id))
}

/// What the checks look up, built once per capture so that each check is linear.
#[derive(Debug, Default)]
struct Facts {
    /// The identities of the publications.
    published: HashSet<(String, String)>,
    /// Process spans per publication they continue.
    by_producer: HashMap<usize, Vec<usize>>,
    /// Process spans per message identity.
    by_identity: HashMap<(String, String), Vec<usize>>,
    /// Forward spans per span they continue (the failed attempt among them).
    forwards_of: HashMap<usize, Vec<usize>>,
}

impl Facts {
    fn new(index: &Index<'_>) -> Self {
        let mut facts = Self::default();
        for i in 0..index.spans.len() {
            match index.role(i) {
                Role::Send | Role::Forward => {
                    if let Some(id) = identity(index.spans[i]) {
                        facts.published.insert(id);
                    }
                    if index.role(i) == Role::Forward {
                        for (c, _) in index.contexts(i) {
                            if let Some(j) = index.find(c) {
                                facts.forwards_of.entry(j).or_default().push(i);
                            }
                        }
                    }
                }
                Role::Process => {
                    if let Some((p, _)) = index.producer_of(i) {
                        facts.by_producer.entry(p).or_default().push(i);
                    }
                    if let Some(id) = identity(index.spans[i]) {
                        facts.by_identity.entry(id).or_default().push(i);
                    }
                }
                _ => {}
            }
        }
        facts
    }

    fn processes_of(&self, producer: usize) -> &[usize] {
        self.by_producer.get(&producer).map_or(&[], Vec::as_slice)
    }
}

/// Whether a trace id looks made by X-Ray: its first 8 hex digits are the epoch
/// seconds of its start, here within a day of `around` (nanoseconds).
fn xray_shaped(trace_id: &str, around: u64) -> bool {
    let Some(prefix) = trace_id.get(..8) else {
        return false;
    };
    let Ok(seconds) = u64::from_str_radix(prefix, 16) else {
        return false;
    };
    (seconds * 1_000_000_000).abs_diff(around) < 86_400 * 1_000_000_000
}

/// Process spans whose contexts are all missing, at least one in an X-Ray-shaped
/// trace, on destinations whose captured producers' traces are not.
fn xray_only(index: &Index<'_>) -> HashSet<usize> {
    let mut w3c_destinations = HashSet::new();
    for (i, span) in index.spans.iter().enumerate() {
        if matches!(index.role(i), Role::Send | Role::Forward)
            && !xray_shaped(&span.trace_id, span.start_unix_nano)
        {
            w3c_destinations.insert(destination(span));
        }
    }
    let mut out = HashSet::new();
    for (i, span) in index.spans.iter().enumerate() {
        if index.role(i) != Role::Process || !w3c_destinations.contains(&destination(span)) {
            continue;
        }
        let mut contexts = span
            .parent_span_id
            .iter()
            .map(|p| (p.as_str(), span.trace_id.as_str()))
            .chain(
                span.links
                    .iter()
                    .map(|l| (l.span_id.as_str(), l.trace_id.as_str())),
            )
            .peekable();
        if contexts.peek().is_none() {
            continue;
        }
        let mut any_xray = false;
        let all_missing = contexts.all(|(id, trace)| {
            any_xray |= xray_shaped(trace, span.start_unix_nano);
            index.find(id).is_none()
        });
        if all_missing && any_xray {
            out.insert(i);
        }
    }
    out
}

/// A messaging span whose parent or a link never arrived.
fn missing(index: &Index<'_>, i: usize) -> bool {
    let span = &index.spans[i];
    let parent_missing = matches!(index.role(i), Role::Process)
        && span
            .parent_span_id
            .as_deref()
            .is_some_and(|p| index.find(p).is_none());
    parent_missing || span.links.iter().any(|l| index.find(&l.span_id).is_none())
}

/// An attempt above 1 continuing a plain publication that no earlier attempt
/// continued: the retry was re-published without the forward's links.
fn retry_without_forward(index: &Index<'_>, facts: &Facts, i: usize) -> bool {
    if index.attempt(i).is_none_or(|a| a < 2) {
        return false;
    }
    let Some((p, _)) = index.producer_of(i) else {
        return false;
    };
    if index.role(p) != Role::Send {
        return false;
    }
    let earlier = facts
        .processes_of(p)
        .iter()
        .any(|&j| j != i && index.spans[j].start_unix_nano <= index.spans[i].start_unix_nano);
    !earlier
}

/// A process span continuing its publication by link only, with no parent of
/// its messaging batch or function invocation.
fn link_only(index: &Index<'_>, i: usize) -> bool {
    let Some((_, Via::Link)) = index.producer_of(i) else {
        return false;
    };
    let span = &index.spans[i];
    match span.parent_span_id.as_deref().and_then(|p| index.find(p)) {
        None => true,
        Some(p) => {
            index.role(p) != Role::Batch && !index.spans[p].attributes.contains_key("faas.trigger")
        }
    }
}

/// Processing that started before the publication did, or a negative queue time.
fn clock_skew(index: &Index<'_>, i: usize) -> bool {
    let span = &index.spans[i];
    if let Some(AttrValue::Double(q)) = span.attr("mqtrace.message.queue_time") {
        if *q < 0.0 {
            return true;
        }
    }
    index.producer_of(i).is_some_and(|(p, _)| {
        index.spans[p].service != span.service
            && span.start_unix_nano < index.spans[p].start_unix_nano
    })
}

/// Whether a later attempt of the message processed at `i` is in the capture: the
/// process span of a forward it made, a redelivery of the same publication, or
/// the same message id with a higher attempt.
fn retried_later(index: &Index<'_>, facts: &Facts, i: usize) -> bool {
    let span = &index.spans[i];
    let after = |j: &&usize| **j != i && index.spans[**j].start_unix_nano > span.start_unix_nano;
    let forwarded = facts
        .forwards_of
        .get(&i)
        .is_some_and(|forwards| forwards.iter().any(|&f| !facts.processes_of(f).is_empty()));
    let redelivered = index
        .producer_of(i)
        .is_some_and(|(p, _)| facts.processes_of(p).iter().any(|j| after(&j)));
    let same_id = identity(span)
        .and_then(|id| facts.by_identity.get(&id))
        .is_some_and(|later| later.iter().any(|j| after(&j)));
    forwarded || redelivered || same_id
}

/// Services that send no messaging spans while some of their spans have a parent
/// that never arrived, in a capture where other services do send messaging spans.
fn silent_services(index: &Index<'_>) -> BTreeMap<String, Vec<usize>> {
    let messaging: HashSet<&str> = (0..index.spans.len())
        .filter(|&i| index.role(i) != Role::Other)
        .map(|i| index.spans[i].service.as_str())
        .collect();
    if messaging.is_empty() {
        return BTreeMap::new();
    }
    let mut out: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, span) in index.spans.iter().enumerate() {
        if messaging.contains(span.service.as_str()) {
            continue;
        }
        if span
            .parent_span_id
            .as_deref()
            .is_some_and(|p| index.find(p).is_none())
        {
            out.entry(span.service.clone()).or_default().push(i);
        }
    }
    out
}

/// A span as a finding names it.
fn name_span(span: &RecordedSpan) -> String {
    format!(
        "{} ({}, span {}, trace {})",
        span.name, span.service, span.span_id, span.trace_id
    )
}

/// The report: one block per finding, or the all-clear line.
pub(crate) fn report(spans: &[RecordedSpan], findings: &[Finding]) -> String {
    let index = Index::new(spans);
    let journeys = journeys(&index).len();
    let mut services: Vec<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    services.sort_unstable();
    services.dedup();
    let mut out = String::new();
    if findings.is_empty() {
        let _ = writeln!(
            out,
            "mqtrace doctor: no broken propagation in {} spans from {} services ({journeys} message journeys)",
            spans.len(),
            services.len()
        );
        return out;
    }
    let _ = writeln!(
        out,
        "mqtrace doctor: {} finding{} in {} spans from {} services ({journeys} message journeys)",
        findings.len(),
        if findings.len() == 1 { "" } else { "s" },
        spans.len(),
        services.len()
    );
    for finding in findings {
        let _ = writeln!(out, "\n✗ {}: {}", finding.check.code(), finding.summary);
        const SHOWN: usize = 3;
        for &i in finding.spans.iter().take(SHOWN) {
            let _ = writeln!(out, "    {}", name_span(&spans[i]));
        }
        if finding.spans.len() > SHOWN {
            let _ = writeln!(out, "    … and {} more", finding.spans.len() - SHOWN);
        }
        let _ = writeln!(out, "  likely cause: {}", finding.check.cause());
        let _ = writeln!(out, "  fix: {}", finding.check.fix());
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use mqtrace_testing::Kind;

    use super::*;
    use crate::journey::fixture::{Spans, MS, T0};

    fn checks(spans: &Spans) -> Vec<Check> {
        checks_with(spans, &Options::default())
    }

    fn checks_with(spans: &Spans, options: &Options) -> Vec<Check> {
        diagnose(&spans.spans, options)
            .into_iter()
            .map(|f| f.check)
            .collect()
    }

    /// Healthy traffic, the baseline every check is judged against: nothing fires.
    fn healthy() -> Spans {
        let mut c = Spans::default();
        c.healthy("1", 0);
        c.retried("2", 10);
        // The capture goes on long after the last span.
        c.add("shop", "9", None, Kind::Internal, "tick", 120_000, &[]);
        c
    }

    #[test]
    fn healthy_traffic_has_no_findings() {
        let c = healthy();
        assert_eq!(checks(&c), vec![]);
        let text = report(&c.spans, &[]);
        assert_eq!(
            text,
            "mqtrace doctor: no broken propagation in 7 spans from 2 services (2 message journeys)\n"
        );
    }

    #[test]
    fn a_consumer_without_context_while_its_producer_is_there() {
        let mut c = healthy();
        let id = ("messaging.message.id", AttrValue::Str("m-7".into()));
        c.add(
            "shop",
            "3",
            None,
            Kind::Producer,
            "send orders",
            50,
            std::slice::from_ref(&id),
        );
        // The consumer started a new trace: no parent, no link.
        c.add(
            "worker",
            "4",
            None,
            Kind::Consumer,
            "process orders",
            52,
            std::slice::from_ref(&id),
        );
        let findings = diagnose(&c.spans, &Options::default());
        assert_eq!(
            findings.iter().map(|f| f.check).collect::<Vec<_>>(),
            vec![Check::ContextNotContinued, Check::NotConsumed]
        );
        let text = report(&c.spans, &findings);
        assert!(
            text.contains(
                "✗ context_not_continued: 1 process spans on orders\n    process orders (worker, span 0000000000000009, trace 00000000000000000000000000000004)\n  likely cause: the consumer found no trace context"
            ),
            "{text}"
        );

        // A consumer span without context whose message has no captured producer is
        // not this check's (nothing says which publication it was).
        let mut c = healthy();
        c.add(
            "worker",
            "4",
            None,
            Kind::Consumer,
            "process orders",
            52,
            &[id],
        );
        assert_eq!(checks(&c), vec![]);
    }

    #[test]
    fn kafka_records_are_matched_by_partition_and_offset() {
        let mut c = healthy();
        let at = [
            (
                "messaging.destination.partition.id",
                AttrValue::Str("0".into()),
            ),
            ("kafka.offset", AttrValue::Int(41)),
        ];
        c.add("shop", "3", None, Kind::Producer, "send orders", 50, &at);
        c.add(
            "worker",
            "4",
            None,
            Kind::Consumer,
            "process orders",
            52,
            &at,
        );
        assert!(checks(&c).contains(&Check::ContextNotContinued));
    }

    #[test]
    fn links_to_spans_that_never_arrived() {
        let mut c = healthy();
        let p = c.add(
            "worker",
            "3",
            Some("00000000000000aa"),
            Kind::Consumer,
            "process orders",
            50,
            &[],
        );
        c.link_to(&p, &format!("{:0>32}", "3"), "00000000000000aa", None);
        assert_eq!(checks(&c), vec![Check::MissingSpans]);
    }

    #[test]
    fn publications_nobody_continued_after_the_grace_time() {
        let mut c = healthy();
        c.add("shop", "3", None, Kind::Producer, "send invoices", 50, &[]);
        assert_eq!(checks(&c), vec![Check::NotConsumed]);
        // Sent just before the capture ended: not judged.
        let mut c = healthy();
        c.add(
            "shop",
            "3",
            None,
            Kind::Producer,
            "send invoices",
            119_000,
            &[],
        );
        assert_eq!(checks(&c), vec![]);
        // A dead-letter forward is not expected to be consumed.
        let mut c = healthy();
        let (send, process) = c.healthy("3", 50);
        c.fail(&process, "invalid");
        c.set(
            &process,
            "mqtrace.message.disposition",
            AttrValue::Str("dead_lettered".into()),
        );
        let dlq = c.add(
            "worker",
            "3",
            Some(&process),
            Kind::Producer,
            "send orders.dlq",
            53,
            &[],
        );
        c.link(&dlq, &send, Some("original_message"));
        c.link(&dlq, &process, Some("processing_attempt"));
        assert_eq!(checks(&c), vec![]);
    }

    #[test]
    fn w3c_producer_and_xray_only_consumer() {
        let mut c = healthy();
        let id = ("messaging.message.id", AttrValue::Str("m-8".into()));
        c.add(
            "shop",
            "3",
            None,
            Kind::Producer,
            "send orders",
            50,
            std::slice::from_ref(&id),
        );
        // The consumer's trace comes from the Lambda's X-Ray segment (never in OTLP):
        // its id starts with the epoch seconds.
        let seconds = (T0 + 52 * MS) / 1_000_000_000;
        let xray_trace = format!("{seconds:08x}{}", "a".repeat(24));
        c.add(
            "worker",
            &xray_trace,
            Some("00000000000000bb"),
            Kind::Consumer,
            "process orders",
            52,
            std::slice::from_ref(&id),
        );
        assert_eq!(checks(&c), vec![Check::XrayOnly, Check::NotConsumed]);
        // The same missing parent in a random (W3C) trace is a missing span.
        let mut c = healthy();
        c.add(
            "shop",
            "3",
            None,
            Kind::Producer,
            "send orders",
            50,
            std::slice::from_ref(&id),
        );
        c.add(
            "worker",
            "e3",
            Some("00000000000000bb"),
            Kind::Consumer,
            "process orders",
            52,
            &[id],
        );
        assert_eq!(checks(&c), vec![Check::MissingSpans, Check::NotConsumed]);
    }

    #[test]
    fn sqs_context_left_out_for_size() {
        let mut c = healthy();
        let (send, _) = c.healthy("3", 50);
        c.set(
            &send,
            "mqtrace.aws_sqs.context_omitted",
            AttrValue::Str("message_size".into()),
        );
        assert_eq!(checks(&c), vec![Check::ContextOmitted]);
    }

    #[test]
    fn a_retry_republished_without_links() {
        let mut c = healthy();
        // Attempt 2 continues a plain send that no attempt 1 continued.
        let (_, process) = c.healthy("3", 50);
        c.set(&process, "mqtrace.message.attempt", AttrValue::Int(2));
        assert_eq!(checks(&c), vec![Check::RetryWithoutForwardLink]);
        // Broker redelivery: attempt 1 and 2 continue the same publication.
        let mut c = healthy();
        let (send, first) = c.healthy("3", 50);
        c.set(
            &first,
            "mqtrace.message.disposition",
            AttrValue::Str("retried".into()),
        );
        let second = c.add(
            "worker",
            "3",
            Some(&send),
            Kind::Consumer,
            "process orders",
            60,
            &[("mqtrace.message.attempt", AttrValue::Int(2))],
        );
        c.link(&second, &send, None);
        assert_eq!(checks(&c), vec![]);
    }

    #[test]
    fn link_only_parenting_is_named_but_batches_and_invocations_are_not() {
        let mut c = healthy();
        let send = c.add("shop", "3", None, Kind::Producer, "send orders", 50, &[]);
        let p = c.add(
            "worker",
            "4",
            None,
            Kind::Consumer,
            "process orders",
            52,
            &[],
        );
        c.link(&p, &send, None);
        assert_eq!(checks(&c), vec![Check::LinkOnlyParenting]);
        let allowed = Options {
            allow: vec![Check::LinkOnlyParenting],
            ..Options::default()
        };
        assert_eq!(checks_with(&c, &allowed), vec![]);

        let mut c = healthy();
        let send = c.add("shop", "3", None, Kind::Producer, "send orders", 50, &[]);
        let batch = c.add(
            "worker",
            "4",
            None,
            Kind::Consumer,
            "process orders",
            52,
            &[("messaging.batch.message_count", AttrValue::Int(1))],
        );
        c.link(&batch, &send, None);
        let p = c.add(
            "worker",
            "4",
            Some(&batch),
            Kind::Consumer,
            "process orders",
            52,
            &[],
        );
        c.link(&p, &send, None);
        assert_eq!(checks(&c), vec![]);
    }

    #[test]
    fn a_service_whose_messaging_spans_never_arrive() {
        let mut c = healthy();
        // The handler's own span arrives; the process span it ran under does not.
        c.add(
            "billing",
            "3",
            Some("00000000000000cc"),
            Kind::Internal,
            "charge payment",
            50,
            &[],
        );
        assert_eq!(checks(&c), vec![Check::NoMessagingSpans]);
        // A service with messaging spans of its own is not silent.
        let mut c = healthy();
        c.add(
            "worker",
            "3",
            Some("00000000000000cc"),
            Kind::Internal,
            "charge payment",
            50,
            &[],
        );
        assert_eq!(checks(&c), vec![]);
    }

    #[test]
    fn processing_before_publication_is_clock_skew() {
        let mut c = healthy();
        let (_, process) = c.healthy("3", 50);
        c.set(
            &process,
            "mqtrace.message.queue_time",
            AttrValue::Double(-0.25),
        );
        assert_eq!(checks(&c), vec![Check::NegativeQueueTime]);
        let mut c = healthy();
        let send = c.add("shop", "3", None, Kind::Producer, "send orders", 50, &[]);
        let p = c.add(
            "worker",
            "3",
            Some(&send),
            Kind::Consumer,
            "process orders",
            40,
            &[],
        );
        c.link(&p, &send, None);
        assert_eq!(checks(&c), vec![Check::NegativeQueueTime]);
    }

    #[test]
    fn a_retry_that_never_came() {
        let mut c = healthy();
        let (_, process) = c.healthy("3", 50);
        c.fail(&process, "timeout");
        c.set(
            &process,
            "mqtrace.message.disposition",
            AttrValue::Str("retried".into()),
        );
        assert_eq!(checks(&c), vec![Check::RetryNeverArrived]);
        // Too close to the end of the capture to tell.
        let short = Options {
            retry_window: Duration::from_secs(600),
            ..Options::default()
        };
        assert_eq!(checks_with(&c, &short), vec![]);
    }
}
