//! Publish then consume: the span tree under each conventions setting, and
//! deliveries whose trace headers are missing or malformed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, ExchangeKind};
use mqtrace::{Conventions, HandlerResult};
use mqtrace_lapin::{declare_exchange, QueueSpec, TracedConsumer, TracedPublisher};
use mqtrace_testing::TreeOptions;
use opentelemetry::trace::{Span as _, Tracer, TracerProvider};

use crate::helpers::{assert_tree, normalised, when_count, within, Harness};

/// Publishes one order through a topic exchange, consumes it with a handler that
/// makes a child span and checks the payload, and renders the trace.
async fn order_flow(conventions: Conventions, settle_spans: bool) -> String {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b.conventions(conventions));
    let (_connection, channel) = h.channel().await;
    let exchange = h.name("shop");
    declare_exchange(&channel, &exchange, ExchangeKind::Topic)
        .await
        .unwrap();
    let queue = QueueSpec::new(h.name("billing")).bind(&exchange, "order.*");
    queue.declare(&channel).await.unwrap();

    let publisher = TracedPublisher::new(channel.clone(), instrumenter.clone())
        .server(mqtrace_lapin::Server::from_uri(&h.url));
    let confirmation = publisher
        .publish_json(
            &exchange,
            "order.created",
            &serde_json::json!({"order": 7}),
            BasicProperties::default()
                .with_correlation_id("checkout-1".into())
                .with_message_id("order-7".into()),
        )
        .await
        .unwrap();
    assert!(confirmation.is_ack());

    let tracer = h.guard.provider().unwrap().tracer("billing");
    let seen = Arc::new(AtomicUsize::new(0));
    let handled = Arc::clone(&seen);
    let consumer = TracedConsumer::new(&h.url, queue, instrumenter).settle_spans(settle_spans);
    let stats = within(
        30,
        consumer.run_until(
            move |message| {
                let tracer = tracer.clone();
                let seen = Arc::clone(&handled);
                async move {
                    let order: serde_json::Value = message.json()?;
                    assert_eq!(order["order"], 7);
                    tracer.start("charge card").end();
                    seen.fetch_add(1, Ordering::SeqCst);
                    HandlerResult::Ok(())
                }
            },
            when_count(&seen, 1),
        ),
    )
    .await
    .unwrap();
    assert_eq!((stats.settled, stats.connections), (1, 1));
    let spans = if settle_spans { 4 } else { 3 };
    h.render(spans, normalised()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_then_consume_is_one_trace() {
    assert_tree(
        &order_flow(Conventions::V1_45, true).await,
        r#"
        trace #1
        send shop-RUN:order.created [PRODUCER] messaging.destination.name="shop-RUN:order.created" messaging.message.conversation_id="checkout-1" messaging.message.id="order-7" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="rabbitmq" rabbitmq.destination.routing_key="order.created" server.address="127.0.0.1" server.port=*
            process shop-RUN:order.created:billing-RUN [CONSUMER] messaging.destination.name="shop-RUN:order.created:billing-RUN" messaging.message.conversation_id="checkout-1" messaging.message.id="order-7" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="rabbitmq" mqtrace.message.attempt=1 mqtrace.message.disposition="settled" mqtrace.message.queue_time=* mqtrace.rabbitmq.redelivered=false rabbitmq.destination.routing_key="order.created" rabbitmq.message.delivery_tag=1 server.address="127.0.0.1" server.port=*
                ~> send shop-RUN:order.created (this trace)
                charge card [INTERNAL]
                ack shop-RUN:order.created:billing-RUN [CLIENT] messaging.destination.name="shop-RUN:order.created:billing-RUN" messaging.message.conversation_id="checkout-1" messaging.message.id="order-7" messaging.operation.name="ack" messaging.operation.type="settle" messaging.system.name="rabbitmq" mqtrace.rabbitmq.redelivered=false rabbitmq.destination.routing_key="order.created" rabbitmq.message.delivery_tag=1 server.address="127.0.0.1" server.port=*
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_conventions_name_the_exchange() {
    assert_tree(
        &order_flow(Conventions::Legacy, false).await,
        r#"
        trace #1
        shop-RUN publish [PRODUCER] messaging.destination.name="shop-RUN" messaging.message.conversation_id="checkout-1" messaging.message.id="order-7" messaging.operation="publish" messaging.rabbitmq.destination.routing_key="order.created" messaging.system="rabbitmq" server.address="127.0.0.1" server.port=*
            shop-RUN deliver [CONSUMER] messaging.destination.name="shop-RUN" messaging.message.conversation_id="checkout-1" messaging.message.id="order-7" messaging.operation="deliver" messaging.rabbitmq.destination.routing_key="order.created" messaging.system="rabbitmq" mqtrace.message.attempt=1 mqtrace.message.disposition="settled" mqtrace.message.queue_time=* mqtrace.rabbitmq.redelivered=false server.address="127.0.0.1" server.port=*
                ~> shop-RUN publish (this trace)
                charge card [INTERNAL]
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dup_conventions_carry_both_names() {
    assert_tree(
        &order_flow(Conventions::Dup, false).await,
        r#"
        trace #1
        send shop-RUN:order.created [PRODUCER] messaging.destination.name="shop-RUN:order.created" messaging.message.conversation_id="checkout-1" messaging.message.id="order-7" messaging.operation="publish" messaging.operation.name="send" messaging.operation.type="send" messaging.rabbitmq.destination.routing_key="order.created" messaging.system="rabbitmq" messaging.system.name="rabbitmq" rabbitmq.destination.routing_key="order.created" server.address="127.0.0.1" server.port=*
            process shop-RUN:order.created:billing-RUN [CONSUMER] messaging.destination.name="shop-RUN:order.created:billing-RUN" messaging.message.conversation_id="checkout-1" messaging.message.id="order-7" messaging.operation="deliver" messaging.operation.name="process" messaging.operation.type="process" messaging.rabbitmq.destination.routing_key="order.created" messaging.system="rabbitmq" messaging.system.name="rabbitmq" mqtrace.message.attempt=1 mqtrace.message.disposition="settled" mqtrace.message.queue_time=* mqtrace.rabbitmq.redelivered=false rabbitmq.destination.routing_key="order.created" rabbitmq.message.delivery_tag=1 server.address="127.0.0.1" server.port=*
                ~> send shop-RUN:order.created (this trace)
                charge card [INTERNAL]
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_malformed_trace_headers_start_new_roots() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let (_connection, channel) = h.channel().await;
    let queue = QueueSpec::new(h.name("plain"));
    queue.declare(&channel).await.unwrap();
    let mut malformed = FieldTable::default();
    malformed.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from("00-not-a-trace-01")),
    );
    // A producer outside mqtrace: plain lapin, one message without headers.
    for (body, properties) in [
        (&b"no headers"[..], BasicProperties::default()),
        (
            &b"bad header"[..],
            BasicProperties::default().with_headers(malformed),
        ),
    ] {
        channel
            .basic_publish(
                "".into(),
                queue.name().into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let seen = Arc::new(AtomicUsize::new(0));
    let handled = Arc::clone(&seen);
    let stats = within(
        30,
        TracedConsumer::new(&h.url, queue, instrumenter).run_until(
            move |_| {
                let seen = Arc::clone(&handled);
                async move {
                    seen.fetch_add(1, Ordering::SeqCst);
                    HandlerResult::Ok(())
                }
            },
            when_count(&seen, 2),
        ),
    )
    .await
    .unwrap();
    assert_eq!(stats.settled, 2);
    assert_tree(
        &h.render(2, TreeOptions::only(&["mqtrace.message.attempt"]))
            .await,
        r#"
        trace #1
        process plain-RUN [CONSUMER] mqtrace.message.attempt=1
        trace #2
        process plain-RUN [CONSUMER] mqtrace.message.attempt=1
        "#,
    );
}

/// The full consumer coalesces its acks: 300 deliveries, handled four at a time
/// and finishing out of order, with a permanent failure (a nack to the
/// dead-letter queue) every 50, go out with far fewer ack frames than messages;
/// at stop nothing is left unacknowledged (the queue is empty once the
/// consumer's connection closes) and exactly the failures are dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_are_coalesced_and_none_is_lost() {
    const MESSAGES: usize = 300;
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let (_connection, channel) = h.channel().await;
    let dlq = h.name("ledger.dead");
    let queue = QueueSpec::new(h.name("ledger")).dead_letter(h.name("ledger.dlx"), &dlq);
    queue.declare(&channel).await.unwrap();
    crate::helpers::publish_numbered(&channel, &instrumenter, queue.name(), MESSAGES).await;
    let seen = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&seen);
    let consumer = TracedConsumer::new(&h.url, queue.clone(), instrumenter)
        .prefetch(20)
        .concurrency(4);
    let stats = within(
        60,
        consumer.run_until(
            move |message| {
                let counted = Arc::clone(&counted);
                async move {
                    let n = crate::helpers::number_of(message.body());
                    // Uneven handling times: later deliveries finish first.
                    tokio::time::sleep(std::time::Duration::from_millis(n % 4)).await;
                    counted.fetch_add(1, Ordering::SeqCst);
                    if n.is_multiple_of(50) {
                        return Err(mqtrace::HandlerError::permanent("bad ledger line"));
                    }
                    HandlerResult::Ok(())
                }
            },
            when_count(&seen, MESSAGES),
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        (stats.settled, stats.dead_lettered, stats.settle_failures),
        (294, 6, 0)
    );
    let frames = consumer.ack_frames();
    println!(
        "rabbitmq coalesced acks: {frames} ack frames for {} acked deliveries",
        MESSAGES - 6
    );
    assert!(
        (1..150).contains(&frames),
        "{frames} ack frames for {} acked deliveries",
        MESSAGES - 6
    );
    assert!(
        crate::helpers::drain(&channel, queue.name())
            .await
            .is_empty(),
        "every delivery was acknowledged before the consumer closed"
    );
    let dead = crate::helpers::drain_numbers(&channel, &dlq, 6).await;
    assert_eq!(dead, ["0", "50", "100", "150", "200", "250"]);
}

/// The consumer's loop can be spawned on tokio (its future is `Send`).
#[test]
fn the_consumer_loop_is_send() {
    fn spawnable<T: Send + 'static>(_: T) {}
    let consumer = TracedConsumer::new(
        "amqp://127.0.0.1:1/%2f",
        QueueSpec::new("q"),
        mqtrace::Instrumenter::default(),
    );
    spawnable(async move {
        consumer
            .run_until(|_| async { HandlerResult::Ok(()) }, async {})
            .await
    });
}
