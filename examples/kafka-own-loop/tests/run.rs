//! The own-loop example against the test harness's Kafka-protocol broker: the
//! whole span tree of its three payments, one retried twice and then
//! dead-lettered, arrives at an OTLP collector.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use mqtrace_testing::brokers;
use mqtrace_testing::examples::{check_own_loop, Retry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_loop_is_traced_retried_and_dead_lettered() {
    let endpoint = brokers::kafka_bootstrap();
    let run = format!("{:08x}", std::process::id() ^ 0x0ca5_0000);
    let name = format!("payments-{run}");
    check_own_loop(
        env!("CARGO_BIN_EXE_kafka-own-loop"),
        &[("KAFKA_BOOTSTRAP", &endpoint), ("TOPIC", &name)],
        &run,
        Retry::Forwarded,
        "payments-RUN.dlq",
        11,
    )
    .await;
}
