//! Instrumenting one's own rdkafka loop: a plain `StreamConsumer`'s borrowed
//! records processed and settled through `RecordTracer`, a plain `FutureProducer`
//! sending through `FutureProducerExt::send_traced`.

use std::time::Duration;

use mqtrace::{Disposition, HandlerError, Settlement};
use mqtrace_rdkafka::{FutureProducerExt as _, RecordTracer, StatsContext};
use mqtrace_testing::TreeOptions;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::helpers::{assert_tree, committed_offset, within, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_loop_gets_process_and_commit_spans_and_the_core_decides() {
    let h = Harness::start().await;
    let (topic, dead) = (h.name("own"), h.name("own.dlq"));
    h.topics(&[&topic, &dead]).await;
    let instrumenter = h.instrumenter(|b| b.settle_spans(true));
    let producer: FutureProducer = h.config().create().unwrap();
    for body in [r#"{"ok":true}"#, "{not json"] {
        producer
            .send_traced(
                &instrumenter,
                FutureRecord::<str, str>::to(&topic).key("k").payload(body),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }

    let mut config = h.consumer_config();
    config.set("enable.auto.commit", "false");
    let consumer: StreamConsumer = config.create().unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let tracer = RecordTracer::new(instrumenter, producer)
        .config(&config)
        .dead_letter_topic(&dead);
    let mut settled = Vec::new();
    for _ in 0..2 {
        let record = within(30, consumer.recv()).await.unwrap();
        let processed = tracer
            .process(&record, |attempt| {
                assert_eq!(attempt.number(), 1);
                async {
                    let _: serde_json::Value =
                        serde_json::from_slice(record.payload().unwrap_or_default())
                            .map_err(|e| HandlerError::permanent(e).with_type("invalid_json"))?;
                    Ok(())
                }
            })
            .await;
        settled.push(tracer.settle(processed, &record, &consumer).await);
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
    // Committed synchronously before the check: the asynchronous commits of the
    // loop may still be on their way. librdkafka answers "no offset stored" when
    // they have already committed everything it stored.
    match consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
        Ok(()) => {}
        Err(e) if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::NoOffset) => {}
        Err(e) => panic!("the synchronous commit failed: {e}"),
    }
    assert_eq!(committed_offset(&h, &topic).await, 2);

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
                commit own-RUN [CLIENT] messaging.operation.name="commit"
        trace #2
        send own-RUN [PRODUCER] messaging.operation.name="send"
            process own-RUN [CONSUMER] ERROR("key must be a string at line 1 column 2") error.type="invalid_json" messaging.operation.name="process" mqtrace.message.disposition="dead_lettered"
                ~> send own-RUN (this trace)
                send own.dlq-RUN [PRODUCER] messaging.operation.name="send" mqtrace.message.disposition="dead_lettered"
                    ~> send own-RUN (this trace) mqtrace.link.relationship="original_message"
                    ~> process own-RUN (this trace) mqtrace.link.relationship="processing_attempt"
                commit own-RUN [CLIENT] messaging.operation.name="commit"
        "#,
    );
    assert_tree(
        &h.metrics(Harness::LIFECYCLE_METRICS, &["server.port"])
            .await,
        r#"
messaging.client.consumed.messages [{message}] Counter value=2 messaging.consumer.group.name="group-RUN" messaging.destination.name="own-RUN" messaging.destination.partition.id="0" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="kafka" server.address="127.0.0.1"
messaging.client.operation.duration [s] Histogram count=1 buckets=messaging messaging.destination.name="own.dlq-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="kafka"
messaging.client.operation.duration [s] Histogram count=2 buckets=messaging messaging.consumer.group.name="group-RUN" messaging.destination.name="own-RUN" messaging.destination.partition.id="0" messaging.operation.name="commit" messaging.operation.type="settle" messaging.system.name="kafka" server.address="127.0.0.1"
messaging.client.operation.duration [s] Histogram count=2 buckets=messaging messaging.destination.name="own-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="kafka"
messaging.client.sent.messages [{message}] Counter value=1 messaging.destination.name="own.dlq-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="kafka"
messaging.client.sent.messages [{message}] Counter value=2 messaging.destination.name="own-RUN" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="kafka"
messaging.process.duration [s] Histogram count=1 buckets=messaging error.type="invalid_json" messaging.consumer.group.name="group-RUN" messaging.destination.name="own-RUN" messaging.destination.partition.id="0" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="kafka" server.address="127.0.0.1"
messaging.process.duration [s] Histogram count=1 buckets=messaging messaging.consumer.group.name="group-RUN" messaging.destination.name="own-RUN" messaging.destination.partition.id="0" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="kafka" server.address="127.0.0.1"
mqtrace.message.dispositions [{message}] Counter value=1 messaging.consumer.group.name="group-RUN" messaging.destination.name="own-RUN" messaging.destination.partition.id="0" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="kafka" mqtrace.message.disposition="dead_lettered" server.address="127.0.0.1"
mqtrace.message.dispositions [{message}] Counter value=1 messaging.consumer.group.name="group-RUN" messaging.destination.name="own-RUN" messaging.destination.partition.id="0" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="kafka" mqtrace.message.disposition="settled" server.address="127.0.0.1"
mqtrace.message.queue.duration [s] Histogram count=2 buckets=messaging messaging.consumer.group.name="group-RUN" messaging.destination.name="own-RUN" messaging.destination.partition.id="0" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="kafka" server.address="127.0.0.1"
        "#,
    );
}

