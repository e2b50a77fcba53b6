//! The example handles an event file locally: the batch response names exactly
//! the failed records, and the spans were exported before it returned.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use mqtrace_testing::{Collector, Kind, SpanStatus};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_batch_failures_and_spans() {
    let collector = Collector::start().await.unwrap();
    let event = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/payments.json");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_lambda-sqs-handler"))
        .arg(event)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.grpc_endpoint())
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
        .env_remove("AWS_LAMBDA_RUNTIME_API")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let response: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let failed: Vec<&str> = response["batchItemFailures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["itemIdentifier"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["pay-2", "pay-3"]);
    // The process exited: whatever the collector has was exported in time.
    let spans = collector.spans();
    let records: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "process payments" && s.kind == Kind::Consumer)
        .collect();
    assert_eq!(records.len(), 3, "{spans:#?}");
    let errors = records
        .iter()
        .filter(|s| matches!(s.status, SpanStatus::Error(_)))
        .count();
    assert_eq!(errors, 2);
    assert_eq!(
        spans.iter().filter(|s| s.name == "capture payment").count(),
        2,
        "the tracing spans of the records that parsed"
    );
}
