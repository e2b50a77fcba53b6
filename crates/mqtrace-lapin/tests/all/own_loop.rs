//! Instrumenting one's own lapin loop: plain `basic_consume` deliveries processed
//! and settled through `DeliveryTracer`, plain `basic_publish` through
//! `ChannelExt::publish_traced`.

use futures_util::StreamExt as _;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use mqtrace::{Disposition, HandlerError, Settlement};
use mqtrace_lapin::{ChannelExt as _, DeliveryTracer, QueueSpec};
use mqtrace_testing::TreeOptions;

use crate::helpers::{assert_tree, drain, drain_at_least, within, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_loop_gets_process_and_settle_spans_and_the_core_decides() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b.settle_spans(true));
    let (_connection, channel) = h.channel().await;
    let dlq = h.name("own.dead");
    let queue = QueueSpec::new(h.name("own")).dead_letter(h.name("own.dlx"), &dlq);
    queue.declare(&channel).await.unwrap();
    for body in [&br#"{"ok":true}"#[..], b"{not json"] {
        channel
            .publish_traced(
                &instrumenter,
                "".into(),
                queue.name().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .unwrap();
    }

    let tracer = DeliveryTracer::new(instrumenter, &queue);
    let mut deliveries = channel
        .basic_consume(
            queue.name().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut settled = Vec::new();
    let mut attempts = Vec::new();
    for _ in 0..2 {
        let delivery = within(10, deliveries.next()).await.unwrap().unwrap();
        let processed = tracer
            .process(&delivery, |attempt| {
                attempts.push(attempt.number());
                async {
                    let _: serde_json::Value = serde_json::from_slice(&delivery.data)
                        .map_err(|e| HandlerError::permanent(e).with_type("invalid_json"))?;
                    Ok(())
                }
            })
            .await;
        settled.push(tracer.settle(processed, delivery, &channel).await);
    }
    assert_eq!(attempts, [1, 1]);
    let what: Vec<_> = settled
        .iter()
        .map(|s| (s.disposition, s.settlement))
        .collect();
    assert_eq!(
        what,
        [
            (Disposition::Settle, Settlement::Ack),
            // Permanent: rejected to the queue's dead-letter exchange.
            (Disposition::DeadLetter, Settlement::Reject),
        ]
    );
    let dead = drain_at_least(&channel, &dlq, 1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].data, b"{not json");
    assert!(drain(&channel, queue.name()).await.is_empty());

    assert_tree(
        &h.render(
            6,
            TreeOptions::only(&[
                "error.type",
                "messaging.operation.name",
                "mqtrace.message.attempt",
                "mqtrace.message.disposition",
            ]),
        )
        .await,
        r#"
        trace #1
        send own-RUN [PRODUCER] messaging.operation.name="send"
            process own-RUN [CONSUMER] messaging.operation.name="process" mqtrace.message.attempt=1 mqtrace.message.disposition="settled"
                ~> send own-RUN (this trace)
                ack own-RUN [CLIENT] messaging.operation.name="ack"
        trace #2
        send own-RUN [PRODUCER] messaging.operation.name="send"
            process own-RUN [CONSUMER] ERROR("key must be a string at line 1 column 2") error.type="invalid_json" messaging.operation.name="process" mqtrace.message.attempt=1 mqtrace.message.disposition="dead_lettered"
                ~> send own-RUN (this trace)
                nack own-RUN [CLIENT] messaging.operation.name="nack"
        "#,
    );
    // The same run in metrics: two sends, two deliveries, one settled and one
    // rejected to the dead-letter exchange, each settle call timed.
    assert_tree(
        &h.metrics(&[], &["server.port"]).await,
        r#"
messaging.client.consumed.messages [{message}] Counter value=2 messaging.destination.name="own-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="rabbitmq"
messaging.client.operation.duration [s] Histogram count=1 buckets=messaging messaging.destination.name="own-RUN" messaging.operation.name="ack" messaging.operation.type="settle" messaging.system.name="rabbitmq"
messaging.client.operation.duration [s] Histogram count=1 buckets=messaging messaging.destination.name="own-RUN" messaging.operation.name="nack" messaging.operation.type="settle" messaging.system.name="rabbitmq"
messaging.client.operation.duration [s] Histogram count=2 buckets=messaging messaging.destination.name="own-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="rabbitmq"
messaging.client.sent.messages [{message}] Counter value=2 messaging.destination.name="own-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="rabbitmq"
messaging.process.duration [s] Histogram count=1 buckets=messaging error.type="invalid_json" messaging.destination.name="own-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="rabbitmq"
messaging.process.duration [s] Histogram count=1 buckets=messaging messaging.destination.name="own-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="rabbitmq"
mqtrace.message.dispositions [{message}] Counter value=1 messaging.destination.name="own-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="rabbitmq" mqtrace.message.disposition="dead_lettered"
mqtrace.message.dispositions [{message}] Counter value=1 messaging.destination.name="own-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="rabbitmq" mqtrace.message.disposition="settled"
mqtrace.message.queue.duration [s] Histogram count=2 buckets=messaging messaging.destination.name="own-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="rabbitmq"
        "#,
    );
}
