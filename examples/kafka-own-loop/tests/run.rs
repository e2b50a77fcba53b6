//! The own-loop example against the test harness's Kafka-protocol broker: the
//! whole span tree of its three payments, one retried twice and then
//! dead-lettered, arrives at an OTLP collector.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use mqtrace_testing::{assert_tree, brokers, Collector, Forest, TreeOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_loop_is_traced_retried_and_dead_lettered() {
    let bootstrap = brokers::kafka_bootstrap();
    let run = format!("{:08x}", std::process::id() ^ 0x0ca5_0000);
    let topic = format!("payments-{run}");
    let collector = Collector::start().await.unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kafka-own-loop"))
        .env("KAFKA_BOOTSTRAP", &bootstrap)
        .env("TOPIC", &topic)
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
                                send payments-RUN.dlq [PRODUCER] mqtrace.message.attempt=3 mqtrace.message.disposition="dead_lettered"
                                    ~> send payments-RUN (this trace) mqtrace.link.relationship="original_message"
                                    ~> process payments-RUN (this trace) mqtrace.link.relationship="processing_attempt"
        "#,
    );
}
