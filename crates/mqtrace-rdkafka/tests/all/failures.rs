//! Outcomes on a real Kafka-protocol broker: retries through a retry topic, dead
//! letters with metadata and the original bytes, committed offsets, and an
//! accounting of every record.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mqtrace::forward::{
    ATTEMPT_HEADER, ERROR_MESSAGE_HEADER, ERROR_TYPE_HEADER, FAILED_AT_HEADER,
    ORIGINAL_TRACEPARENT_HEADER,
};
use mqtrace::{HandlerError, HandlerResult};
use mqtrace_rdkafka::{Record, TracedConsumer};
use mqtrace_testing::TreeOptions;
use rdkafka::consumer::Consumer as _;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};

use crate::helpers::{assert_tree, send_numbered, when_count, within, Harness};

const OUTCOME: &[&str] = &[
    "error.type",
    "mqtrace.error.retryable",
    "mqtrace.message.attempt",
    "mqtrace.message.disposition",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_go_through_the_retry_topic_in_one_trace() {
    let h = Harness::start().await;
    let (topic, retry) = (h.name("payments"), h.name("payments.retry"));
    h.topics(&[&topic, &retry]).await;
    let instrumenter = h.instrumenter(|b| b);
    h.producer(&instrumenter)
        .send(
            FutureRecord::<str, str>::to(&topic).key("p-1").payload("7"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let stats = within(
        60,
        h.consumer(&[&topic, &retry], &instrumenter)
            .retry_topic(&retry)
            .run_until(
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
    assert_tree(
        &h.render(6, TreeOptions::only(OUTCOME)).await,
        r#"
        trace #1
        send payments-RUN [PRODUCER]
            process payments-RUN [CONSUMER] ERROR("gateway timeout") error.type="timeout" mqtrace.error.retryable=true mqtrace.message.attempt=1 mqtrace.message.disposition="retried"
                ~> send payments-RUN (this trace)
                send payments.retry-RUN [PRODUCER] mqtrace.message.attempt=1 mqtrace.message.disposition="retried"
                    ~> send payments-RUN (this trace) mqtrace.link.relationship="original_message"
                    ~> process payments-RUN (this trace) mqtrace.link.relationship="processing_attempt"
                    process payments.retry-RUN [CONSUMER] ERROR("gateway timeout") error.type="timeout" mqtrace.error.retryable=true mqtrace.message.attempt=2 mqtrace.message.disposition="retried"
                        ~> send payments.retry-RUN (this trace)
                        send payments.retry-RUN [PRODUCER] mqtrace.message.attempt=2 mqtrace.message.disposition="retried"
                            ~> send payments-RUN (this trace) mqtrace.link.relationship="original_message"
                            ~> process payments.retry-RUN (this trace) mqtrace.link.relationship="processing_attempt"
                            process payments.retry-RUN [CONSUMER] mqtrace.message.attempt=3 mqtrace.message.disposition="settled"
                                ~> send payments.retry-RUN (this trace)
        "#,
    );
    assert_tree(
        &h.metrics(Harness::LIFECYCLE_METRICS, &["server.port"])
            .await,
        r#"
messaging.client.consumed.messages [{message}] Counter value=1 messaging.consumer.group.name="group-RUN" messaging.destination.name="payments-RUN" messaging.destination.partition.id="0" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="kafka" server.address="127.0.0.1"
messaging.client.consumed.messages [{message}] Counter value=2 messaging.consumer.group.name="group-RUN" messaging.destination.name="payments.retry-RUN" messaging.destination.partition.id="0" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="kafka" server.address="127.0.0.1"
messaging.client.operation.duration [s] Histogram count=1 buckets=messaging messaging.consumer.group.name="group-RUN" messaging.destination.name="payments-RUN" messaging.destination.partition.id="0" messaging.operation.name="commit" messaging.operation.type="settle" messaging.system.name="kafka" server.address="127.0.0.1"
messaging.client.operation.duration [s] Histogram count=1 buckets=messaging messaging.destination.name="payments-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="kafka" server.address="127.0.0.1"
messaging.client.operation.duration [s] Histogram count=2 buckets=messaging messaging.consumer.group.name="group-RUN" messaging.destination.name="payments.retry-RUN" messaging.destination.partition.id="0" messaging.operation.name="commit" messaging.operation.type="settle" messaging.system.name="kafka" server.address="127.0.0.1"
messaging.client.operation.duration [s] Histogram count=2 buckets=messaging messaging.destination.name="payments.retry-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="kafka" server.address="127.0.0.1"
messaging.client.sent.messages [{message}] Counter value=1 messaging.destination.name="payments-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="kafka" server.address="127.0.0.1"
messaging.client.sent.messages [{message}] Counter value=2 messaging.destination.name="payments.retry-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="kafka" server.address="127.0.0.1"
messaging.process.duration [s] Histogram count=1 buckets=messaging error.type="timeout" messaging.consumer.group.name="group-RUN" messaging.destination.name="payments-RUN" messaging.destination.partition.id="0" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="kafka" server.address="127.0.0.1"
messaging.process.duration [s] Histogram count=1 buckets=messaging error.type="timeout" messaging.consumer.group.name="group-RUN" messaging.destination.name="payments.retry-RUN" messaging.destination.partition.id="0" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="kafka" server.address="127.0.0.1"
messaging.process.duration [s] Histogram count=1 buckets=messaging messaging.consumer.group.name="group-RUN" messaging.destination.name="payments.retry-RUN" messaging.destination.partition.id="0" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="kafka" server.address="127.0.0.1"
mqtrace.message.dispositions [{message}] Counter value=1 messaging.consumer.group.name="group-RUN" messaging.destination.name="payments-RUN" messaging.destination.partition.id="0" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="kafka" mqtrace.message.disposition="retried" server.address="127.0.0.1"
mqtrace.message.dispositions [{message}] Counter value=1 messaging.consumer.group.name="group-RUN" messaging.destination.name="payments.retry-RUN" messaging.destination.partition.id="0" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="kafka" mqtrace.message.disposition="retried" server.address="127.0.0.1"
mqtrace.message.dispositions [{message}] Counter value=1 messaging.consumer.group.name="group-RUN" messaging.destination.name="payments.retry-RUN" messaging.destination.partition.id="0" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="kafka" mqtrace.message.disposition="settled" server.address="127.0.0.1"
mqtrace.message.queue.duration [s] Histogram count=1 buckets=messaging messaging.consumer.group.name="group-RUN" messaging.destination.name="payments-RUN" messaging.destination.partition.id="0" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="kafka" server.address="127.0.0.1"
mqtrace.message.queue.duration [s] Histogram count=2 buckets=messaging messaging.consumer.group.name="group-RUN" messaging.destination.name="payments.retry-RUN" messaging.destination.partition.id="0" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="kafka" server.address="127.0.0.1"
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_are_dead_lettered_and_nothing_is_lost() {
    let h = Harness::start().await;
    let (topic, dlq) = (h.name("orders"), h.name("orders.dlq"));
    h.topics(&[&topic, &dlq]).await;
    let instrumenter = h.instrumenter(|b| b);
    let producer = h.producer(&instrumenter);
    // Ten records; every third is not JSON (and the sixth not even UTF-8).
    let mut sent = BTreeMap::new();
    for i in 0..10u8 {
        let body: Vec<u8> = match i {
            6 => vec![0xff, 0x00, i],
            _ if i % 3 == 0 => format!("{{\"order\": {i}").into_bytes(),
            _ => format!("{{\"order\": {i}}}").into_bytes(),
        };
        let key = format!("k{i}");
        let headers = OwnedHeaders::new().insert(Header {
            key: "x-tenant",
            value: Some("acme"),
        });
        producer
            .send(
                FutureRecord::to(&topic)
                    .key(&key)
                    .payload(&body)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        sent.insert(key, body);
    }
    let processed = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(AtomicUsize::new(0));
    let (handled, done) = (Arc::clone(&processed), Arc::clone(&seen));
    let consumer = h.consumer(&[&topic], &instrumenter).dead_letter_topic(&dlq);
    let stats = within(
        60,
        consumer.run_until(
            move |record: Record| {
                let (processed, done) = (Arc::clone(&handled), Arc::clone(&done));
                async move {
                    done.fetch_add(1, Ordering::SeqCst);
                    let _: serde_json::Value = record.json()?;
                    let key = String::from_utf8(record.key().unwrap().to_vec()).unwrap();
                    processed.lock().unwrap().push(key);
                    HandlerResult::Ok(())
                }
            },
            when_count(&seen, 10),
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        (stats.settled, stats.dead_lettered, stats.retried),
        (6, 4, 0)
    );

    // The source partition's offset is committed past the last record.
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&topic, 0);
    let committed = consumer
        .inner()
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        committed.find_partition(&topic, 0).unwrap().offset(),
        Offset::Offset(10)
    );

    // The dead letters: metadata headers, the same key, the original bytes.
    let dead = Arc::new(Mutex::new(Vec::new()));
    let seen_dead = Arc::new(AtomicUsize::new(0));
    let (collected, n) = (Arc::clone(&dead), Arc::clone(&seen_dead));
    let mut config = h.consumer_config();
    config.set("group.id", h.name("dlq-reader"));
    let reader = mqtrace_rdkafka::TracedConsumer::from_config(
        &config,
        &[&dlq],
        h.producer(&instrumenter),
        instrumenter.clone(),
    )
    .unwrap();
    within(
        60,
        reader.run_until(
            move |record: Record| {
                let (dead, n) = (Arc::clone(&collected), Arc::clone(&n));
                async move {
                    dead.lock().unwrap().push(record);
                    n.fetch_add(1, Ordering::SeqCst);
                    HandlerResult::Ok(())
                }
            },
            when_count(&seen_dead, 4),
        ),
    )
    .await
    .unwrap();
    let dead = dead.lock().unwrap();
    let mut dead_keys = Vec::new();
    for record in dead.iter() {
        let key = String::from_utf8(record.key().unwrap().to_vec()).unwrap();
        assert_eq!(record.payload().unwrap(), sent[&key].as_slice(), "{key}");
        assert_eq!(record.header(ATTEMPT_HEADER), Some("1"));
        assert_eq!(record.header(ERROR_TYPE_HEADER), Some("invalid_json"));
        assert!(record.header(ERROR_MESSAGE_HEADER).is_some());
        assert!(record.header(FAILED_AT_HEADER).is_some());
        assert!(record.header(ORIGINAL_TRACEPARENT_HEADER).is_some());
        assert_eq!(record.header("x-tenant"), Some("acme"));
        dead_keys.push(key);
    }
    // Every record accounted for: processed or dead-lettered, once.
    let processed = processed.lock().unwrap().clone();
    let mut accounted: Vec<String> = processed.iter().chain(&dead_keys).cloned().collect();
    accounted.sort();
    let expected: Vec<String> = sent.keys().cloned().collect();
    let lost = expected.iter().filter(|k| !accounted.contains(k)).count();
    println!(
        "kafka dead letters: sent {}, processed {}, dead-lettered {}, lost {lost}",
        sent.len(),
        processed.len(),
        dead_keys.len()
    );
    assert_eq!(accounted, expected);
    dead_keys.sort();
    assert_eq!(dead_keys, ["k0", "k3", "k6", "k9"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_a_transient_failure_and_the_consumer_goes_on() {
    let h = Harness::start().await;
    let topic = h.name("panics");
    h.topics(&[&topic]).await;
    let instrumenter = h.instrumenter(|b| b);
    let producer = h.producer(&instrumenter);
    send_numbered(&producer, &topic, 2).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let stats = within(
        60,
        h.consumer(&[&topic], &instrumenter).run_until(
            move |_| {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    assert!(n > 0, "the first record's first attempt blows up");
                    HandlerResult::Ok(())
                }
            },
            // Both records, the first one twice.
            when_count(&calls, 3),
        ),
    )
    .await
    .unwrap();
    assert_eq!((stats.retried, stats.settled), (1, 2));
    let spans = h.spans(2 + 3 + 1).await;
    let panicked = spans
        .iter()
        .filter(|s| s.attr("error.type").and_then(|v| v.as_str()) == Some("panic"))
        .count();
    assert_eq!(panicked, 1, "the process span says it panicked");
}

/// A consumer whose topic does not exist stops with an error instead of waiting
/// forever, and handles nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_stops_the_consumer_with_an_error() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let mut config = h.consumer_config();
    // librdkafka reports a missing subscribed topic after this long.
    config.set("topic.metadata.propagation.max.ms", "1000");
    let consumer = TracedConsumer::from_config(
        &config,
        &[&h.name("never-created")],
        h.producer(&instrumenter),
        instrumenter,
    )
    .unwrap()
    .missing_topic_timeout(std::time::Duration::from_secs(1));
    let outcome = within(
        60,
        consumer.run_until(
            |_| async { HandlerResult::Ok(()) },
            std::future::pending::<()>(),
        ),
    )
    .await;
    match outcome {
        Err(mqtrace_rdkafka::ConsumeError::Refused { error, stats }) => {
            assert_eq!(
                error.rdkafka_error_code(),
                Some(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition),
                "{error}"
            );
            assert_eq!(stats.settled, 0);
        }
        other => panic!("expected the consumer to be refused, got {other:?}"),
    }
}
