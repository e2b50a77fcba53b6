//! Every span recipe, under each conventions setting.

use mqtrace::embedded::{HeaderInjector, Message, TracedConsumer, TracedProducer};
use mqtrace::{Conventions, Inbound, MessageDescription, MessagingSystem, OperationType};
use mqtrace_testing::TreeOptions;
use opentelemetry::trace::{Span as _, Tracer, TracerProvider};
use opentelemetry::KeyValue;

use crate::helpers::{assert_tree, broker_with, Harness};

/// send -> process (with a handler span) -> ack, exported and rendered.
async fn send_process_settle(conventions: Conventions) -> String {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b.conventions(conventions));
    let broker = broker_with(&[("orders", None)]);
    let producer = TracedProducer::new(broker.clone(), instrumenter.clone());
    producer
        .send("orders", Message::new(r#"{"id":1}"#))
        .await
        .unwrap();

    let tracer = h.guard.provider().unwrap().tracer("handler");
    let consumer = TracedConsumer::new(broker.clone(), "orders", instrumenter).settle_spans(true);
    let stats = consumer
        .run_until_idle(|_| {
            let tracer = tracer.clone();
            // Inside the future: it runs within the process span's context.
            async move {
                tracer.start("charge card").end();
                Ok(())
            }
        })
        .await
        .unwrap();
    assert_eq!(stats.settled, 1);
    h.forest(4).await.render(&TreeOptions::normalised())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_conventions() {
    assert_tree(
        &send_process_settle(Conventions::V1_45).await,
        r#"
        trace #1
        send orders [PRODUCER] messaging.destination.name="orders" messaging.message.id="1" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="mqtrace"
            process orders [CONSUMER] messaging.destination.name="orders" messaging.message.id="1" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="mqtrace" mqtrace.message.attempt=1 mqtrace.message.disposition="settled" mqtrace.message.queue_time=*
                ~> send orders (this trace)
                charge card [INTERNAL]
                ack orders [CLIENT] messaging.destination.name="orders" messaging.message.id="1" messaging.operation.name="ack" messaging.operation.type="settle" messaging.system.name="mqtrace"
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_conventions() {
    assert_tree(
        &send_process_settle(Conventions::Legacy).await,
        r#"
        trace #1
        orders publish [PRODUCER] messaging.destination.name="orders" messaging.message.id="1" messaging.operation="publish" messaging.system="mqtrace"
            orders deliver [CONSUMER] messaging.destination.name="orders" messaging.message.id="1" messaging.operation="deliver" messaging.system="mqtrace" mqtrace.message.attempt=1 mqtrace.message.disposition="settled" mqtrace.message.queue_time=*
                ~> orders publish (this trace)
                charge card [INTERNAL]
                orders ack [CLIENT] messaging.destination.name="orders" messaging.message.id="1" messaging.system="mqtrace"
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_conventions() {
    assert_tree(
        &send_process_settle(Conventions::Dup).await,
        r#"
        trace #1
        send orders [PRODUCER] messaging.destination.name="orders" messaging.message.id="1" messaging.operation="publish" messaging.operation.name="send" messaging.operation.type="send" messaging.system="mqtrace" messaging.system.name="mqtrace"
            process orders [CONSUMER] messaging.destination.name="orders" messaging.message.id="1" messaging.operation="deliver" messaging.operation.name="process" messaging.operation.type="process" messaging.system="mqtrace" messaging.system.name="mqtrace" mqtrace.message.attempt=1 mqtrace.message.disposition="settled" mqtrace.message.queue_time=*
                ~> send orders (this trace)
                charge card [INTERNAL]
                ack orders [CLIENT] messaging.destination.name="orders" messaging.message.id="1" messaging.operation.name="ack" messaging.operation.type="settle" messaging.system="mqtrace" messaging.system.name="mqtrace"
        "#,
    );
}

fn kafka(op: OperationType) -> MessageDescription {
    let mut d = MessageDescription::new(MessagingSystem::Kafka, op).destination("orders");
    d.partition = Some("3".into());
    d.consumer_group = Some("billing".into());
    d
}

/// The Kafka-specific names differ most between settings: checked per setting on a
/// process span made straight from a description.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_names_per_setting() {
    let h = Harness::start().await;
    for conventions in [Conventions::V1_45, Conventions::Legacy, Conventions::Dup] {
        let instrumenter = h.instrumenter(|b| b.conventions(conventions));
        let mut d = kafka(OperationType::Receive).operation_named("poll");
        d.offset = Some(7);
        d.consumer_group = Some("billing".into());
        instrumenter
            .start_receive::<mqtrace::embedded::Delivery>(&d, &[])
            .end();
    }
    let rendered = h.forest(3).await.render(&TreeOptions::normalised());
    assert_tree(
        &rendered,
        r#"
        trace #1
        poll orders [CLIENT] kafka.offset=7 messaging.consumer.group.name="billing" messaging.destination.name="orders" messaging.destination.partition.id="3" messaging.operation.name="poll" messaging.operation.type="receive" messaging.system.name="kafka"
        trace #2
        orders receive [CLIENT] messaging.destination.name="orders" messaging.kafka.consumer.group="billing" messaging.kafka.destination.partition=3 messaging.kafka.message.offset=7 messaging.operation="receive" messaging.system="kafka"
        trace #3
        poll orders [CLIENT] kafka.offset=7 messaging.consumer.group.name="billing" messaging.destination.name="orders" messaging.destination.partition.id="3" messaging.kafka.consumer.group="billing" messaging.kafka.destination.partition=3 messaging.kafka.message.offset=7 messaging.operation="receive" messaging.operation.name="poll" messaging.operation.type="receive" messaging.system="kafka" messaging.system.name="kafka"
        "#,
    );
}

/// Batch send (create per message, one CLIENT send linking them), receive linking
/// each message with its id, under an application span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_batch_send_and_receive() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b.conventions(Conventions::V1_45));
    let broker = broker_with(&[("orders", None)]);
    let tracer = h.guard.provider().unwrap().tracer("app");

    tracer.in_span("nightly export", |_| {
        let create = MessageDescription::new(MessagingSystem::Embedded, OperationType::Create)
            .destination("orders");
        let mut created = Vec::new();
        for body in ["a", "b"] {
            let span = instrumenter.start_create(&create, Some(body.as_bytes()));
            let mut message = Message::new(body);
            instrumenter.inject(&span, &mut HeaderInjector(&mut message.headers));
            created.push(span.span_context());
            span.end();
            broker.publish("orders", message).unwrap();
        }
        let mut send = MessageDescription::new(MessagingSystem::Embedded, OperationType::Send)
            .destination("orders");
        send.batch_message_count = Some(2);
        instrumenter.start_batch_send(&send, &created).end();
    });

    let deliveries = vec![
        broker.try_receive("orders").unwrap().unwrap(),
        broker.try_receive("orders").unwrap().unwrap(),
    ];
    let receive = MessageDescription::new(MessagingSystem::Embedded, OperationType::Receive)
        .destination("orders");
    instrumenter.start_receive(&receive, &deliveries).end();
    assert_eq!(deliveries[0].description().message_id.as_deref(), Some("1"));

    assert_tree(
        &h.forest(5).await.render(&TreeOptions::normalised()),
        r#"
        trace #1
        nightly export [INTERNAL]
            create orders [PRODUCER] messaging.destination.name="orders" messaging.operation.name="create" messaging.operation.type="create" messaging.system.name="mqtrace"
            create orders [PRODUCER] messaging.destination.name="orders" messaging.operation.name="create" messaging.operation.type="create" messaging.system.name="mqtrace"
            send orders [CLIENT] messaging.batch.message_count=2 messaging.destination.name="orders" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="mqtrace"
                ~> create orders (this trace)
                ~> create orders (this trace)
        trace #2
        receive orders [CLIENT] messaging.destination.name="orders" messaging.operation.name="receive" messaging.operation.type="receive" messaging.system.name="mqtrace"
            ~> create orders (trace #1) messaging.message.id="1"
            ~> create orders (trace #1) messaging.message.id="2"
        "#,
    );
}

/// The start hook and the header allow-list add attributes; nothing else is captured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_and_captured_headers() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| {
        b.conventions(Conventions::V1_45)
            .capture_header("x-tenant")
            .on_start(
                |view: &mqtrace::MessageView<'_>, attrs: &mut Vec<KeyValue>| {
                    if let Some(body) = view.body {
                        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
                            if let Some(id) = v["order_id"].as_i64() {
                                attrs.push(KeyValue::new("app.order_id", id));
                            }
                        }
                    }
                },
            )
    });
    let broker = broker_with(&[("orders", None)]);
    let long_tenant = "t".repeat(300);
    broker
        .publish(
            "orders",
            Message::new(r#"{"order_id":42}"#)
                .header("x-tenant", long_tenant.clone())
                .header("x-secret", "hunter2"),
        )
        .unwrap();
    let consumer = TracedConsumer::new(broker, "orders", instrumenter);
    consumer.run_until_idle(|_| async { Ok(()) }).await.unwrap();
    let spans = h.spans(1).await;
    let process = &spans[0];
    assert_eq!(
        process.attr("app.order_id").and_then(|v| match v {
            mqtrace_testing::AttrValue::Int(i) => Some(*i),
            _ => None,
        }),
        Some(42)
    );
    assert_eq!(
        process
            .attr("messaging.header.x-tenant")
            .and_then(|v| v.as_str()),
        Some(&long_tenant[..mqtrace::MAX_CAPTURED_HEADER_LEN])
    );
    assert!(process.attr("messaging.header.x-secret").is_none());
    assert!(!process
        .attributes
        .keys()
        .any(|k| k.contains("body") && k != "messaging.message.body.size"));
}

/// Every recipe (create, batch send, receive, process, settle, forward) under each
/// setting: names, kinds and the operation attributes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_recipe_under_every_setting() {
    let expected = [
        (
            Conventions::V1_45,
            r#"
            trace #1
            create orders [PRODUCER] messaging.operation.name="create" messaging.operation.type="create"
            trace #2
            send orders [CLIENT] messaging.operation.name="send" messaging.operation.type="send"
                ~> create orders (trace #1)
            trace #3
            receive orders [CLIENT] messaging.operation.name="receive" messaging.operation.type="receive"
                ~> create orders (trace #1) messaging.message.id="1"
            trace #4
            process orders [CONSUMER] messaging.operation.name="process" messaging.operation.type="process"
                ~> create orders (trace #1)
                send orders.dlq [PRODUCER] messaging.operation.name="send" messaging.operation.type="send"
                    ~> create orders (trace #1) mqtrace.link.relationship="original_message"
                    ~> process orders (this trace) mqtrace.link.relationship="processing_attempt"
                ack orders [CLIENT] messaging.operation.name="ack" messaging.operation.type="settle"
            "#,
        ),
        (
            Conventions::Legacy,
            r#"
            trace #1
            orders create [PRODUCER] messaging.operation="create"
            trace #2
            orders publish [CLIENT] messaging.operation="publish"
                ~> orders create (trace #1)
            trace #3
            orders receive [CLIENT] messaging.operation="receive"
                ~> orders create (trace #1) messaging.message.id="1"
            trace #4
            orders deliver [CONSUMER] messaging.operation="deliver"
                ~> orders create (trace #1)
                orders.dlq publish [PRODUCER] messaging.operation="publish"
                    ~> orders create (trace #1) mqtrace.link.relationship="original_message"
                    ~> orders deliver (this trace) mqtrace.link.relationship="processing_attempt"
                orders ack [CLIENT]
            "#,
        ),
        (
            Conventions::Dup,
            r#"
            trace #1
            create orders [PRODUCER] messaging.operation="create" messaging.operation.name="create" messaging.operation.type="create"
            trace #2
            send orders [CLIENT] messaging.operation="publish" messaging.operation.name="send" messaging.operation.type="send"
                ~> create orders (trace #1)
            trace #3
            receive orders [CLIENT] messaging.operation="receive" messaging.operation.name="receive" messaging.operation.type="receive"
                ~> create orders (trace #1) messaging.message.id="1"
            trace #4
            process orders [CONSUMER] messaging.operation="deliver" messaging.operation.name="process" messaging.operation.type="process"
                ~> create orders (trace #1)
                send orders.dlq [PRODUCER] messaging.operation="publish" messaging.operation.name="send" messaging.operation.type="send"
                    ~> create orders (trace #1) mqtrace.link.relationship="original_message"
                    ~> process orders (this trace) mqtrace.link.relationship="processing_attempt"
                ack orders [CLIENT] messaging.operation.name="ack" messaging.operation.type="settle"
            "#,
        ),
    ];
    for (conventions, tree) in expected {
        let h = Harness::start().await;
        let instrumenter = h.instrumenter(|b| {
            b.conventions(conventions)
                .parenting(mqtrace::ProcessParenting::LinkOnly)
        });
        let broker = broker_with(&[("orders", Some("orders.dlq")), ("orders.dlq", None)]);
        let embedded =
            |op| MessageDescription::new(MessagingSystem::Embedded, op).destination("orders");

        let create = instrumenter.start_create(&embedded(OperationType::Create), None);
        let mut message = Message::new("x");
        instrumenter.inject(&create, &mut HeaderInjector(&mut message.headers));
        let created = create.span_context();
        create.end();
        instrumenter
            .start_batch_send(&embedded(OperationType::Send), &[created])
            .end();
        broker.publish("orders", message).unwrap();

        let delivery = broker.try_receive("orders").unwrap().unwrap();
        instrumenter
            .start_receive(
                &embedded(OperationType::Receive),
                std::slice::from_ref(&delivery),
            )
            .end();
        drop(delivery); // back to the queue, for the consumer
        TracedConsumer::new(broker, "orders", instrumenter)
            .settle_spans(true)
            .run_until_idle(|_| async { Err(mqtrace::HandlerError::permanent("bad")) })
            .await
            .unwrap();
        let rendered = h.forest(6).await.render(&TreeOptions::only(&[
            "messaging.operation",
            "messaging.operation.name",
            "messaging.operation.type",
        ]));
        // Status lines are not what this test is about.
        let rendered = rendered.replace(r#" ERROR("bad")"#, "");
        assert_tree(&rendered, tree);
    }
}
