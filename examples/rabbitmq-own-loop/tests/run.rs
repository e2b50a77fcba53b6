//! The own-loop example against the test harness's RabbitMQ: the whole span tree
//! of its three payments, one retried twice and then dead-lettered, arrives at an
//! OTLP collector, and the dead letter is in the dead-letter queue.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use lapin::options::BasicGetOptions;
use lapin::{Connection, ConnectionProperties};
use mqtrace_testing::{assert_tree, brokers, Collector, Forest, TreeOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_loop_is_traced_retried_and_dead_lettered() {
    let url = brokers::rabbitmq_url();
    let run = format!("{:08x}", std::process::id() ^ 0x5eed_0000);
    let queue = format!("payments-{run}");
    let collector = Collector::start().await.unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_rabbitmq-own-loop"))
        .env("AMQP_URL", &url)
        .env("QUEUE", &queue)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.grpc_endpoint())
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "payments: ConsumerStats { settled: 2, retried: 2, dead_lettered: 1, dropped: 0, redelivered: 0, settle_failures: 0"
        ),
        "{stdout}"
    );

    // The dead letter, with the body unchanged.
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let dead = channel
        .basic_get(
            format!("{queue}.dead").as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("one dead letter");
    assert_eq!(dead.delivery.data, br#"{"payment":"p-3"}"#);

    let spans = collector.wait_for_spans(11, Duration::from_secs(10)).await;
    assert_eq!(spans.len(), 11, "{spans:#?}");
    let options = TreeOptions::only(&[
        "error.type",
        "mqtrace.message.attempt",
        "mqtrace.message.disposition",
    ]);
    assert_tree(
        &Forest::new(spans).render(&options).replace(&run, "RUN"),
        r#"
        trace #1
        send payments-RUN [PRODUCER]
            process payments-RUN [CONSUMER] mqtrace.message.attempt=1 mqtrace.message.disposition="settled"
                ~> send payments-RUN (this trace)
        trace #2
        send payments-RUN [PRODUCER]
            process payments-RUN [CONSUMER] mqtrace.message.attempt=1 mqtrace.message.disposition="settled"
                ~> send payments-RUN (this trace)
        trace #3
        send payments-RUN [PRODUCER]
            process payments-RUN [CONSUMER] ERROR("gateway timeout") error.type="timeout" mqtrace.message.attempt=1 mqtrace.message.disposition="retried"
                ~> send payments-RUN (this trace)
                send payments-RUN [PRODUCER] mqtrace.message.attempt=1 mqtrace.message.disposition="retried"
                    ~> send payments-RUN (this trace) mqtrace.link.relationship="original_message"
                    ~> process payments-RUN (this trace) mqtrace.link.relationship="processing_attempt"
                    process payments-RUN [CONSUMER] ERROR("gateway timeout") error.type="timeout" mqtrace.message.attempt=2 mqtrace.message.disposition="retried"
                        ~> send payments-RUN (this trace)
                        send payments-RUN [PRODUCER] mqtrace.message.attempt=2 mqtrace.message.disposition="retried"
                            ~> send payments-RUN (this trace) mqtrace.link.relationship="original_message"
                            ~> process payments-RUN (this trace) mqtrace.link.relationship="processing_attempt"
                            process payments-RUN [CONSUMER] ERROR("gateway timeout") error.type="timeout" mqtrace.message.attempt=3 mqtrace.message.disposition="dead_lettered"
                                ~> send payments-RUN (this trace)
                                send payments-RUN.dlx:payments-RUN [PRODUCER] mqtrace.message.attempt=3 mqtrace.message.disposition="dead_lettered"
                                    ~> send payments-RUN (this trace) mqtrace.link.relationship="original_message"
                                    ~> process payments-RUN (this trace) mqtrace.link.relationship="processing_attempt"
        "#,
    );
}
