//! The example runs against the test harness's Kafka-protocol broker and its
//! spans arrive at an OTLP collector: one trace per order, the retry and the dead
//! letter connected.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use mqtrace_testing::{assert_tree, brokers, Collector, Forest, TreeOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_traced_end_to_end() {
    let bootstrap = brokers::kafka_bootstrap();
    let collector = Collector::start().await.unwrap();
    let stdout = mqtrace_testing::examples::run(
        env!("CARGO_BIN_EXE_kafka-order-service"),
        &[("KAFKA_BOOTSTRAP", &bootstrap)],
        &collector,
    )
    .await;
    assert!(
        stdout.contains("settled: 2, retried: 1, dead_lettered: 1"),
        "{stdout}"
    );
    let spans = collector.wait_for_spans(12, Duration::from_secs(10)).await;
    let mut options = TreeOptions::only(&["error.type", "mqtrace.message.disposition"]);
    options.services = true;
    assert_tree(
        &Forest::new(spans).render(&options),
        r#"
        trace #1
        send orders [PRODUCER] (orders-api)
            process orders [CONSUMER] (billing) mqtrace.message.disposition="settled"
                ~> send orders (this trace)
                charge card [INTERNAL] (billing)
        trace #2
        send orders [PRODUCER] (orders-api)
            process orders [CONSUMER] (billing) ERROR("payment gateway timed out") error.type="gateway_timeout" mqtrace.message.disposition="retried"
                ~> send orders (this trace)
                charge card [INTERNAL] (billing)
                send orders.retry [PRODUCER] (billing) mqtrace.message.disposition="retried"
                    ~> send orders (this trace) mqtrace.link.relationship="original_message"
                    ~> process orders (this trace) mqtrace.link.relationship="processing_attempt"
                    process orders.retry [CONSUMER] (billing) mqtrace.message.disposition="settled"
                        ~> send orders.retry (this trace)
                        charge card [INTERNAL] (billing)
        trace #3
        send orders [PRODUCER] (orders-api)
            process orders [CONSUMER] (billing) ERROR("EOF while parsing a value at line 1 column 27") error.type="invalid_json" mqtrace.message.disposition="dead_lettered"
                ~> send orders (this trace)
                send orders.dlq [PRODUCER] (billing) mqtrace.message.disposition="dead_lettered"
                    ~> send orders (this trace) mqtrace.link.relationship="original_message"
                    ~> process orders (this trace) mqtrace.link.relationship="processing_attempt"
        "#,
    );
}
