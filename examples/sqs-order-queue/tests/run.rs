//! The example runs against the harness's SQS emulator and its spans arrive at an
//! OTLP collector: two batch requests, a trace per order, one dead letter.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashSet;
use std::time::Duration;

use mqtrace_testing::{brokers, Collector, Kind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_traced_end_to_end() {
    let endpoint = brokers::sqs_endpoint();
    let collector = Collector::start().await.unwrap();
    let stdout = mqtrace_testing::examples::run(
        env!("CARGO_BIN_EXE_sqs-order-queue"),
        &[("SQS_ENDPOINT", &endpoint)],
        &collector,
    )
    .await;
    assert!(stdout.contains("request 1 sent 10 orders"), "{stdout}");
    assert!(stdout.contains("request 2 sent 2 orders"), "{stdout}");
    assert!(stdout.contains("settled: 11"), "{stdout}");
    assert!(stdout.contains("dead_lettered: 1"), "{stdout}");
    // 12 create, 2 batch sends, 12 process, 1 dead-letter send, and receives.
    let spans = collector.wait_for_spans(27, Duration::from_secs(10)).await;
    let count = |prefix: &str, kind: Kind| {
        spans
            .iter()
            .filter(|s| s.name.starts_with(prefix) && s.kind == kind)
            .count()
    };
    assert_eq!(count("create orders", Kind::Producer), 12);
    assert_eq!(count("send orders", Kind::Client), 2);
    assert_eq!(count("process orders", Kind::Consumer), 12);
    assert_eq!(count("send orders-dead", Kind::Producer), 1);
    // Every process span continues its own order's trace.
    let creates: HashSet<&str> = spans
        .iter()
        .filter(|s| s.name.starts_with("create"))
        .map(|s| s.trace_id.as_str())
        .collect();
    let processed: HashSet<&str> = spans
        .iter()
        .filter(|s| s.name.starts_with("process"))
        .map(|s| s.trace_id.as_str())
        .collect();
    assert_eq!(creates.len(), 12);
    assert_eq!(processed, creates);
}
