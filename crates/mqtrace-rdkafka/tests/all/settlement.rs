//! Issue 24, Kafka items 3, 4 and 7: settling never lets a group's committed
//! offset pass a record not handled, nor move backwards. Every test keeps a
//! `mqtrace_testing::delivery::Ledger` of what it saw and checks it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mqtrace::{HandlerError, Instrumenter, Settlement};
use mqtrace_testing::delivery::{Contract, Ledger, Settled};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::helpers::{
    committed_offset, committed_offset_of, send_numbered, when_count, within, Harness,
};

/// A topic of the test's own with five numbered records on its one partition,
/// each recorded in a new ledger as sent.
async fn five_records(h: &Harness, base: &str, instrumenter: &Instrumenter) -> (String, Ledger) {
    let topic = h.name(base);
    h.topics(&[&topic]).await;
    let ledger = Ledger::new();
    send_numbered(&h.producer(instrumenter), &topic, 5).await;
    for i in 0..5 {
        ledger.sent(i.to_string(), "0");
    }
    (topic, ledger)
}

/// Commits the consumer's stored offsets (the loop's commit timer), reads the
/// group's committed offset back, and tells the ledger: the commit, and the
/// records it covers (numbered from offset 0) as settled.
async fn commit_and_observe(consumer: &StreamConsumer, h: &Harness, topic: &str, ledger: &Ledger) {
    // Nothing stored since the last commit is no failure here.
    let _ = tokio::task::block_in_place(|| consumer.commit_consumer_state(CommitMode::Sync));
    let committed = committed_offset(h, topic).await;
    ledger.committed("0", committed);
    for offset in 0..committed.max(0) {
        ledger.settled(&offset.to_string(), Settled::Done);
    }
}

/// Tells the ledger which records are still on the broker: those at or after the
/// committed offset (all when nothing is committed).
fn still_waiting(ledger: &Ledger, committed: i64, records: i64) {
    ledger.waiting((committed.max(0)..records).map(|o| o.to_string()));
}

/// Reads the group's committed offset at the end of a five-record run, and tells
/// the ledger: the commit, and the records still waiting. Returns the offset.
async fn observe_the_end(h: &Harness, topic: &str, ledger: &Ledger) -> i64 {
    let committed = committed_offset(h, topic).await;
    ledger.committed("0", committed);
    still_waiting(ledger, committed, 5);
    committed
}

/// The own loop of these tests: receives `records` records (numbered from 0),
/// handles each inside `tracer.process` (recording it in the ledger) and settles
/// it; in record 2's handler the loop's commit timer fires. It stops at the
/// first settle that fails, as a loop told its consumer cannot be settled for
/// should, and returns the settlements.
async fn own_loop(
    h: &Harness,
    topic: &str,
    consumer: &StreamConsumer,
    tracer: &mqtrace_rdkafka::RecordTracer,
    ledger: &Ledger,
    records: usize,
) -> Vec<mqtrace::Settled> {
    let mut all = Vec::new();
    for _ in 0..records {
        let record = within(30, consumer.recv()).await.unwrap();
        let id = String::from_utf8_lossy(record.payload().unwrap_or_default()).into_owned();
        let processed = tracer
            .process(&record, |_| async {
                let invocation = ledger.started(&id);
                if id == "2" {
                    // Slow: the commit timer fires while it is in its handler.
                    commit_and_observe(consumer, h, topic, ledger).await;
                }
                invocation.finished(true);
                Ok(())
            })
            .await;
        let settled = tracer.settle(processed, &record, consumer).await;
        let failed = settled.settle_failed;
        all.push(settled);
        if failed {
            break;
        }
    }
    all
}

