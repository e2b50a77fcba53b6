//! Instrumenting one's own lapin loop: plain `basic_consume` deliveries processed
//! and settled through `DeliveryTracer`, plain `basic_publish` through
//! `ChannelExt::publish_traced`.

use futures_util::StreamExt as _;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use mqtrace::{Disposition, HandlerError, Settlement};
use mqtrace_lapin::{ChannelExt as _, DeliveryTracer, QueueSpec};
use mqtrace_testing::delivery::{Contract, Ledger};
use mqtrace_testing::TreeOptions;

use crate::delivery::seen;
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

/// An own loop coalesces its acks through `AckCoalescer`: deliveries handed to
/// concurrent tasks (their tags recorded in the stream's order), a permanent
/// failure every 25 rejected at once, the acks sent as `multiple` runs. Far
/// fewer ack frames than acked deliveries; through the delivery checker: once
/// the consumer's channel closes nothing is left in the queue, exactly the
/// failures are dead-lettered, and no delivery was acked before its handler
/// succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_loop_coalesces_acks() {
    const MESSAGES: usize = 100;
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let (_connection, channel) = h.channel().await;
    let dlq = h.name("own-acks.dead");
    let queue = QueueSpec::new(h.name("own-acks")).dead_letter(h.name("own-acks.dlx"), &dlq);
    queue.declare(&channel).await.unwrap();
    let ledger = Ledger::new();
    crate::helpers::publish_numbered(&channel, &instrumenter, queue.name(), MESSAGES).await;
    // Handled by concurrent tasks, no order promised: each message its own scope.
    for i in 0..MESSAGES {
        ledger.sent(i.to_string(), i.to_string());
    }
    let (consumer_connection, consumer_channel) = h.channel().await;
    consumer_channel
        .basic_qos(20, lapin::options::BasicQosOptions::default())
        .await
        .unwrap();
    let tracer = std::sync::Arc::new(DeliveryTracer::new(instrumenter, &queue));
    let acks = mqtrace_lapin::AckCoalescer::new(consumer_channel.clone()).prefetch(20);
    let mut deliveries = consumer_channel
        .basic_consume(
            queue.name().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..MESSAGES {
        let delivery = within(30, deliveries.next()).await.unwrap().unwrap();
        acks.arrived(delivery.delivery_tag);
        let (tracer, acks, ledger) = (std::sync::Arc::clone(&tracer), acks.clone(), ledger.clone());
        tasks.spawn(async move {
            let n = crate::helpers::number_of(&delivery.data);
            let id = n.to_string();
            let processed = tracer
                .process(&delivery, |_| {
                    let call = ledger.started(&id);
                    async move {
                        // Later deliveries finish first now and then.
                        tokio::time::sleep(std::time::Duration::from_millis(n % 3)).await;
                        let ok = !n.is_multiple_of(25);
                        call.finished(ok);
                        if ok {
                            Ok(())
                        } else {
                            Err(HandlerError::permanent("bad line"))
                        }
                    }
                })
                .await;
            let settled = tracer.settle_coalesced(processed, delivery, &acks).await;
            seen(&ledger, &id, &settled);
            settled
        });
    }
    let mut dispositions = Vec::new();
    while let Some(settled) = tasks.join_next().await {
        dispositions.push(settled.unwrap().disposition);
    }
    assert_eq!(acks.flush().await, 0);
    let settled = dispositions
        .iter()
        .filter(|d| **d == Disposition::Settle)
        .count();
    assert_eq!(settled, MESSAGES - 4);
    let frames = acks.frames();
    println!("rabbitmq own loop: {frames} ack frames for {settled} acked deliveries");
    assert!((1..50).contains(&frames), "{frames} ack frames");
    drop(deliveries);
    consumer_channel.close(200, "done".into()).await.unwrap();
    consumer_connection.close(200, "done".into()).await.unwrap();
    ledger.waiting(
        drain(&channel, queue.name())
            .await
            .iter()
            .map(|d| crate::helpers::number_of(&d.data).to_string()),
    );
    let dead = crate::helpers::drain_numbers(&channel, &dlq, 4).await;
    ledger.dead_lettered(dead.iter().cloned());
    let a = ledger.check(
        "rabbitmq own loop, coalesced acks",
        Contract::at_least_once().duplicates(0),
    );
    assert_eq!(a.processed as usize, settled);
    assert_eq!(a.waiting, 0, "every delivery was acknowledged");
    assert_eq!((a.failed_attempts, a.dead_lettered), (4, 4));
    assert_eq!(dead, ["0", "25", "50", "75"]);
}
