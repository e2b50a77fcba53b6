//! The batch processing helper: one batch span linking every message, a child span
//! per message, counts, Error status when any failed, outcomes in order.

use mqtrace::embedded::{Message, TracedProducer};
use mqtrace::{Conventions, HandlerError, MessageDescription, MessagingSystem, OperationType};
use mqtrace_testing::TreeOptions;

use crate::helpers::{assert_tree, broker_with, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_span_links_every_message_and_counts_outcomes() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b.conventions(Conventions::V1_45));
    let broker = broker_with(&[("orders", None)]);
    let producer = TracedProducer::new(broker.clone(), instrumenter.clone());
    for body in ["a", "b", "c"] {
        producer.send("orders", Message::new(body)).await.unwrap();
    }
    let deliveries: Vec<_> = (0..3)
        .map(|_| broker.try_receive("orders").unwrap().unwrap())
        .collect();
    let batch = MessageDescription::new(MessagingSystem::Embedded, OperationType::Process)
        .destination("orders");
    let report = instrumenter
        .process_batch(&batch, &deliveries, |d| {
            let bad = &d.message().body[..] == b"b";
            async move {
                if bad {
                    Err(HandlerError::permanent("bad"))
                } else {
                    Ok(())
                }
            }
        })
        .await;
    assert_eq!((report.succeeded, report.failed), (2, 1));
    let outcomes: Vec<bool> = report.outcomes.iter().map(Result::is_ok).collect();
    assert_eq!(outcomes, [true, false, true], "outcomes in message order");

    assert_tree(
        &h.forest(7).await.render(&TreeOptions::only(&[
            "error.type",
            "messaging.batch.message_count",
            "mqtrace.batch.failed_count",
            "mqtrace.batch.succeeded_count",
            "messaging.message.id",
        ])),
        r#"
        trace #1
        send orders [PRODUCER] messaging.message.id="1"
        trace #2
        send orders [PRODUCER] messaging.message.id="2"
        trace #3
        send orders [PRODUCER] messaging.message.id="3"
        trace #4
        process orders [CONSUMER] ERROR("1 of 3 messages failed") error.type="_OTHER" messaging.batch.message_count=3 mqtrace.batch.failed_count=1 mqtrace.batch.succeeded_count=2
            ~> send orders (trace #1) messaging.message.id="1"
            ~> send orders (trace #2) messaging.message.id="2"
            ~> send orders (trace #3) messaging.message.id="3"
            process orders [CONSUMER] messaging.message.id="1"
                ~> send orders (trace #1)
            process orders [CONSUMER] ERROR("bad") error.type="_OTHER" messaging.message.id="2"
                ~> send orders (trace #2)
            process orders [CONSUMER] messaging.message.id="3"
                ~> send orders (trace #3)
        "#,
    );
}