/// Item 3. An own loop storing offsets (`store_offsets(true)`) on a consumer left
/// with librdkafka's default `enable.auto.offset.store=true`, whose commit timer
/// fires while record 2 is in its handler. librdkafka stored each record's offset
/// as it handed it out, and mqtrace stored through `rd_kafka_offset_store`, which
/// does not check the setting. Before the fix every settle succeeded and that
/// commit moved the group to offset 3, past record 2 still in its handler: the
/// checker failed with `settled before their handler succeeded: ["2"]`. Now the
/// first settle is refused (`SettleRefused::AutoOffsetStore`, on the commit span
/// and in `settle_failed`), and the loop stops with nothing committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_loop_storing_offsets_under_the_default_auto_store_is_refused() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b.settle_spans(true));
    let (topic, ledger) = five_records(&h, "autostore", &instrumenter).await;
    let mut config = h.consumer_config();
    // The auto-commit off, the offset store left at librdkafka's default.
    config.set("enable.auto.commit", "false");
    let consumer: StreamConsumer = config.create().unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let producer: FutureProducer = h.config().create().unwrap();
    // No `config`: the tracer learns the setting from the consumer.
    let tracer = mqtrace_rdkafka::RecordTracer::new(instrumenter, producer).store_offsets(true);

    let settled = own_loop(&h, &topic, &consumer, &tracer, &ledger, 5).await;
    let committed = observe_the_end(&h, &topic, &ledger).await;
    ledger.check(
        "kafka own loop, store_offsets under auto store",
        Contract::ordered(),
    );

    // The refusal itself: the first settle failed, with the reason on its span.
    assert_eq!(settled.len(), 1, "{settled:?}");
    assert!(settled[0].settle_failed);
    assert_eq!(settled[0].settlement, Settlement::Ack);
    assert_eq!(committed, -1001, "nothing committed");
    let spans = h.spans(5 + 2).await;
    let commit = spans
        .iter()
        .find(|s| s.name.starts_with("commit"))
        .expect("a commit span");
    match &commit.status {
        mqtrace_testing::SpanStatus::Error(text) => assert!(
            text.contains("set enable.auto.offset.store=false"),
            "{text}"
        ),
        other => panic!("the commit span is not an error: {other:?}"),
    }
}

/// Item 3, the configuration that works: the same loop on a consumer with
/// `enable.auto.offset.store=false`: the commit timer in record 2's handler
/// moves the group to 2, not past it, and the loop's last commit to 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_loop_storing_offsets_never_commits_past_a_record_in_its_handler() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let (topic, ledger) = five_records(&h, "nostore", &instrumenter).await;
    let mut config = h.consumer_config();
    config
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let consumer: StreamConsumer = config.create().unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let producer: FutureProducer = h.config().create().unwrap();
    let tracer = mqtrace_rdkafka::RecordTracer::new(instrumenter.clone(), producer.clone())
        .config(&config)
        .store_offsets(true);
    let settled = own_loop(&h, &topic, &consumer, &tracer, &ledger, 5).await;
    assert!(settled.iter().all(|s| !s.settle_failed), "{settled:?}");
    commit_and_observe(&consumer, &h, &topic, &ledger).await;
    let committed = committed_offset(&h, &topic).await;
    assert_eq!(committed, 5);
    still_waiting(&ledger, committed, 5);
    ledger.check(
        "kafka own loop, store_offsets",
        Contract::ordered().duplicates(0),
    );
}

/// A consumer whose seeks fail: librdkafka refuses a seek to a partition it
/// does not know (`UNKNOWN_PARTITION`, say after the topic was deleted and the
/// partition unassigned), which a test cannot bring about on demand against
/// tansu; everything else is the real consumer's.
struct SeekFails(StreamConsumer);

mod seek_fails {
    use rdkafka::client::Client;
    use rdkafka::consumer::{
        CommitMode, Consumer, ConsumerGroupMetadata, DefaultConsumerContext, RebalanceProtocol,
    };
    use rdkafka::error::{KafkaError, KafkaResult};
    use rdkafka::groups::GroupList;
    use rdkafka::message::BorrowedMessage;
    use rdkafka::metadata::Metadata;
    use rdkafka::util::Timeout;
    use rdkafka::{Offset, TopicPartitionList};

    use super::SeekFails;

