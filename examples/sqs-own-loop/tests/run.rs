//! The own-loop example against the harness's SQS emulator: the whole span tree
//! of its three payments, one handed out three times by SQS and then
//! dead-lettered, arrives at an OTLP collector.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use mqtrace_testing::brokers;
use mqtrace_testing::examples::{check_own_loop, Retry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_loop_is_traced_retried_and_dead_lettered() {
    let endpoint = brokers::sqs_endpoint();
    let run = format!("{:08x}", std::process::id() ^ 0x0005_5000);
    let name = format!("payments-{run}");
    check_own_loop(
        env!("CARGO_BIN_EXE_sqs-own-loop"),
        &[("SQS_ENDPOINT", &endpoint), ("QUEUE", &name)],
        &run,
        Retry::Redelivered,
        "payments-RUN-dead",
        9,
    )
    .await;
}
