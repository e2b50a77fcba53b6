//! Instrumenting one's own SQS receive loop: the SDK's messages processed and
//! settled through `MessageTracer`, sent through `SendMessageExt::send_traced`.

use aws_sdk_sqs::types::MessageSystemAttributeName;
use mqtrace::{Disposition, HandlerError, Settlement};
use mqtrace_aws_sqs::{MessageTracer, SendMessageExt as _};
use mqtrace_testing::delivery::{Contract, Ledger, Settled};
use mqtrace_testing::TreeOptions;

use crate::helpers::{assert_tree, within, Harness};

/// The own-loop level (`MessageTracer::process`, then `settle` per message):
/// one message handled, one failing permanently and forwarded to the
/// dead-letter queue, both deleted; the run accounted by the delivery checker
/// with each settlement as the loop saw it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_loop_gets_process_and_delete_spans_and_the_core_decides() {
    let h = Harness::start().await;
    let queue = h.queue("own", &[]).await;
    let dead = h.queue("own-dead", &[]).await;
    let instrumenter = h.instrumenter(|b| b.settle_spans(true));
    let ledger = Ledger::new();
    for body in [r#"{"ok":true}"#, "{not json"] {
        h.client
            .send_message()
            .queue_url(&queue)
            .message_body(body)
            .send_traced(&instrumenter)
            .await
            .unwrap();
        // A standard queue: no order promised, each message its own scope.
        ledger.sent(body, body);
    }

    let tracer =
        MessageTracer::new(h.client.clone(), &queue, &instrumenter).dead_letter_queue(&dead);
    let mut settled = Vec::new();
    while settled.len() < 2 {
        let out = within(
            30,
            h.client
                .receive_message()
                .queue_url(&queue)
                .max_number_of_messages(1)
                .wait_time_seconds(1)
                .message_attribute_names("All")
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .send(),
        )
        .await
        .unwrap();
        for message in out.messages() {
            let body = message.body().unwrap_or_default();
            let processed = tracer
                .process(message, |attempt| {
                    assert_eq!(attempt.number(), 1);
                    let invocation = ledger.started(body);
                    async {
                        let parsed = serde_json::from_str::<serde_json::Value>(body);
                        invocation.finished(parsed.is_ok());
                        parsed.map_err(|e| HandlerError::permanent(e).with_type("invalid_json"))?;
                        Ok(())
                    }
                })
                .await;
            let s = tracer.settle(processed, message).await;
            // A delete made: after the handler's success, or after the dead
            // letter's copy was accepted.
            if s.settlement == Settlement::Ack && !s.settle_failed {
                let how = match s.disposition {
                    Disposition::DeadLetter => Settled::Forwarded,
                    _ => Settled::Done,
                };
                ledger.settled(body, how);
            }
            settled.push(s);
        }
    }
    let what: Vec<_> = settled
        .iter()
        .map(|s| (s.disposition, s.settlement))
        .collect();
    assert_eq!(
        what,
        [
            (Disposition::Settle, Settlement::Ack),
            (Disposition::DeadLetter, Settlement::Ack),
        ]
    );
    let left = h.drain(&queue).await;
    let dead_letters = h.drain(&dead).await;
    let bodies = |ms: &[aws_sdk_sqs::types::Message]| -> Vec<String> {
        ms.iter()
            .filter_map(|m| m.body().map(str::to_owned))
            .collect()
    };
    ledger.waiting(bodies(&left));
    ledger.dead_lettered(bodies(&dead_letters));
    let a = ledger.check(
        "sqs own loop, settled per message",
        Contract::at_least_once().duplicates(0),
    );
    assert_eq!(a.waiting, 0, "both deleted");
    assert_eq!(a.dead_lettered, 1);
    assert_eq!(dead_letters[0].body(), Some("{not json"));

    assert_tree(
        &h.render(
            7,
            TreeOptions::only(&[
                "error.type",
                "messaging.operation.name",
                "mqtrace.message.disposition",
            ]),
        )
        .await,
        r#"
        trace #1
        send own-RUN [PRODUCER] messaging.operation.name="send"
            process own-RUN [CONSUMER] messaging.operation.name="process" mqtrace.message.disposition="settled"
                ~> send own-RUN (this trace)
                delete own-RUN [CLIENT] messaging.operation.name="delete"
        trace #2
        send own-RUN [PRODUCER] messaging.operation.name="send"
            process own-RUN [CONSUMER] ERROR("key must be a string at line 1 column 2") error.type="invalid_json" messaging.operation.name="process" mqtrace.message.disposition="dead_lettered"
                ~> send own-RUN (this trace)
                send own-dead-RUN [PRODUCER] messaging.operation.name="send" mqtrace.message.disposition="dead_lettered"
                    ~> send own-RUN (this trace) mqtrace.link.relationship="original_message"
                    ~> process own-RUN (this trace) mqtrace.link.relationship="processing_attempt"
                delete own-RUN [CLIENT] messaging.operation.name="delete"
        "#,
    );
    assert_tree(
        &h.metrics(&[], &["server.port"]).await,
        r#"
        messaging.client.consumed.messages [{message}] Counter value=2 messaging.destination.name="own-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="aws.sqs" server.address="127.0.0.1"
        messaging.client.operation.duration [s] Histogram count=1 buckets=messaging messaging.destination.name="own-dead-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="aws.sqs" server.address="127.0.0.1"
        messaging.client.operation.duration [s] Histogram count=2 buckets=messaging messaging.destination.name="own-RUN" messaging.operation.name="delete" messaging.operation.type="settle" messaging.system.name="aws.sqs" server.address="127.0.0.1"
        messaging.client.operation.duration [s] Histogram count=2 buckets=messaging messaging.destination.name="own-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="aws.sqs" server.address="127.0.0.1"
        messaging.client.sent.messages [{message}] Counter value=1 messaging.destination.name="own-dead-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="aws.sqs" server.address="127.0.0.1"
        messaging.client.sent.messages [{message}] Counter value=2 messaging.destination.name="own-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="aws.sqs" server.address="127.0.0.1"
        messaging.process.duration [s] Histogram count=1 buckets=messaging error.type="invalid_json" messaging.destination.name="own-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="aws.sqs" server.address="127.0.0.1"
        messaging.process.duration [s] Histogram count=1 buckets=messaging messaging.destination.name="own-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="aws.sqs" server.address="127.0.0.1"
        mqtrace.message.dispositions [{message}] Counter value=1 messaging.destination.name="own-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="aws.sqs" mqtrace.message.disposition="dead_lettered" server.address="127.0.0.1"
        mqtrace.message.dispositions [{message}] Counter value=1 messaging.destination.name="own-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="aws.sqs" mqtrace.message.disposition="settled" server.address="127.0.0.1"
        mqtrace.message.queue.duration [s] Histogram count=2 buckets=messaging messaging.destination.name="own-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="aws.sqs" server.address="127.0.0.1"
        "#,
    );
}