    impl Consumer for SeekFails {
        fn client(&self) -> &Client<DefaultConsumerContext> {
            self.0.client()
        }
        fn group_metadata(&self) -> Option<ConsumerGroupMetadata> {
            self.0.group_metadata()
        }
        fn subscribe(&self, topics: &[&str]) -> KafkaResult<()> {
            self.0.subscribe(topics)
        }
        fn unsubscribe(&self) {
            self.0.unsubscribe();
        }
        fn assign(&self, a: &TopicPartitionList) -> KafkaResult<()> {
            self.0.assign(a)
        }
        fn unassign(&self) -> KafkaResult<()> {
            self.0.unassign()
        }
        fn incremental_assign(&self, a: &TopicPartitionList) -> KafkaResult<()> {
            self.0.incremental_assign(a)
        }
        fn incremental_unassign(&self, a: &TopicPartitionList) -> KafkaResult<()> {
            self.0.incremental_unassign(a)
        }
        fn seek<T: Into<Timeout>>(&self, _: &str, _: i32, _: Offset, _: T) -> KafkaResult<()> {
            Err(KafkaError::Seek("Local: Unknown partition".into()))
        }
        fn seek_partitions<T: Into<Timeout>>(
            &self,
            tpl: TopicPartitionList,
            timeout: T,
        ) -> KafkaResult<TopicPartitionList> {
            self.0.seek_partitions(tpl, timeout)
        }
        fn commit(&self, tpl: &TopicPartitionList, mode: CommitMode) -> KafkaResult<()> {
            self.0.commit(tpl, mode)
        }
        fn commit_consumer_state(&self, mode: CommitMode) -> KafkaResult<()> {
            self.0.commit_consumer_state(mode)
        }
        fn commit_message(&self, m: &BorrowedMessage<'_>, mode: CommitMode) -> KafkaResult<()> {
            self.0.commit_message(m, mode)
        }
        fn store_offset(&self, topic: &str, partition: i32, offset: i64) -> KafkaResult<()> {
            self.0.store_offset(topic, partition, offset)
        }
        fn store_offset_from_message(&self, m: &BorrowedMessage<'_>) -> KafkaResult<()> {
            self.0.store_offset_from_message(m)
        }
        fn store_offsets(&self, tpl: &TopicPartitionList) -> KafkaResult<()> {
            self.0.store_offsets(tpl)
        }
        fn subscription(&self) -> KafkaResult<TopicPartitionList> {
            self.0.subscription()
        }
        fn assignment(&self) -> KafkaResult<TopicPartitionList> {
            self.0.assignment()
        }
        fn assignment_lost(&self) -> bool {
            self.0.assignment_lost()
        }
        fn committed<T: Into<Timeout>>(&self, timeout: T) -> KafkaResult<TopicPartitionList> {
            self.0.committed(timeout)
        }
        fn committed_offsets<T: Into<Timeout>>(
            &self,
            tpl: TopicPartitionList,
            timeout: T,
        ) -> KafkaResult<TopicPartitionList> {
            self.0.committed_offsets(tpl, timeout)
        }
        fn offsets_for_timestamp<T: Into<Timeout>>(
            &self,
            timestamp: i64,
            timeout: T,
        ) -> KafkaResult<TopicPartitionList> {
            self.0.offsets_for_timestamp(timestamp, timeout)
        }
        fn offsets_for_times<T: Into<Timeout>>(
            &self,
            timestamps: TopicPartitionList,
            timeout: T,
        ) -> KafkaResult<TopicPartitionList> {
            self.0.offsets_for_times(timestamps, timeout)
        }
        fn position(&self) -> KafkaResult<TopicPartitionList> {
            self.0.position()
        }
        fn fetch_metadata<T: Into<Timeout>>(
            &self,
            topic: Option<&str>,
            timeout: T,
        ) -> KafkaResult<Metadata> {
            self.0.fetch_metadata(topic, timeout)
        }
        fn fetch_watermarks<T: Into<Timeout>>(
            &self,
            topic: &str,
            partition: i32,
            timeout: T,
        ) -> KafkaResult<(i64, i64)> {
            self.0.fetch_watermarks(topic, partition, timeout)
        }
        fn fetch_group_list<T: Into<Timeout>>(
            &self,
            group: Option<&str>,
            timeout: T,
        ) -> KafkaResult<GroupList> {
            self.0.fetch_group_list(group, timeout)
        }
        fn pause(&self, partitions: &TopicPartitionList) -> KafkaResult<()> {
            self.0.pause(partitions)
        }
        fn resume(&self, partitions: &TopicPartitionList) -> KafkaResult<()> {
            self.0.resume(partitions)
        }
        fn rebalance_protocol(&self) -> RebalanceProtocol {
            self.0.rebalance_protocol()
        }
    }
}

