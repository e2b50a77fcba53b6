//! The conventions checker can fail: each kind of finding from a capture made to
//! trigger it, and a clean capture that passes.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;

use mqtrace_testing::semconv::judge;
use mqtrace_testing::{
    AttrValue, Kind, MetricKind, MetricValue, RecordedMetric, RecordedSpan, SpanStatus,
};

fn span(kind: Kind, attributes: &[(&str, AttrValue)]) -> RecordedSpan {
    RecordedSpan {
        service: "test".into(),
        trace_id: "0".repeat(32),
        span_id: "0".repeat(16),
        parent_span_id: None,
        name: "process orders".into(),
        kind,
        start_unix_nano: 0,
        end_unix_nano: 1,
        attributes: attributes
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
        events: Vec::new(),
        links: Vec::new(),
        status: SpanStatus::Unset,
    }
}

fn metric(name: &str) -> RecordedMetric {
    RecordedMetric {
        service: "test".into(),
        scope: "mqtrace".into(),
        name: name.into(),
        unit: "s".into(),
        kind: MetricKind::Histogram,
        attributes: BTreeMap::new(),
        value: MetricValue::Number(0.0),
        delta: false,
    }
}

fn s(v: &str) -> AttrValue {
    AttrValue::Str(v.into())
}

fn good() -> RecordedSpan {
    span(
        Kind::Consumer,
        &[
            ("messaging.system.name", s("kafka")),
            ("messaging.operation.type", s("process")),
            ("messaging.destination.name", s("orders")),
            ("kafka.offset", AttrValue::Int(4)),
            ("mqtrace.message.attempt", AttrValue::Int(1)),
            ("messaging.header.x-tenant", s("acme")),
        ],
    )
}

#[test]
fn a_clean_capture_passes() {
    let summary = judge(&[good()], &[metric("messaging.process.duration")]).unwrap();
    assert!(summary.contains(": ok"), "{summary}");
}

#[test]
fn each_kind_of_finding_is_reported() {
    let cases: [(RecordedSpan, &str); 6] = [
        (
            span(Kind::Consumer, &[("messaging.system.name", s("kafka-ish"))]),
            "messaging.system.name: value \"kafka-ish\" is not one of",
        ),
        (
            span(Kind::Producer, &[("messaging.system", s("kafka"))]),
            "messaging.system: deprecated in the registry",
        ),
        (
            span(Kind::Consumer, &[("kafka.offset", s("4"))]),
            "kafka.offset: string, the registry says int",
        ),
        (
            span(
                Kind::Consumer,
                &[("messaging.operation.type", s("deliver"))],
            ),
            "messaging.operation.type: value \"deliver\" is deprecated in the registry",
        ),
        (
            span(Kind::Consumer, &[("messaging.made.up", s("x"))]),
            "messaging.made.up: not in the registry",
        ),
        (
            span(Kind::Consumer, &[("mqtrace.undocumented", s("x"))]),
            "mqtrace.undocumented: in mqtrace's namespace but not in",
        ),
    ];
    for (bad, expected) in cases {
        let findings = judge(&[good(), bad], &[]).unwrap_err();
        assert!(findings.contains(expected), "{expected}:\n{findings}");
    }
    let findings = judge(&[], &[metric("messaging.publish.duration")]).unwrap_err();
    assert!(
        findings.contains("metric messaging.publish.duration: deprecated in the registry"),
        "{findings}"
    );
    // Application spans (INTERNAL) are not mqtrace's to check.
    assert!(judge(&[span(Kind::Internal, &[("app.order", s("7"))])], &[]).is_ok());
}
