//! The example handles an event file locally: the batch response names exactly
//! the failed records, and the spans were exported before it returned.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use mqtrace_testing::{Collector, Kind, SpanStatus};

/// The ids in a printed partial batch response.
fn failed_ids(stdout: &str) -> Vec<String> {
    let response: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    response["batchItemFailures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["itemIdentifier"].as_str().unwrap().to_owned())
        .collect()
}

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
    assert_eq!(failed_ids(&stdout), ["pay-2", "pay-3"]);
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
    // The invocation, batch and record spans and the metrics, judged against the
    // registry (the `tracing` handler spans are the application's).
    let metrics = collector.metrics();
    assert!(!metrics.is_empty(), "the function exported no metrics");
    mqtrace_testing::semconv::check(&spans, &metrics);
}

/// Under a real Lambda runtime API: cargo-lambda's emulator (`cargo lambda watch
/// --only-lambda-apis`), the example binary polling it, and the event sent with
/// `cargo lambda invoke`. The answer comes back through the runtime API, and the
/// spans were exported before the function answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_under_the_lambda_runtime_api() {
    let cargo_lambda = std::env::var("MQTRACE_TEST_CARGO_LAMBDA").unwrap_or_else(|_| {
        panic!(
            "MQTRACE_TEST_CARGO_LAMBDA is not set: run the suite with `scripts/test.sh`, or \
             `scripts/brokers.sh start` (which installs cargo-lambda) and `source .mqtrace-test/env`"
        )
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = env!("CARGO_MANIFEST_DIR");
    let _emulator = tokio::process::Command::new(&cargo_lambda)
        .args([
            "lambda",
            "watch",
            "--only-lambda-apis",
            "--invoke-address",
            "127.0.0.1",
        ])
        .args(["--invoke-port", &port.to_string()])
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the runtime API emulator did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let collector = Collector::start().await.unwrap();
    let _function = tokio::process::Command::new(env!("CARGO_BIN_EXE_lambda-sqs-handler"))
        .env(
            "AWS_LAMBDA_RUNTIME_API",
            format!("http://127.0.0.1:{port}/.rt"),
        )
        .env("AWS_LAMBDA_FUNCTION_NAME", "_")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.grpc_endpoint())
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let invoked = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(&cargo_lambda)
            .args(["lambda", "invoke", "--invoke-address", "127.0.0.1"])
            .args(["--invoke-port", &port.to_string()])
            .args([
                "--data-file",
                concat!(env!("CARGO_MANIFEST_DIR"), "/tests/payments.json"),
            ])
            .current_dir(dir)
            .output(),
    )
    .await
    .expect("the invocation answered within a minute")
    .unwrap();
    let stdout = String::from_utf8_lossy(&invoked.stdout);
    assert!(
        invoked.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&invoked.stderr)
    );
    assert_eq!(failed_ids(&stdout), ["pay-2", "pay-3"]);
    // Flushed before the answer: the spans are there already.
    let spans = collector.spans();
    let invocation = spans.iter().find(|s| s.kind == Kind::Server).unwrap();
    assert_eq!(
        invocation
            .attr("faas.invocation.id")
            .and_then(|v| v.as_str())
            .map(str::len),
        Some(36),
        "the runtime API's request id"
    );
    let records = spans
        .iter()
        .filter(|s| s.name == "process payments" && s.kind == Kind::Consumer)
        .count();
    assert_eq!(records, 3, "{spans:#?}");
}