/// An own loop whose consumer keeps `StatsContext` gets consumer lag on its
/// process spans, as the full consumer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_loop_records_consumer_lag_from_the_statistics() {
    let h = Harness::start().await;
    let topic = h.name("own-lag");
    h.topics(&[&topic]).await;
    let instrumenter = h.instrumenter(|b| b);
    let producer = h.producer(&instrumenter);
    crate::helpers::send_numbered(&producer, &topic, 5).await;
    let mut config = h.consumer_config();
    config
        .set("enable.auto.commit", "false")
        .set("statistics.interval.ms", "100");
    let consumer: StreamConsumer<StatsContext> =
        config.create_with_context(StatsContext::default()).unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let tracer = RecordTracer::new(instrumenter, h.config().create().unwrap()).config(&config);
    let mut gauge = Vec::new();
    let mut lags = Vec::new();
    for _ in 0..5 {
        let record = within(30, consumer.recv()).await.unwrap();
        if record.offset() == 0 {
            // Long enough for statistics to arrive.
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        let lag = consumer.context().lag(&record);
        lags.extend(lag);
        let processed = tracer
            .process_lagging(&record, lag, |_| async { Ok(()) })
            .await;
        tracer.settle(processed, &record, &consumer).await;
        if lag.is_some() {
            gauge.push(h.metrics(&[mqtrace_rdkafka::CONSUMER_LAG], &[]).await);
        }
    }
    crate::helpers::assert_lag_of_five(&h.spans(10).await);
    // The gauge moves with the records: after each, the lag it was processed at.
    let line = |lag: i64| {
        format!(
            "mqtrace.kafka.consumer.lag [{{message}}] Gauge value={lag} messaging.consumer.group.name=\"group-RUN\" messaging.destination.name=\"own-lag-RUN\" messaging.destination.partition.id=\"0\" messaging.system.name=\"kafka\"\n"
        )
    };
    assert_ne!(lags.first(), lags.last(), "{lags:?}");
    assert_eq!(gauge, lags.iter().map(|&l| line(l)).collect::<Vec<_>>());
}

/// `store_offsets(true)`: settling stores each record's offset and commits
/// nothing; the loop's own commit of the stored offsets then moves the group past
/// every settled record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_loop_stores_offsets_for_a_commit_of_its_own() {
    let h = Harness::start().await;
    let topic = h.name("stored");
    h.topics(&[&topic]).await;
    let instrumenter = h.instrumenter(|b| b);
    crate::helpers::send_numbered(&h.producer(&instrumenter), &topic, 5).await;
    let mut config = h.consumer_config();
    config
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let consumer: StreamConsumer = config.create().unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let producer: FutureProducer = h.config().create().unwrap();
    let tracer = RecordTracer::new(instrumenter, producer)
        .config(&config)
        .store_offsets(true);
    for _ in 0..5 {
        let record = within(30, consumer.recv()).await.unwrap();
        let processed = tracer.process(&record, |_| async { Ok(()) }).await;
        let settled = tracer.settle(processed, &record, &consumer).await;
        assert_eq!(
            (
                settled.disposition,
                settled.settlement,
                settled.settle_failed
            ),
            (Disposition::Settle, Settlement::Ack, false)
        );
    }
    // A per-record asynchronous commit would have landed by now: the group has no
    // committed offset at all (librdkafka's OFFSET_INVALID, -1001).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(committed_offset(&h, &topic).await, -1001);
    consumer
        .commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
        .unwrap();
    assert_eq!(committed_offset(&h, &topic).await, 5);
}
