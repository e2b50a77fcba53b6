//! The own-loop example against the test harness's RabbitMQ: the whole span tree
//! of its three payments, one retried twice and then dead-lettered, arrives at an
//! OTLP collector.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use lapin::options::BasicGetOptions;
use lapin::{Connection, ConnectionProperties};
use mqtrace_testing::brokers;
use mqtrace_testing::examples::{check_own_loop, Retry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_loop_is_traced_retried_and_dead_lettered() {
    let endpoint = brokers::rabbitmq_url();
    let run = format!("{:08x}", std::process::id() ^ 0x5eed_0000);
    let name = format!("payments-{run}");
    check_own_loop(
        env!("CARGO_BIN_EXE_rabbitmq-own-loop"),
        &[("AMQP_URL", &endpoint), ("QUEUE", &name)],
        &run,
        Retry::Forwarded,
        "payments-RUN.dlx:payments-RUN",
        11,
    )
    .await;

    // The dead letter, with the body unchanged.
    let connection = Connection::connect(&endpoint, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let dead = channel
        .basic_get(
            format!("{name}.dead").as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("one dead letter");
    assert_eq!(dead.delivery.data, br#"{"payment":"p-3"}"#);
}