/// Item 4. An own loop (storing offsets, correctly configured) in which record
/// 1 fails, its retry cannot be forwarded (the retry topic does not exist), and
/// the seek back to it fails: a real broker, with the consumer's seek made to
/// fail (see `SeekFails`; no way to make librdkafka refuse a seek to an assigned
/// partition on demand was found). Before the fix the failed seek was only
/// logged: records 2 to 4 were handled and stored, the loop's commit moved the
/// group to 5, and record 1 was lost (the checker failed with `lost ["1"]`).
/// Now the partition is paused and held at record 1: nothing later of it is
/// handed out, stored or committed, and the group stays at 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_seek_back_holds_the_partition_at_the_record() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let (topic, ledger) = five_records(&h, "seekfails", &instrumenter).await;
    let mut config = h.consumer_config();
    config
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let consumer = SeekFails(config.create().unwrap());
    consumer.subscribe(&[&topic]).unwrap();
    // Forwards to a topic that does not exist time out within a second.
    let mut forwarding = h.config();
    forwarding.set("message.timeout.ms", "1000");
    let forwarder: FutureProducer = forwarding.create().unwrap();
    let tracer = mqtrace_rdkafka::RecordTracer::new(instrumenter, forwarder)
        .config(&config)
        .store_offsets(true)
        .retry_topic(h.name("missing-retries"));

    let mut redelivered = 0;
    // Until no record comes for three seconds.
    while let Ok(record) = tokio::time::timeout(Duration::from_secs(3), consumer.0.recv()).await {
        let record = record.unwrap();
        let id = String::from_utf8_lossy(record.payload().unwrap_or_default()).into_owned();
        let processed = tracer
            .process(&record, |_| async {
                let invocation = ledger.started(&id);
                let ok = id != "1";
                invocation.finished(ok);
                if ok {
                    Ok(())
                } else {
                    Err(HandlerError::transient("gateway timeout"))
                }
            })
            .await;
        let settled = tracer.settle(processed, &record, &consumer).await;
        if settled.settlement == Settlement::Redeliver {
            redelivered += 1;
            assert!(settled.settle_failed, "the seek failed: {settled:?}");
        }
    }
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
    let committed = observe_the_end(&h, &topic, &ledger).await;
    ledger.check("kafka own loop, failed seek back", Contract::ordered());
    assert_eq!(redelivered, 1);
    assert_eq!(committed, 1);
}

