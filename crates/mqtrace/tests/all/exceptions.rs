//! Failures as the conventions in force record them: status and `error.type` on
//! the span always; the `messaging.process.exception` log record with a logger
//! provider (v1.45, dup); the span's `exception` event under legacy and dup.

use mqtrace::embedded::{Message, TracedConsumer, TracedProducer};
use mqtrace::{Conventions, HandlerError};
use mqtrace_testing::{RecordedSpan, SpanStatus};
use opentelemetry::logs::{AnyValue, Severity};
use opentelemetry_sdk::logs::{InMemoryLogExporter, SdkLoggerProvider};

use crate::helpers::{broker_with, Harness};

/// One order that fails permanently; the process span and the log records.
async fn failing(
    conventions: Conventions,
) -> (RecordedSpan, Vec<opentelemetry_sdk::logs::SdkLogRecord>) {
    let h = Harness::start().await;
    let exporter = InMemoryLogExporter::default();
    let logs = SdkLoggerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let instrumenter = h.instrumenter(|b| b.conventions(conventions).logger_provider(&logs));
    let broker = broker_with(&[("orders", None)]);
    TracedProducer::new(broker.clone(), instrumenter.clone())
        .send("orders", Message::new("x"))
        .await
        .unwrap();
    TracedConsumer::new(broker, "orders", instrumenter)
        .run_until_idle(|_| async {
            Err(HandlerError::permanent("no such order").with_type("invalid"))
        })
        .await
        .unwrap();
    let spans = h.spans(2).await;
    let process = spans
        .into_iter()
        .find(|s| s.kind == mqtrace_testing::Kind::Consumer)
        .unwrap();
    let records = exporter
        .get_emitted_logs()
        .unwrap()
        .into_iter()
        .map(|l| l.record)
        .collect();
    (process, records)
}

fn attribute<'a>(
    record: &'a opentelemetry_sdk::logs::SdkLogRecord,
    key: &str,
) -> Option<&'a AnyValue> {
    record
        .attributes_iter()
        .find(|(k, _)| k.as_str() == key)
        .map(|(_, v)| v)
}

fn assert_error_on_span(process: &RecordedSpan) {
    assert_eq!(process.status, SpanStatus::Error("no such order".into()));
    assert_eq!(
        process.attr("error.type").and_then(|v| v.as_str()),
        Some("invalid")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_45_logs_the_exception_with_the_span_s_context() {
    let (process, records) = failing(Conventions::V1_45).await;
    assert_error_on_span(&process);
    assert!(
        process.events.is_empty(),
        "no deprecated span event: {:?}",
        process.events
    );
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(record.event_name(), Some("messaging.process.exception"));
    assert_eq!(record.severity_number(), Some(Severity::Error));
    assert_eq!(
        attribute(record, "exception.type"),
        Some(&AnyValue::from("invalid".to_owned()))
    );
    assert_eq!(
        attribute(record, "exception.message"),
        Some(&AnyValue::from("no such order".to_owned()))
    );
    let context = record.trace_context().unwrap();
    assert_eq!(context.trace_id.to_string(), process.trace_id);
    assert_eq!(context.span_id.to_string(), process.span_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_keeps_the_span_event_and_logs_nothing() {
    let (process, records) = failing(Conventions::Legacy).await;
    assert_error_on_span(&process);
    assert!(records.is_empty(), "{records:?}");
    assert_eq!(process.events.len(), 1);
    assert_eq!(process.events[0].name, "exception");
    assert_eq!(
        process.events[0]
            .attributes
            .get("exception.type")
            .and_then(|v| v.as_str()),
        Some("invalid")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dup_records_both() {
    let (process, records) = failing(Conventions::Dup).await;
    assert_error_on_span(&process);
    assert_eq!(process.events.len(), 1);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].event_name(), Some("messaging.process.exception"));
}
