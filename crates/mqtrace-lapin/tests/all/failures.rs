//! Outcomes on a real RabbitMQ: invalid JSON rejected to the dead-letter exchange,
//! transient failures retried within the budget, and the budget's end.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use mqtrace::forward::{
    ATTEMPT_HEADER, ERROR_MESSAGE_HEADER, ERROR_TYPE_HEADER, FAILED_AT_HEADER,
    ORIGINAL_TRACEPARENT_HEADER,
};
use mqtrace::{HandlerError, HandlerResult};
use mqtrace_lapin::{FieldTableExtractor, QueueSpec, TracedConsumer, TracedPublisher};
use mqtrace_testing::delivery::{Contract, Ledger};
use mqtrace_testing::{SpanStatus, TreeOptions};
use opentelemetry::propagation::Extractor;

use crate::helpers::{assert_tree, drain, drain_at_least, when_count, within, Harness};

const OUTCOME: &[&str] = &[
    "error.type",
    "mqtrace.error.retryable",
    "mqtrace.message.attempt",
    "mqtrace.message.disposition",
];

/// A delivery's body as the ledger's id.
fn body_of(d: &lapin::message::Delivery) -> String {
    String::from_utf8_lossy(&d.data).into_owned()
}

fn header(d: &lapin::message::Delivery, key: &str) -> Option<String> {
    let headers = d.properties.headers().as_ref()?;
    FieldTableExtractor(headers).get(key).map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_is_rejected_to_the_dead_letter_queue() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let (_connection, channel) = h.channel().await;
    let (dlx, dlq) = (h.name("orders.dlx"), h.name("orders.dead"));
    let queue = QueueSpec::new(h.name("orders")).dead_letter(&dlx, &dlq);
    queue.declare(&channel).await.unwrap();
    TracedPublisher::new(channel.clone(), instrumenter.clone())
        .publish(
            "".into(),
            queue.name().into(),
            BasicPublishOptions::default(),
            b"{not json",
            BasicProperties::default(),
        )
        .await
        .unwrap();

    let ledger = Ledger::new();
    ledger.sent("{not json", "");

    let recording = ledger.clone();
    let stats = within(
        30,
        TracedConsumer::new(&h.url, queue.clone(), instrumenter).run_until(
            move |message| {
                let call = recording.started(String::from_utf8_lossy(message.body()));
                async move {
                    let parsed = message.json::<serde_json::Value>();
                    call.finished(parsed.is_ok());
                    parsed?;
                    HandlerResult::Ok(())
                }
            },
            // Long enough for a redelivery to show up, were there one.
            async { tokio::time::sleep(std::time::Duration::from_millis(500)).await },
        ),
    )
    .await
    .unwrap();
    assert_eq!((stats.dead_lettered, stats.retried), (1, 0));
    let waiting = drain(&channel, queue.name()).await;
    ledger.waiting(waiting.iter().map(body_of));
    let dead = drain_at_least(&channel, &dlq, 1).await;
    ledger.dead_lettered(dead.iter().map(body_of));
    let a = ledger.check(
        "rabbitmq permanent failure (invalid JSON)",
        Contract::at_least_once().duplicates(0),
    );
    // One invocation, failed, never redelivered: the message is in the
    // dead-letter queue and nowhere else.
    assert_eq!(
        (a.processed, a.failed_attempts, a.waiting, a.dead_lettered),
        (0, 1, 0, 1)
    );
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].data, b"{not json");
    // The broker's own record of the rejection.
    let death = dead[0].properties.headers().as_ref().unwrap();
    assert!(death.contains_key("x-death"), "{death:?}");

    let spans = h.spans(2).await;
    let process = spans
        .iter()
        .find(|s| s.name.starts_with("process"))
        .unwrap();
    assert!(matches!(process.status, SpanStatus::Error(_)));
    assert_tree(
        &mqtrace_testing::Forest::new(spans)
            .render(&TreeOptions::only(OUTCOME))
            .replace(&h.run, "RUN"),
        r#"
        trace #1
        send orders-RUN [PRODUCER]
            process orders-RUN [CONSUMER] ERROR("key must be a string at line 1 column 2") error.type="invalid_json" mqtrace.error.retryable=false mqtrace.message.attempt=1 mqtrace.message.disposition="dead_lettered"
                ~> send orders-RUN (this trace)
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_then_succeed_in_one_trace() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let (_connection, channel) = h.channel().await;
    let queue = QueueSpec::new(h.name("payments")).dead_letter(h.name("p.dlx"), h.name("p.dead"));
    queue.declare(&channel).await.unwrap();
    TracedPublisher::new(channel.clone(), instrumenter.clone())
        .publish_json("", queue.name(), &7, BasicProperties::default())
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let stats = within(
        30,
        TracedConsumer::new(&h.url, queue.clone(), instrumenter).run_until(
            move |_| {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < 2 {
                        Err(HandlerError::transient("gateway timeout").with_type("timeout"))
                    } else {
                        Ok(())
                    }
                }
            },
            when_count(&calls, 3),
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        (stats.retried, stats.settled, stats.dead_lettered),
        (2, 1, 0)
    );
    assert!(drain(&channel, queue.name()).await.is_empty());
    assert_tree(
        &h.render(6, TreeOptions::only(OUTCOME)).await,
        r#"
        trace #1
        send payments-RUN [PRODUCER]
            process payments-RUN [CONSUMER] ERROR("gateway timeout") error.type="timeout" mqtrace.error.retryable=true mqtrace.message.attempt=1 mqtrace.message.disposition="retried"
                ~> send payments-RUN (this trace)
                send payments-RUN [PRODUCER] mqtrace.message.attempt=1 mqtrace.message.disposition="retried"
                    ~> send payments-RUN (this trace) mqtrace.link.relationship="original_message"
                    ~> process payments-RUN (this trace) mqtrace.link.relationship="processing_attempt"
                    process payments-RUN [CONSUMER] ERROR("gateway timeout") error.type="timeout" mqtrace.error.retryable=true mqtrace.message.attempt=2 mqtrace.message.disposition="retried"
                        ~> send payments-RUN (this trace)
                        send payments-RUN [PRODUCER] mqtrace.message.attempt=2 mqtrace.message.disposition="retried"
                            ~> send payments-RUN (this trace) mqtrace.link.relationship="original_message"
                            ~> process payments-RUN (this trace) mqtrace.link.relationship="processing_attempt"
                            process payments-RUN [CONSUMER] mqtrace.message.attempt=3 mqtrace.message.disposition="settled"
                                ~> send payments-RUN (this trace)
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_spent_goes_to_the_dead_letter_exchange_with_metadata() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let (_connection, channel) = h.channel().await;
    let dlq = h.name("mail.dead");
    let queue = QueueSpec::new(h.name("mail")).dead_letter(h.name("mail.dlx"), &dlq);
    queue.declare(&channel).await.unwrap();
    // Not UTF-8: must arrive byte for byte.
    let body = b"\x00\xffletter\xfe".to_vec();
    TracedPublisher::new(channel.clone(), instrumenter.clone())
        .publish(
            "".into(),
            queue.name().into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default().with_headers({
                let mut t = lapin::types::FieldTable::default();
                t.insert(
                    "x-tenant".into(),
                    lapin::types::AMQPValue::LongString("acme".into()),
                );
                t
            }),
        )
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let stats = within(
        30,
        TracedConsumer::new(&h.url, queue.clone(), instrumenter).run_until(
            move |_| {
                counted.fetch_add(1, Ordering::SeqCst);
                async { Err(HandlerError::transient("smtp down").with_type("smtp")) }
            },
            when_count(&calls, 3),
        ),
    )
    .await
    .unwrap();
    assert_eq!((stats.retried, stats.dead_lettered), (2, 1));
    assert!(drain(&channel, queue.name()).await.is_empty());
    let dead = drain_at_least(&channel, &dlq, 1).await;
    assert_eq!(dead.len(), 1, "exactly one dead letter");
    let d = &dead[0];
    assert_eq!(d.data, body);
    assert_eq!(header(d, ATTEMPT_HEADER).as_deref(), Some("3"));
    assert_eq!(header(d, ERROR_TYPE_HEADER).as_deref(), Some("smtp"));
    assert_eq!(
        header(d, ERROR_MESSAGE_HEADER).as_deref(),
        Some("smtp down")
    );
    assert!(header(d, FAILED_AT_HEADER).is_some());
    assert_eq!(header(d, "x-tenant").as_deref(), Some("acme"));
    assert!(header(d, "traceparent").is_some());
    let original = header(d, ORIGINAL_TRACEPARENT_HEADER).unwrap();

    let spans = h.spans(7).await;
    let send = spans.iter().find(|s| s.parent_span_id.is_none()).unwrap();
    assert!(
        original.contains(&send.trace_id),
        "{original} names the first send"
    );
    let disposition = |s: &&mqtrace_testing::RecordedSpan| {
        s.attr("mqtrace.message.disposition")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let mut dead_lettered: Vec<_> = spans
        .iter()
        .filter(|s| disposition(s).as_deref() == Some("dead_lettered"))
        .map(|s| (s.name.replace(&h.run, "RUN"), s.kind))
        .collect();
    dead_lettered.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        dead_lettered,
        [
            (
                "process mail-RUN".to_owned(),
                mqtrace_testing::Kind::Consumer
            ),
            (
                "send mail.dlx-RUN:mail-RUN".to_owned(),
                mqtrace_testing::Kind::Producer
            ),
        ]
    );
    assert_tree(
        &h.metrics(&[], &["server.port"]).await,
        r#"
messaging.client.consumed.messages [{message}] Counter value=3 messaging.destination.name="mail-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="rabbitmq" server.address="127.0.0.1"
messaging.client.operation.duration [s] Histogram count=1 buckets=messaging messaging.destination.name="mail-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="rabbitmq"
messaging.client.operation.duration [s] Histogram count=1 buckets=messaging messaging.destination.name="mail.dlx-RUN:mail-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="rabbitmq" server.address="127.0.0.1"
messaging.client.operation.duration [s] Histogram count=2 buckets=messaging messaging.destination.name="mail-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="rabbitmq" server.address="127.0.0.1"
messaging.client.operation.duration [s] Histogram count=3 buckets=messaging messaging.destination.name="mail-RUN" messaging.operation.name="ack" messaging.operation.type="settle" messaging.system.name="rabbitmq" server.address="127.0.0.1"
messaging.client.sent.messages [{message}] Counter value=1 messaging.destination.name="mail-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="rabbitmq"
messaging.client.sent.messages [{message}] Counter value=1 messaging.destination.name="mail.dlx-RUN:mail-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="rabbitmq" server.address="127.0.0.1"
messaging.client.sent.messages [{message}] Counter value=2 messaging.destination.name="mail-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="rabbitmq" server.address="127.0.0.1"
messaging.process.duration [s] Histogram count=3 buckets=messaging error.type="smtp" messaging.destination.name="mail-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="rabbitmq" server.address="127.0.0.1"
mqtrace.message.dispositions [{message}] Counter value=1 messaging.destination.name="mail-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="rabbitmq" mqtrace.message.disposition="dead_lettered" server.address="127.0.0.1"
mqtrace.message.dispositions [{message}] Counter value=2 messaging.destination.name="mail-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="rabbitmq" mqtrace.message.disposition="retried" server.address="127.0.0.1"
mqtrace.message.queue.duration [s] Histogram count=3 buckets=messaging messaging.destination.name="mail-RUN" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="rabbitmq" server.address="127.0.0.1"
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_a_transient_failure_and_the_consumer_goes_on() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let (_connection, channel) = h.channel().await;
    let queue = QueueSpec::new(h.name("panics"));
    queue.declare(&channel).await.unwrap();
    TracedPublisher::new(channel.clone(), instrumenter.clone())
        .publish_json("", queue.name(), &1, BasicProperties::default())
        .await
        .unwrap();
    let ledger = Ledger::new();
    ledger.sent("1", "");
    let calls = Arc::new(AtomicUsize::new(0));
    let (counted, recording) = (Arc::clone(&calls), ledger.clone());
    let stats = within(
        30,
        TracedConsumer::new(&h.url, queue.clone(), instrumenter).run_until(
            move |message| {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                let call = recording.started(String::from_utf8_lossy(message.body()));
                async move {
                    if n == 0 {
                        // A panic is a failed invocation.
                        call.finished(false);
                        panic!("first attempt blows up");
                    }
                    call.finished(true);
                    HandlerResult::Ok(())
                }
            },
            when_count(&calls, 2),
        ),
    )
    .await
    .unwrap();
    let waiting = drain(&channel, queue.name()).await;
    ledger.waiting(waiting.iter().map(body_of));
    let a = ledger.check(
        "rabbitmq panicking handler",
        Contract::at_least_once().duplicates(0),
    );
    // The panic was a failed attempt, retried; the retry succeeded.
    assert_eq!((a.processed, a.failed_attempts, a.waiting), (1, 1, 0));
    assert_eq!((stats.retried, stats.settled), (1, 1));
    assert_tree(
        &h.render(
            4,
            TreeOptions::only(&["error.type", "mqtrace.message.disposition"]),
        )
        .await
        .lines()
        .map(|l| l.split(" ERROR(").next().unwrap_or(l).to_owned() + "\n")
        .collect::<String>(),
        r#"
        trace #1
        send panics-RUN [PRODUCER]
            process panics-RUN [CONSUMER]
                ~> send panics-RUN (this trace)
                send panics-RUN [PRODUCER] mqtrace.message.disposition="retried"
                    ~> send panics-RUN (this trace) mqtrace.link.relationship="original_message"
                    ~> process panics-RUN (this trace) mqtrace.link.relationship="processing_attempt"
                    process panics-RUN [CONSUMER] mqtrace.message.disposition="settled"
                        ~> send panics-RUN (this trace)
        "#,
    );
    let spans = h.spans(4).await;
    let panicked = spans
        .iter()
        .find(|s| s.attr("error.type").and_then(|v| v.as_str()) == Some("panic"));
    assert!(panicked.is_some(), "the process span says it panicked");
}
