//! Outcomes on the SQS emulator: redelivery after the visibility timeout, dead
//! letters with metadata, and the queue's own redrive policy.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName};
use mqtrace::forward::{ATTEMPT_HEADER, ERROR_TYPE_HEADER, FAILED_AT_HEADER};
use mqtrace::{HandlerError, HandlerResult};
use mqtrace_aws_sqs::{MessageAttributesExtractor, TracedConsumer, TracedSqs};
use mqtrace_testing::delivery::{Contract, Ledger};
use mqtrace_testing::TreeOptions;
use opentelemetry::propagation::Extractor;

use crate::helpers::{assert_tree, when_count, within, Harness};

/// The bodies of `messages`, for the delivery checker.
fn bodies(messages: &[aws_sdk_sqs::types::Message]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|m| m.body().map(str::to_owned))
        .collect()
}

const OUTCOME: &[&str] = &[
    "error.type",
    "mqtrace.message.attempt",
    "mqtrace.message.disposition",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failure_is_redelivered_after_the_visibility_timeout() {
    let h = Harness::start().await;
    let url = h
        .queue(
            "payments",
            &[(QueueAttributeName::VisibilityTimeout, "1".into())],
        )
        .await;
    let instrumenter = h.instrumenter(|b| b);
    TracedSqs::new(h.client.clone(), instrumenter.clone())
        .send(h.client.send_message().queue_url(&url).message_body("7"))
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let stats = within(
        30,
        TracedConsumer::new(h.client.clone(), &url, &instrumenter)
            .wait_time_seconds(1)
            .receive_spans(false, false)
            .run_until(
                move |_| {
                    let n = counted.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if n == 0 {
                            Err(HandlerError::transient("gateway timeout").with_type("timeout"))
                        } else {
                            Ok(())
                        }
                    }
                },
                when_count(&calls, 2),
            ),
    )
    .await
    .unwrap();
    assert_eq!((stats.retried, stats.settled), (1, 1));
    assert!(h.drain(&url).await.is_empty());
    assert_tree(
        &h.render(3, TreeOptions::only(OUTCOME)).await,
        r#"
        trace #1
        send payments-RUN [PRODUCER]
            process payments-RUN [CONSUMER] ERROR("gateway timeout") error.type="timeout" mqtrace.message.attempt=1 mqtrace.message.disposition="retried"
                ~> send payments-RUN (this trace)
            process payments-RUN [CONSUMER] mqtrace.message.attempt=2 mqtrace.message.disposition="settled"
                ~> send payments-RUN (this trace)
        "#,
    );
    assert_tree(
        &h.metrics(&[], &["server.port"]).await,
        r#"
        messaging.client.consumed.messages [{message}] Counter value=2 messaging.destination.name="payments-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="aws.sqs" server.address="127.0.0.1"
        messaging.client.operation.duration [s] Histogram count=1 buckets=messaging messaging.destination.name="payments-RUN" messaging.operation.name="delete" messaging.operation.type="settle" messaging.system.name="aws.sqs" server.address="127.0.0.1"
        messaging.client.operation.duration [s] Histogram count=1 buckets=messaging messaging.destination.name="payments-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="aws.sqs" server.address="127.0.0.1"
        messaging.client.sent.messages [{message}] Counter value=1 messaging.destination.name="payments-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="aws.sqs" server.address="127.0.0.1"
        messaging.process.duration [s] Histogram count=1 buckets=messaging error.type="timeout" messaging.destination.name="payments-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="aws.sqs" server.address="127.0.0.1"
        messaging.process.duration [s] Histogram count=1 buckets=messaging messaging.destination.name="payments-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="aws.sqs" server.address="127.0.0.1"
        mqtrace.message.dispositions [{message}] Counter value=1 messaging.destination.name="payments-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="aws.sqs" mqtrace.message.disposition="retried" server.address="127.0.0.1"
        mqtrace.message.dispositions [{message}] Counter value=1 messaging.destination.name="payments-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="aws.sqs" mqtrace.message.disposition="settled" server.address="127.0.0.1"
        mqtrace.message.queue.duration [s] Histogram count=2 buckets=messaging messaging.destination.name="payments-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="aws.sqs" server.address="127.0.0.1"
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_goes_to_the_dead_letter_queue_with_metadata() {
    let h = Harness::start().await;
    let url = h.queue("orders", &[]).await;
    let dlq = h.queue("orders-dead", &[]).await;
    let instrumenter = h.instrumenter(|b| b);
    let body = "{not json \u{1F4E6}";
    let tenant = MessageAttributeValue::builder()
        .data_type("String")
        .string_value("acme")
        .build()
        .unwrap();
    TracedSqs::new(h.client.clone(), instrumenter.clone())
        .send(
            h.client
                .send_message()
                .queue_url(&url)
                .message_body(body)
                .message_attributes("x-tenant", tenant),
        )
        .await
        .unwrap();
    let ledger = Ledger::new();
    ledger.sent(body, "");
    let calls = Arc::new(AtomicUsize::new(0));
    let (counted, recording) = (Arc::clone(&calls), ledger.clone());
    let stats = within(
        30,
        TracedConsumer::new(h.client.clone(), &url, &instrumenter)
            .dead_letter_queue(&dlq)
            .wait_time_seconds(1)
            .receive_spans(false, false)
            .run_until(
                move |m| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let invocation = recording.started(m.body());
                    async move {
                        let parsed = m.json::<serde_json::Value>();
                        invocation.finished(parsed.is_ok());
                        parsed?;
                        HandlerResult::Ok(())
                    }
                },
                when_count(&calls, 1),
            ),
    )
    .await
    .unwrap();
    assert_eq!(stats.dead_lettered, 1);
    ledger.waiting(bodies(&h.drain(&url).await));
    let dead = h.drain(&dlq).await;
    ledger.dead_lettered(bodies(&dead));
    let a = ledger.check(
        "sqs permanent failure, full consumer",
        Contract::at_least_once().duplicates(0),
    );
    assert_eq!(a.waiting, 0, "deleted from the source");
    assert_eq!((a.dead_lettered, a.failed_attempts), (1, 1));
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.body(), Some(body));
    let attrs = d.message_attributes().unwrap();
    let e = MessageAttributesExtractor(attrs);
    assert_eq!(e.get(ERROR_TYPE_HEADER), Some("invalid_json"));
    assert_eq!(e.get(ATTEMPT_HEADER), Some("1"));
    assert!(e.get(FAILED_AT_HEADER).is_some());
    assert_eq!(e.get("x-tenant"), Some("acme"));
    assert!(attrs.len() <= 10);
    assert!(d
        .attributes()
        .and_then(|a| a.get(&MessageSystemAttributeName::AwsTraceHeader))
        .is_some());
    assert_tree(
        &h.render(3, TreeOptions::only(&["mqtrace.message.disposition"]))
            .await,
        r#"
        trace #1
        send orders-RUN [PRODUCER]
            process orders-RUN [CONSUMER] ERROR("key must be a string at line 1 column 2") mqtrace.message.disposition="dead_lettered"
                ~> send orders-RUN (this trace)
                send orders-dead-RUN [PRODUCER] mqtrace.message.disposition="dead_lettered"
                    ~> send orders-RUN (this trace) mqtrace.link.relationship="original_message"
                    ~> process orders-RUN (this trace) mqtrace.link.relationship="processing_attempt"
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_policy_moves_a_failing_message_to_the_queues_dlq() {
    let h = Harness::start().await;
    let dlq = h.queue("redrive-dead", &[]).await;
    let dlq_arn = h
        .client
        .get_queue_attributes()
        .queue_url(&dlq)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()[&QueueAttributeName::QueueArn]
        .clone();
    let policy = format!(r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"2"}}"#);
    let url = h
        .queue(
            "redrive",
            &[
                (QueueAttributeName::RedrivePolicy, policy),
                (QueueAttributeName::VisibilityTimeout, "1".into()),
            ],
        )
        .await;
    let instrumenter = h.instrumenter(|b| b);
    TracedSqs::new(h.client.clone(), instrumenter.clone())
        .send(
            h.client
                .send_message()
                .queue_url(&url)
                .message_body("poison"),
        )
        .await
        .unwrap();
    let ledger = Ledger::new();
    ledger.sent("poison", "");
    let calls = Arc::new(AtomicUsize::new(0));
    let (counted, recording) = (Arc::clone(&calls), ledger.clone());
    // No dead-letter queue on the consumer: transient failures are left to SQS.
    let consumer = TracedConsumer::new(h.client.clone(), &url, &instrumenter)
        .wait_time_seconds(1)
        .receive_spans(false, false);
    let stats = within(
        30,
        consumer.run_until(
            move |m| {
                counted.fetch_add(1, Ordering::SeqCst);
                recording.started(m.body()).finished(false);
                async { Err(HandlerError::transient("still down")) }
            },
            // Two failed receives, then one more poll for SQS to redrive it.
            async {
                when_count(&calls, 2).await;
                tokio::time::sleep(Duration::from_millis(2500)).await;
            },
        ),
    )
    .await
    .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "maxReceiveCount receives");
    assert_eq!(
        (stats.retried, stats.dropped, stats.dead_lettered),
        (2, 0, 0)
    );
    let dead = h.drain(&dlq).await;
    ledger.dead_lettered(bodies(&dead));
    ledger.waiting(bodies(&h.drain(&url).await));
    let a = ledger.check(
        "sqs redrive policy, failing transiently",
        Contract::at_least_once(),
    );
    assert_eq!((a.dead_lettered, a.waiting), (1, 0), "in the queue's DLQ");
    assert_eq!(dead[0].body(), Some("poison"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_spans_when_asked() {
    let h = Harness::start().await;
    let url = h.queue("deleted", &[]).await;
    let instrumenter = h.instrumenter(|b| b);
    TracedSqs::new(h.client.clone(), instrumenter.clone())
        .send(h.client.send_message().queue_url(&url).message_body("x"))
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    within(
        30,
        TracedConsumer::new(h.client.clone(), &url, &instrumenter)
            .wait_time_seconds(1)
            .receive_spans(false, false)
            .settle_spans(true)
            .run_until(
                move |_| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async { HandlerResult::Ok(()) }
                },
                when_count(&calls, 1),
            ),
    )
    .await
    .unwrap();
    assert_tree(
        &h.render(3, TreeOptions::only(&["messaging.operation.type"]))
            .await,
        r#"
        trace #1
        send deleted-RUN [PRODUCER] messaging.operation.type="send"
            process deleted-RUN [CONSUMER] messaging.operation.type="process"
                ~> send deleted-RUN (this trace)
                delete deleted-RUN [CLIENT] messaging.operation.type="settle"
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_a_transient_failure_and_the_consumer_goes_on() {
    let h = Harness::start().await;
    let url = h
        .queue(
            "panics",
            &[(QueueAttributeName::VisibilityTimeout, "1".into())],
        )
        .await;
    let instrumenter = h.instrumenter(|b| b);
    TracedSqs::new(h.client.clone(), instrumenter.clone())
        .send(h.client.send_message().queue_url(&url).message_body("x"))
        .await
        .unwrap();
    let ledger = Ledger::new();
    ledger.sent("x", "");
    let calls = Arc::new(AtomicUsize::new(0));
    let (counted, recording) = (Arc::clone(&calls), ledger.clone());
    let stats = within(
        30,
        TracedConsumer::new(h.client.clone(), &url, &instrumenter)
            .wait_time_seconds(1)
            .receive_spans(false, false)
            .run_until(
                move |m| {
                    let n = counted.fetch_add(1, Ordering::SeqCst);
                    let invocation = recording.started(m.body());
                    async move {
                        if n == 0 {
                            // A panic is a failed invocation: recorded as it
                            // happens, then the handler blows up.
                            invocation.finished(false);
                            panic!("first attempt blows up");
                        }
                        invocation.finished(true);
                        HandlerResult::Ok(())
                    }
                },
                when_count(&calls, 2),
            ),
    )
    .await
    .unwrap();
    assert_eq!((stats.retried, stats.settled), (1, 1));
    ledger.waiting(bodies(&h.drain(&url).await));
    let a = ledger.check(
        "sqs panicking handler, retried after the visibility timeout",
        Contract::at_least_once().duplicates(0),
    );
    assert_eq!((a.processed, a.failed_attempts, a.waiting), (1, 1, 0));
    let spans = h.spans(3).await;
    let panicked = spans
        .iter()
        .filter(|s| s.attr("error.type").and_then(|v| v.as_str()) == Some("panic"))
        .count();
    assert_eq!(panicked, 1);
}

/// A consumer of a queue that does not exist stops with SQS's error instead of
/// polling forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_queue_stops_the_consumer_with_an_error() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let url = h.queue("exists-briefly", &[]).await;
    h.client
        .delete_queue()
        .queue_url(&url)
        .send()
        .await
        .unwrap();
    let outcome = within(
        30,
        TracedConsumer::new(h.client.clone(), &url, &instrumenter)
            .wait_time_seconds(1)
            .run_until(
                |_| async { HandlerResult::Ok(()) },
                std::future::pending::<()>(),
            ),
    )
    .await;
    match outcome {
        Err(mqtrace_aws_sqs::ConsumeError::Refused { code, stats, .. }) => {
            assert!(
                code.contains("NonExistentQueue") || code.contains("QueueDoesNotExist"),
                "{code}"
            );
            assert_eq!((stats.settled, stats.receive_failures), (0, 1));
        }
        other => panic!("expected the consumer to be refused, got {other:?}"),
    }
}

/// With receive spans (the consumer's default) each message is counted as
/// consumed once, by the receive it arrived in (`messaging.operation.name =
/// receive`), and not again when it is processed, as the conventions ask; a
/// transient failure's redelivery arrives in a receive of its own and counts
/// again. Without receive spans the count moves to processing (the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumed_messages_are_counted_at_receive_once() {
    let h = Harness::start().await;
    let url = h
        .queue(
            "ledger",
            &[(QueueAttributeName::VisibilityTimeout, "1".into())],
        )
        .await;
    let instrumenter = h.instrumenter(|b| b);
    h.send_numbered(&url, 3, &instrumenter).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let stats = within(
        30,
        TracedConsumer::new(h.client.clone(), &url, &instrumenter)
            .wait_time_seconds(1)
            .run_until(
                move |m| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let first_try_of_zero = m.body() == "0" && m.attempt() == 1;
                    async move {
                        if first_try_of_zero {
                            Err(HandlerError::transient("ledger locked"))
                        } else {
                            Ok(())
                        }
                    }
                },
                when_count(&calls, 4),
            ),
    )
    .await
    .unwrap();
    assert_eq!((stats.settled, stats.retried), (3, 1));
    assert_tree(
        &h.metrics(&["messaging.client.consumed.messages"], &["server.port"])
            .await,
        r#"
        messaging.client.consumed.messages [{message}] Counter value=4 messaging.destination.name="ledger-RUN" messaging.operation.name="receive" messaging.operation.type="receive" messaging.system.name="aws.sqs" server.address="127.0.0.1"
        "#,
    );
}

/// The deletes of one receive go together in one `DeleteMessageBatch`: six
/// messages, one dead-lettered (forwarded, then deleted) and one failing once
/// (left for redelivery, deleted when it succeeds), end with every message
/// deleted in a few batch calls, none left in the queue once its visibility
/// timeout has passed, and exactly the dead letter in the dead-letter queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receives_deletes_go_in_one_batch() {
    let h = Harness::start().await;
    let url = h
        .queue(
            "batched",
            &[(QueueAttributeName::VisibilityTimeout, "1".into())],
        )
        .await;
    let dlq = h.queue("batched-dead", &[]).await;
    let instrumenter = h.instrumenter(|b| b);
    h.send_numbered(&url, 6, &instrumenter).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let consumer = TracedConsumer::new(h.client.clone(), &url, &instrumenter)
        .dead_letter_queue(&dlq)
        .wait_time_seconds(1);
    let stats = within(
        30,
        consumer.run_until(
            move |m| {
                counted.fetch_add(1, Ordering::SeqCst);
                let outcome = match (m.body(), m.attempt()) {
                    ("4", 1) => Err(HandlerError::transient("busy")),
                    ("5", _) => Err(HandlerError::permanent("bad line")),
                    _ => Ok(()),
                };
                async move { outcome }
            },
            when_count(&calls, 7),
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        (
            stats.settled,
            stats.retried,
            stats.dead_lettered,
            stats.settle_failures
        ),
        (5, 1, 1, 0)
    );
    let requests = consumer.delete_requests();
    println!("sqs batched deletes: 6 messages deleted with {requests} DeleteMessageBatch calls");
    assert!(
        (1..=3).contains(&requests),
        "{requests} batch calls for 6 deletes"
    );
    // Anything not deleted would be visible again by now.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(h.drain(&url).await.is_empty(), "every message was deleted");
    let dead: Vec<_> = h
        .drain(&dlq)
        .await
        .iter()
        .filter_map(|m| m.body().map(str::to_owned))
        .collect();
    assert_eq!(dead, ["5"]);
}