/// An own loop deletes a receive's messages together: each settled with
/// `settle_batched` into one `DeleteBatch`, deleted by `delete_batch` once the
/// receive's last message is settled. Nothing is left in the queue after the
/// visibility timeout; a message settled by leaving it (a transient failure) is
/// not in the batch and comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_loop_deletes_a_receive_with_one_batch_call() {
    let h = Harness::start().await;
    let queue = h
        .queue(
            "own-batch",
            &[(
                aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout,
                "1".into(),
            )],
        )
        .await;
    let instrumenter = h.instrumenter(|b| b);
    h.send_numbered(&queue, 4, &instrumenter).await;
    let tracer = MessageTracer::new(h.client.clone(), &queue, &instrumenter);
    let (mut settled, mut failed_once) = (0, false);
    while settled < 4 {
        let out = within(
            30,
            h.client
                .receive_message()
                .queue_url(&queue)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .message_attribute_names("All")
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .send(),
        )
        .await
        .unwrap();
        let batch = mqtrace_aws_sqs::DeleteBatch::new();
        let mut deleted_here = 0;
        for message in out.messages() {
            // "3" fails once: left on the queue, so not in the batch.
            let fail = message.body() == Some("3") && !failed_once;
            let processed = tracer
                .process(message, |_| async move {
                    if fail {
                        Err(HandlerError::transient("later"))
                    } else {
                        Ok(())
                    }
                })
                .await;
            match tracer
                .settle_batched(processed, message, &batch)
                .await
                .disposition
            {
                Disposition::Settle => deleted_here += 1,
                Disposition::Retry => failed_once = true,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(batch.len(), deleted_here);
        assert_eq!(
            tracer.delete_batch(batch).await,
            0,
            "every delete went through"
        );
        settled += deleted_here;
    }
    assert!(failed_once);
    // Anything not deleted would be visible again by now.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    assert!(
        h.drain(&queue).await.is_empty(),
        "every message was deleted"
    );
}