/// Item 7. Two full consumers of one group on a topic of two partitions: A
/// handles both partitions' first records, B joins and takes one partition and
/// its next records, then stops, and the partition comes back to A, which
/// stops too. Before the fix A's final commit committed its old position of the
/// partition that had moved away and back (5), behind what B had committed
/// (10): the checker failed with `offsets committed backwards`. Now revoked
/// partitions leave A's positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_moved_away_and_back_is_never_committed_backwards() {
    let h = Harness::start_alone().await;
    let topic = h.name("moving");
    h.partitioned_topic(&topic, 2).await;
    let instrumenter = h.instrumenter(|b| b);
    let producer = h.producer(&instrumenter);
    let ledger = Ledger::new();
    let send = |from: usize| {
        let (producer, topic, ledger) = (&producer, &topic, &ledger);
        async move {
            for partition in 0..2 {
                for i in from..from + 5 {
                    let id = format!("p{partition}-{i}");
                    producer
                        .send(
                            FutureRecord::<str, str>::to(topic)
                                .partition(partition)
                                .payload(&id),
                            Duration::from_secs(10),
                        )
                        .await
                        .unwrap();
                    ledger.sent(id, partition.to_string());
                }
            }
        }
    };
    send(0).await;

    let handled = Arc::new(AtomicUsize::new(0));
    let start = |name: &'static str| {
        let consumer = Arc::new(h.consumer(&[&topic], &instrumenter));
        let stop = Arc::new(tokio::sync::Notify::new());
        let task = {
            let (consumer, stop) = (Arc::clone(&consumer), Arc::clone(&stop));
            let (ledger, handled) = (ledger.clone(), Arc::clone(&handled));
            tokio::spawn(async move {
                consumer
                    .run_until(
                        |record| {
                            let id = String::from_utf8_lossy(record.payload().unwrap_or_default())
                                .into_owned();
                            ledger.started(id).finished(true);
                            handled.fetch_add(1, Ordering::SeqCst);
                            async { Ok(()) }
                        },
                        stop.notified(),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{name}: {e}"))
            })
        };
        (consumer, stop, task)
    };
    let assigned = |c: &mqtrace_rdkafka::TracedConsumer| {
        c.inner().assignment().map(|a| a.count()).unwrap_or(0)
    };
    let observe = |label: &'static str| {
        let (h, topic, ledger) = (&h, &topic, &ledger);
        async move {
            for partition in 0..2 {
                let offset = committed_offset_of(h, topic, partition).await;
                println!("{label}: partition {partition} committed at {offset}");
                ledger.committed(partition.to_string(), offset);
            }
        }
    };

    let (a, stop_a, task_a) = start("A");
    within(60, when_count(&handled, 10)).await;
    // A's interval commit.
    tokio::time::sleep(Duration::from_millis(600)).await;
    observe("A alone").await;

    let (b, stop_b, task_b) = start("B");
    within(60, async {
        while !(assigned(&a) == 1 && assigned(&b) == 1) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    send(5).await;
    within(60, when_count(&handled, 20)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    observe("A and B").await;

    stop_b.notify_one();
    within(30, task_b).await.unwrap();
    // Closed: B leaves the group.
    tokio::task::block_in_place(|| drop(b));
    observe("B stopped").await;
    within(60, async {
        while assigned(&a) != 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    stop_a.notify_one();
    within(30, task_a).await.unwrap();
    observe("A stopped").await;

    let mut waiting = Vec::new();
    for partition in 0..2 {
        let committed = committed_offset_of(&h, &topic, partition).await;
        waiting.extend((committed.max(0)..10).map(|i| format!("p{partition}-{i}")));
    }
    ledger.waiting(waiting);
    ledger.check(
        "kafka full consumer, partition moved away and back",
        Contract::ordered(),
    );
}

// (Written with the fix: the API it tests is new.)

/// Item 3: `RecordTracer::check` tells at start-up what settling would refuse:
/// librdkafka's defaults by the configuration, and in store mode by the consumer
/// itself when no configuration was given; a consumer set up right passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_tracer_check_tells_at_start_up() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let producer: FutureProducer = h.config().create().unwrap();
    let new = || mqtrace_rdkafka::RecordTracer::new(instrumenter.clone(), producer.clone());
    let mut good = h.consumer_config();
    good.set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let consumer: StreamConsumer = good.create().unwrap();
    new()
        .config(&good)
        .store_offsets(true)
        .check(&consumer)
        .unwrap();
    new().store_offsets(true).check(&consumer).unwrap();
    new().config(&good).check(&consumer).unwrap();

    let defaults = h.consumer_config();
    let plain: StreamConsumer = defaults.create().unwrap();
    let refused = |t: mqtrace_rdkafka::RecordTracer| t.check(&plain).unwrap_err();
    assert_eq!(
        refused(new().config(&defaults)),
        mqtrace_rdkafka::SettleRefused::AutoCommit
    );
    assert_eq!(
        refused(new().store_offsets(true)),
        mqtrace_rdkafka::SettleRefused::AutoOffsetStore
    );
    assert!(refused(new().config(&defaults).store_offsets(true))
        .to_string()
        .contains("set enable.auto.offset.store=false"));
}

/// Every handler outcome on the full consumer, through the delivery checker:
/// record 1 fails transiently once (its retry goes to the topic's tail), record
/// 2 fails permanently (to the dead-letter topic, read back), record 3's
/// handler panics once (a transient failure), 0 and 4 succeed. Nothing is lost,
/// the dead letter is one a handler saw, and the group's committed offset ends
/// at the topic's end: the retried copies included, nothing waits. Order is
/// checked up to each retry's forward (the copy goes to the partition's tail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_handler_outcome_settles_through_the_checker() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let (topic, ledger) = five_records(&h, "outcomes", &instrumenter).await;
    let dead = h.name("outcomes.dlq");
    h.topics(&[&dead]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let consumer = h
        .consumer(&[&topic], &instrumenter)
        .dead_letter_topic(&dead);
    let stats = within(
        60,
        consumer.run_until(
            |record| {
                let (ledger, calls) = (ledger.clone(), Arc::clone(&calls));
                async move {
                    let id: usize = record.json()?;
                    let call = ledger.started(id.to_string());
                    calls.fetch_add(1, Ordering::SeqCst);
                    let first = record.attempt() == 1;
                    match id {
                        1 if first => {
                            call.finished(false);
                            // The consumer forwards the retry before it takes
                            // the next record.
                            ledger.settled("1", Settled::Forwarded);
                            Err(HandlerError::transient("gateway timeout"))
                        }
                        2 => {
                            call.finished(false);
                            Err(HandlerError::permanent("no such customer"))
                        }
                        3 if first => {
                            call.finished(false);
                            ledger.settled("3", Settled::Forwarded);
                            panic!("the handler blows up on its first attempt");
                        }
                        _ => {
                            call.finished(true);
                            Ok(())
                        }
                    }
                }
            },
            // Five records, two of them twice.
            when_count(&calls, 7),
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        (stats.settled, stats.retried, stats.dead_lettered),
        (4, 2, 1)
    );
    let reader: StreamConsumer = h.consumer_config().create().unwrap();
    reader.subscribe(&[&dead]).unwrap();
    let letter = within(30, reader.recv()).await.unwrap();
    ledger.dead_lettered([
        String::from_utf8_lossy(letter.payload().unwrap_or_default()).into_owned(),
    ]);
    let committed = committed_offset(&h, &topic).await;
    let (_, end) = consumer
        .inner()
        .fetch_watermarks(&topic, 0, Duration::from_secs(10))
        .unwrap();
    ledger.committed("0", committed);
    let a = ledger.check(
        "kafka full consumer, every handler outcome",
        Contract::ordered().duplicates(0),
    );
    assert_eq!((a.dead_lettered, a.failed_attempts), (1, 3));
    assert_eq!(committed, end, "the originals and their retries committed");
}

/// The dead-letter topic missing: a record failing permanently cannot be
/// forwarded (its send times out), so it is not committed: the consumer seeks
/// back to it and handles it again, and the partition waits behind it. The
/// group's committed offset stays at the record; nothing after it passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dead_letter_topic_holds_the_record() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let (topic, ledger) = five_records(&h, "nodlq", &instrumenter).await;
    let mut forwarding = h.config();
    forwarding.set("message.timeout.ms", "1000");
    let forwarder =
        mqtrace_rdkafka::TracedProducer::from_config(&forwarding, instrumenter.clone()).unwrap();
    let consumer = mqtrace_rdkafka::TracedConsumer::from_config(
        &h.consumer_config(),
        &[&topic],
        forwarder,
        instrumenter.clone(),
    )
    .unwrap()
    .dead_letter_topic(h.name("missing-dlq"));
    let failures = Arc::new(AtomicUsize::new(0));
    let stats = within(
        60,
        consumer.run_until(
            |record| {
                let (ledger, failures) = (ledger.clone(), Arc::clone(&failures));
                async move {
                    let id: usize = record.json()?;
                    let call = ledger.started(id.to_string());
                    if id == 1 {
                        call.finished(false);
                        failures.fetch_add(1, Ordering::SeqCst);
                        return Err(HandlerError::permanent("no such customer"));
                    }
                    call.finished(true);
                    Ok(())
                }
            },
            // The record handled, refused a forward and handled again, twice.
            when_count(&failures, 3),
        ),
    )
    .await
    .unwrap();
    let committed = observe_the_end(&h, &topic, &ledger).await;
    let a = ledger.check(
        "kafka full consumer, dead-letter topic missing",
        Contract::ordered().duplicates(0),
    );
    assert_eq!(stats.dead_lettered, 0);
    assert_eq!(committed, 1, "held at the record whose copy was refused");
    assert_eq!(a.waiting, 4);
}

/// A handler slower than `max.poll.interval.ms` (3 s here; the session too):
/// librdkafka leaves the group while record 1 is in its handler, and the
/// partition is revoked; the consumer joins again and goes on. Nothing is
/// committed past a record before it is settled, offsets never go backwards,
/// order holds and nothing is lost. (Whether record 1 is handled again depends
/// on what the group had committed when the partition came back: here,
/// librdkafka committed the settled records once the consumer was back, and
/// none was handled twice; duplicates would be within the contract.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_the_poll_interval_is_handled_again_not_passed() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let (topic, ledger) = five_records(&h, "slow", &instrumenter).await;
    let mut config = h.consumer_config();
    config
        .set("session.timeout.ms", "3000")
        .set("max.poll.interval.ms", "3000");
    let consumer = h.consumer_with(&config, &[&topic], &instrumenter);
    let done = Arc::new(AtomicUsize::new(0));
    within(
        90,
        consumer.run_until(
            |record| {
                let (ledger, done) = (ledger.clone(), Arc::clone(&done));
                async move {
                    let id: usize = record.json()?;
                    let call = ledger.started(id.to_string());
                    if id == 1 && ledger.successes("1") == 0 {
                        tokio::time::sleep(Duration::from_millis(4_500)).await;
                    }
                    call.finished(true);
                    if id == 4 {
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(())
                }
            },
            when_count(&done, 1),
        ),
    )
    .await
    .unwrap();
    let committed = observe_the_end(&h, &topic, &ledger).await;
    let a = ledger.check(
        "kafka full consumer, handler slower than max.poll.interval.ms",
        Contract::ordered(),
    );
    // One revocation when the poll interval ran out, one as the consumer
    // stopped.
    let revocations = consumer.inner().context().revocations();
    println!(
        "kafka handler slower than max.poll.interval.ms: revocations {revocations}, duplicates {}",
        a.duplicates
    );
    assert!(
        revocations >= 2,
        "the slow handler cost the consumer its partition: {revocations}"
    );
    assert_eq!(committed, 5);
}

/// The own loop's default mode, a commit per record (librdkafka's stores off,
/// so only the tracer's commits move the group): the loop's timer-driven
/// `commit_consumer_state` in record 2's handler finds nothing of its own to
/// commit, and the group's offset is never past a record in its handler; the
/// per-record commits reach 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_loop_committing_each_record_never_commits_past_a_record_in_its_handler() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let (topic, ledger) = five_records(&h, "percommit", &instrumenter).await;
    let mut config = h.consumer_config();
    config
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let consumer: StreamConsumer = config.create().unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let producer: FutureProducer = h.config().create().unwrap();
    let tracer = mqtrace_rdkafka::RecordTracer::new(instrumenter, producer).config(&config);
    let settled = own_loop(&h, &topic, &consumer, &tracer, &ledger, 5).await;
    assert!(settled.iter().all(|s| !s.settle_failed), "{settled:?}");
    // The asynchronous commits arrive in their time.
    let committed = within(30, async {
        loop {
            let committed = committed_offset(&h, &topic).await;
            if committed == 5 {
                break committed;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    ledger.committed("0", committed);
    still_waiting(&ledger, committed, 5);
    ledger.check(
        "kafka own loop, a commit per record",
        Contract::ordered().duplicates(0),
    );
}
