//! Traced consuming: process spans, commit or forward by outcome.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mqtrace::settle::{ConsumerCounters, ConsumerStats};
use mqtrace::{HandlerResult, Instrumenter};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Message as _, OwnedHeaders, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::carrier::HeadersExtractor;
use crate::describe::{partition_text, ClientInfo};
use crate::process::RecordTracer;
use crate::producer::TracedProducer;

/// How often the full consumer commits the offsets it stored, at most (default).
const COMMIT_INTERVAL: Duration = Duration::from_millis(200);
/// Records settled since the last commit that make the next one due at once
/// (default).
const COMMIT_EVERY: u64 = 1_000;

/// Commits the offsets stored so far, asynchronously: what a rebalance callback
/// can do, since it runs inside a poll. Nothing stored since the last commit is
/// not a failure. (rdkafka 0.39 does not report the answer to an asynchronous
/// commit, rust-rdkafka#856; the consumer's own commits are synchronous, on a
/// blocking thread, for that reason.)
fn commit_stored_async<C: Consumer<StatsContext>>(consumer: &C) {
    consumer
        .context()
        .stored_commits
        .fetch_add(1, Ordering::Relaxed);
    match consumer.commit_consumer_state(CommitMode::Async) {
        Ok(()) | Err(NOTHING_STORED) => {}
        Err(e) => {
            tracing::warn!(target: "mqtrace", error = %e, "cannot commit the stored offsets; a later commit covers them, or the records are processed again");
        }
    }
}

/// librdkafka's answer to a commit of stored offsets when none were stored since
/// the last one.
const NOTHING_STORED: rdkafka::error::KafkaError =
    rdkafka::error::KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset);

/// Commits on a blocking thread and waits there for the cluster's answer, so the
/// answer is known (and a failure counted in [`StatsContext::failed_commits`])
/// while the consumer's task goes on serving its events. `offsets` of `None`
/// commits the stored offsets. librdkafka bounds the wait: a commit waiting for
/// an absent coordinator gives up after `session.timeout.ms`.
fn commit_on_blocking_thread(
    consumer: &Arc<StreamConsumer<StatsContext>>,
    offsets: Option<TopicPartitionList>,
) -> tokio::task::JoinHandle<KafkaResult<()>> {
    let consumer = Arc::clone(consumer);
    tokio::task::spawn_blocking(move || {
        let result = match &offsets {
            Some(offsets) => consumer.commit(offsets, CommitMode::Sync),
            None => {
                consumer
                    .context()
                    .stored_commits
                    .fetch_add(1, Ordering::Relaxed);
                match consumer.commit_consumer_state(CommitMode::Sync) {
                    Err(NOTHING_STORED) => Ok(()),
                    other => other,
                }
            }
        };
        if let Err(e) = &result {
            consumer.context().commit_failed(e);
        }
        result
    })
}

/// Attempts of the final commit when a consumer stops.
const FINAL_COMMIT_ATTEMPTS: u32 = 10;

/// How long the final commit waits between attempts, and at most for all of them
/// together, [`FINAL_COMMIT_ATTEMPTS`] times this.
const FINAL_COMMIT_WAIT: Duration = Duration::from_millis(500);

/// A consumer context that keeps what mqtrace reads from librdkafka: the high
/// watermark of every partition from its statistics (so lag costs no request per
/// record), and the commits the cluster reported failed. [`TracedConsumer`] uses
/// it; an own loop gets consumer lag on its process spans by creating its consumer
/// with it (`config.create_with_context(StatsContext::default())`, with
/// `statistics.interval.ms` set) and passing [`StatsContext::lag`] to
/// [`crate::RecordTracer::process_lagging`].
#[derive(Debug, Default)]
pub struct StatsContext {
    high: Mutex<HashMap<String, HashMap<i32, i64>>>,
    failed_commits: AtomicU64,
    /// Commits of the stored offsets the consumer asked for.
    stored_commits: AtomicU64,
    /// Rebalances that revoked partitions from this consumer.
    revocations: AtomicU64,
    /// Partitions revoked since the full consumer last took them (it forgets
    /// their positions: a partition's new owner commits its progress).
    revoked: Mutex<Vec<(String, i32)>>,
    /// Commit the stored offsets when partitions are revoked (the full consumer,
    /// which stores offsets and commits them in batches).
    commit_stored_on_revoke: std::sync::atomic::AtomicBool,
    /// The statistics as metrics, when made with [`StatsContext::metered`].
    gauges: Option<StatsGauges>,
}

/// `mqtrace.kafka.partition.fetch_queue.messages`: records fetched and waiting in
/// librdkafka's queue for the application, per topic and partition.
pub const FETCH_QUEUE: &str = "mqtrace.kafka.partition.fetch_queue.messages";
/// `mqtrace.kafka.client.queue.messages`: messages in the client's producer queue.
pub const CLIENT_QUEUE: &str = "mqtrace.kafka.client.queue.messages";
/// `mqtrace.kafka.broker.rtt.average`: the broker's request round-trip time over
/// the last statistics window, in seconds, per broker (`mqtrace.kafka.broker`).
pub const BROKER_RTT_AVERAGE: &str = "mqtrace.kafka.broker.rtt.average";
/// `mqtrace.kafka.broker.rtt.p99`: its 99th percentile, in seconds.
pub const BROKER_RTT_P99: &str = "mqtrace.kafka.broker.rtt.p99";
/// The broker attribute of the round-trip gauges: librdkafka's broker name.
pub const BROKER: &str = "mqtrace.kafka.broker";

/// librdkafka's statistics bridged to gauges, recorded at every statistics
/// callback.
#[derive(Debug)]
struct StatsGauges {
    conventions: mqtrace::Conventions,
    fetch_queue: opentelemetry::metrics::Gauge<i64>,
    client_queue: opentelemetry::metrics::Gauge<i64>,
    rtt_average: opentelemetry::metrics::Gauge<f64>,
    rtt_p99: opentelemetry::metrics::Gauge<f64>,
}

impl StatsGauges {
    fn new(instrumenter: &Instrumenter) -> Self {
        let meter = instrumenter.meter();
        let rtt = |name: &'static str, what: &'static str| {
            meter
                .f64_gauge(name)
                .with_unit("s")
                .with_description(what)
                .build()
        };
        Self {
            conventions: instrumenter.conventions(),
            fetch_queue: meter
                .i64_gauge(FETCH_QUEUE)
                .with_unit("{message}")
                .with_description("Records fetched and waiting for the application.")
                .build(),
            client_queue: meter
                .i64_gauge(CLIENT_QUEUE)
                .with_unit("{message}")
                .with_description("Messages in the client's producer queue.")
                .build(),
            rtt_average: rtt(BROKER_RTT_AVERAGE, "Broker round-trip time, average."),
            rtt_p99: rtt(BROKER_RTT_P99, "Broker round-trip time, 99th percentile."),
        }
    }

    fn record(&self, statistics: &Statistics) {
        let mut system = Vec::new();
        self.conventions
            .system_attributes(mqtrace::MessagingSystem::Kafka, &mut system);
        self.client_queue.record(
            i64::try_from(statistics.msg_cnt).unwrap_or(i64::MAX),
            &system,
        );
        for broker in statistics.brokers.values() {
            let Some(rtt) = &broker.rtt else { continue };
            if rtt.cnt == 0 {
                continue;
            }
            let mut attributes = system.clone();
            attributes.push(opentelemetry::KeyValue::new(BROKER, broker.name.clone()));
            // librdkafka reports microseconds.
            self.rtt_average.record(rtt.avg as f64 / 1e6, &attributes);
            self.rtt_p99.record(rtt.p99 as f64 / 1e6, &attributes);
        }
        for (name, topic) in &statistics.topics {
            for (p, partition) in &topic.partitions {
                // -1 is librdkafka's internal unassigned partition.
                if *p < 0 || partition.fetchq_cnt < 0 {
                    continue;
                }
                let mut attributes = system.clone();
                attributes.push(opentelemetry::KeyValue::new(
                    mqtrace::conventions::attr::MESSAGING_DESTINATION_NAME,
                    name.clone(),
                ));
                self.conventions.position_attributes(
                    mqtrace::MessagingSystem::Kafka,
                    Some(&partition_text(*p)),
                    None,
                    &mut attributes,
                );
                self.fetch_queue.record(partition.fetchq_cnt, &attributes);
            }
        }
    }
}

impl StatsContext {
    /// A context that also records librdkafka's statistics as gauges, from the
    /// instrumenter's meter: [`FETCH_QUEUE`] per partition, [`CLIENT_QUEUE`], and
    /// [`BROKER_RTT_AVERAGE`] and [`BROKER_RTT_P99`] per broker (what
    /// [`TracedConsumer`] uses); none when the instrumenter's metrics are off.
    pub fn metered(instrumenter: &Instrumenter) -> Self {
        Self {
            // Off with the instrumenter's metrics.
            gauges: instrumenter
                .metrics_on()
                .then(|| StatsGauges::new(instrumenter)),
            ..Self::default()
        }
    }

    /// Records behind the partition's high watermark after `record`, from the
    /// latest statistics; `None` before the first statistics arrived.
    pub fn lag<M: rdkafka::message::Message>(&self, record: &M) -> Option<i64> {
        let high = self.high.lock().ok()?;
        let hi = *high.get(record.topic())?.get(&record.partition())?;
        Some((hi - record.offset() - 1).max(0))
    }

    /// Commits the cluster reported failed so far: [`TracedConsumer`]'s, which
    /// wait for the answer. (An own loop's asynchronous commits are not counted:
    /// rdkafka 0.39 does not report their answers, rust-rdkafka#856.)
    pub fn failed_commits(&self) -> u64 {
        self.failed_commits.load(Ordering::Relaxed)
    }

    /// Counts and logs a commit the cluster did not store.
    fn commit_failed(&self, error: &rdkafka::error::KafkaError) {
        self.failed_commits.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: "mqtrace", error = %error, "commit failed; a later commit covers it, or the records are processed again");
    }

    /// Commits of the stored offsets the full consumer asked for so far: one per
    /// interval with settled records, one per revocation (the final commit at stop
    /// is apart).
    pub fn stored_commits(&self) -> u64 {
        self.stored_commits.load(Ordering::Relaxed)
    }

    /// Rebalances that revoked this consumer's partitions so far (the full
    /// consumer commits its settled records' offsets at each).
    pub fn revocations(&self) -> u64 {
        self.revocations.load(Ordering::Relaxed)
    }
}

impl ClientContext for StatsContext {
    fn stats(&self, statistics: Statistics) {
        if let Some(gauges) = &self.gauges {
            gauges.record(&statistics);
        }
        let Ok(mut high) = self.high.lock() else {
            return;
        };
        for (name, topic) in statistics.topics {
            let partitions = high.entry(name).or_default();
            for (p, partition) in topic.partitions {
                if p >= 0 && partition.hi_offset >= 0 {
                    partitions.insert(p, partition.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for StatsContext {
    fn pre_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        // Settled records' offsets go out before the partitions move, so their new
        // owner does not handle them again. Asynchronous: this runs inside a poll.
        let rdkafka::consumer::Rebalance::Revoke(partitions) = rebalance else {
            return;
        };
        if self.commit_stored_on_revoke.load(Ordering::Relaxed) {
            if let Ok(mut revoked) = self.revoked.lock() {
                revoked.extend(
                    partitions
                        .elements()
                        .iter()
                        .map(|p| (p.topic().to_owned(), p.partition())),
                );
            }
            commit_stored_async(consumer);
        }
        // After the partitions are listed: the consumer takes them when it sees
        // the count move.
        self.revocations.fetch_add(1, Ordering::Release);
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = &result {
            self.commit_failed(e);
        }
    }
}

/// The position after the last settled record of each partition: what the
/// final commit commits. Updated for every settled record, so a topic's name is
/// copied only the first time it is seen.
#[derive(Debug, Default)]
struct Positions(HashMap<String, HashMap<i32, i64>>);

impl Positions {
    /// Records that the record at `offset` is settled.
    fn settled(&mut self, topic: &str, partition: i32, offset: i64) {
        let next = offset + 1;
        match self.0.get_mut(topic) {
            Some(partitions) => {
                partitions.insert(partition, next);
            }
            None => {
                self.0
                    .insert(topic.to_owned(), HashMap::from([(partition, next)]));
            }
        }
    }

    /// Forgets the partitions revoked since it last looked, when `seen` (the
    /// revocations counted then) moved: their positions are older than what
    /// their next owner commits, and a partition that comes back starts from the
    /// group's committed offset. Returns the partitions forgotten.
    fn forget_revoked(&mut self, context: &StatsContext, seen: &mut u64) -> Vec<(String, i32)> {
        let now = context.revocations.load(Ordering::Acquire);
        if now == *seen {
            return Vec::new();
        }
        *seen = now;
        let revoked = match context.revoked.lock() {
            Ok(mut revoked) => std::mem::take(&mut *revoked),
            Err(_) => return Vec::new(),
        };
        for (topic, partition) in &revoked {
            if let Some(partitions) = self.0.get_mut(topic) {
                partitions.remove(partition);
            }
        }
        revoked
    }

    /// Topic, partition and position of every partition seen.
    fn iter(&self) -> impl Iterator<Item = (&str, i32, i64)> + '_ {
        self.0.iter().flat_map(|(topic, partitions)| {
            partitions
                .iter()
                .map(move |(&partition, &next)| (topic.as_str(), partition, next))
        })
    }
}

/// A consumed record as the handler sees it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Record {
    inner: Arc<OwnedMessage>,
    attempt: u32,
}

// === impl Record ===

impl Record {
    /// Which delivery attempt this is (1 = first), counting mqtrace's retries.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        self.inner.topic()
    }

    /// The partition.
    pub fn partition(&self) -> i32 {
        self.inner.partition()
    }

    /// The offset.
    pub fn offset(&self) -> i64 {
        self.inner.offset()
    }

    /// The key, if any.
    pub fn key(&self) -> Option<&[u8]> {
        self.inner.key()
    }

    /// The payload; `None` for a tombstone.
    pub fn payload(&self) -> Option<&[u8]> {
        self.inner.payload()
    }

    /// The headers, if any.
    pub fn headers(&self) -> Option<&OwnedHeaders> {
        self.inner.headers()
    }

    /// A header's value when it is UTF-8 (see [`HeadersExtractor`]).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.inner
            .headers()
            .and_then(|h| HeadersExtractor(h).value(name))
    }

    /// The record's timestamp, in milliseconds since the epoch.
    pub fn timestamp_millis(&self) -> Option<i64> {
        self.inner.timestamp().to_millis()
    }

    /// The payload decoded as JSON. Invalid JSON (or a tombstone) is a permanent
    /// failure (`error.type = invalid_json`): retrying cannot fix it, so the record
    /// goes to the dead-letter topic.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, mqtrace::HandlerError> {
        let payload = self.payload().ok_or_else(|| {
            mqtrace::HandlerError::permanent("a tombstone has no payload").with_type("invalid_json")
        })?;
        serde_json::from_slice(payload)
            .map_err(|e| mqtrace::HandlerError::permanent(e).with_type("invalid_json"))
    }
}

/// Consumes topics of a Kafka cluster: each record is processed inside a `process`
/// span (CONSUMER) and settled by its outcome, after its handler has finished:
///
/// - success: its offset is committed;
/// - transient failure within the retry budget: forwarded to the retry topic (the
///   record's own topic unless [`TracedConsumer::retry_topic`] says otherwise) with
///   a forward span, the attempt counter and the original bytes, then committed;
/// - permanent failure, or the budget spent: forwarded to the dead-letter topic with
///   the failure metadata, then committed; without a dead-letter topic it is
///   committed and recorded as `dropped`.
///
/// Records are handled one at a time, so each partition's order is kept and no
/// offset is committed ahead of a record whose handler is still running. A forward
/// that fails is not committed: the consumer seeks back to the record and handles
/// it again, so the partition waits rather than lose it.
pub struct TracedConsumer {
    consumer: Arc<StreamConsumer<StatsContext>>,
    tracer: RecordTracer,
    missing_topic_timeout: Duration,
    /// At most this long, or this many settled records, between commits.
    commit_every: (Duration, u64),
}

/// Why [`TracedConsumer::run_until`] stopped before being asked to.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// The cluster refused the consumer (authentication or authorization failed,
    /// or a subscribed topic does not exist): waiting would not help. The records
    /// settled until then are in `stats`, and their offsets were committed.
    #[error("the Kafka cluster refused the consumer: {error}")]
    Refused {
        /// rdkafka's error, unchanged.
        #[source]
        error: rdkafka::error::KafkaError,
        /// What the consumer did before it stopped.
        stats: ConsumerStats,
    },
}

/// Serves `events` until `until` completes (its output) or `deadline` passes
/// (`None`). The stream yields only records, and serves the rest (rebalances,
/// statistics) on the way; a record received here is not handled: its offset is
/// not committed, and the group reads it again.
async fn serve_until<F: Future>(
    events: &mut rdkafka::consumer::MessageStream<'_, StatsContext>,
    until: F,
    deadline: tokio::time::Instant,
) -> Option<F::Output> {
    let mut until = std::pin::pin!(until);
    loop {
        tokio::select! {
            output = &mut until => break Some(output),
            () = tokio::time::sleep_until(deadline) => break None,
            _ = futures_util::StreamExt::next(events) => {}
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

enum Fatality {
    Refused,
    MissingTopic,
}

/// Whether a consumer error means the cluster will not serve this consumer.
fn fatality(error: &rdkafka::error::KafkaError) -> Option<Fatality> {
    use rdkafka::types::RDKafkaErrorCode as Code;
    match error.rdkafka_error_code()? {
        Code::Authentication
        | Code::SaslAuthenticationFailed
        | Code::TopicAuthorizationFailed
        | Code::GroupAuthorizationFailed
        | Code::ClusterAuthorizationFailed
        | Code::Fatal => Some(Fatality::Refused),
        Code::UnknownTopicOrPartition | Code::UnknownTopic => Some(Fatality::MissingTopic),
        _ => None,
    }
}

impl std::fmt::Debug for TracedConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TracedConsumer")
            .field("tracer", &self.tracer)
            .finish_non_exhaustive()
    }
}

// === impl TracedConsumer ===

impl TracedConsumer {
    /// Creates the consumer from `config` (which needs `group.id`) and subscribes
    /// to `topics`. librdkafka's auto-commit is turned off: settling a record
    /// stores its offset ([`RecordTracer::store_offsets`]), and the consumer
    /// commits the stored offsets every 200 ms (at once after 1,000 records),
    /// when partitions are revoked, and at stop: a commit request per interval
    /// rather than per record, never past a record not yet settled. `forwarder`
    /// publishes retries and dead letters.
    pub fn from_config(
        config: &ClientConfig,
        topics: &[&str],
        forwarder: TracedProducer,
        instrumenter: Instrumenter,
    ) -> KafkaResult<Self> {
        let mut config = config.clone();
        config
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        if config.get("statistics.interval.ms").is_none() {
            config.set("statistics.interval.ms", "1000");
        }
        let context = StatsContext::metered(&instrumenter);
        context
            .commit_stored_on_revoke
            .store(true, Ordering::Relaxed);
        let consumer: StreamConsumer<StatsContext> = config.create_with_context(context)?;
        consumer.subscribe(topics)?;
        Ok(Self {
            consumer: Arc::new(consumer),
            tracer: RecordTracer::with_forwarder(instrumenter, forwarder, ClientInfo::default())
                .config(&config)
                .store_offsets(true),
            missing_topic_timeout: Duration::from_secs(10),
            commit_every: (COMMIT_INTERVAL, COMMIT_EVERY),
        })
    }

    /// Retries go to this topic (default: the record's own topic). Subscribe to
    /// it too, or run a consumer for it.
    pub fn retry_topic(mut self, topic: impl Into<String>) -> Self {
        self.tracer = self.tracer.retry_topic(topic);
        self
    }

    /// Permanent failures and spent budgets go to this topic.
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.tracer = self.tracer.dead_letter_topic(topic);
        self
    }

    /// Emit a `poll` span (CLIENT) per received record, linking it (default: off).
    pub fn receive_spans(mut self, on: bool) -> Self {
        self.tracer = self.tracer.receive_spans(on);
        self
    }

    /// Emit a `commit` span (CLIENT) per commit, child of the process span
    /// (default: the instrumenter's setting, off unless set).
    pub fn settle_spans(mut self, on: bool) -> Self {
        self.tracer = self.tracer.settle_spans(on);
        self
    }

    /// How long a forward may wait in the producer's queue (default 30 s).
    pub fn forward_timeout(mut self, timeout: Duration) -> Self {
        self.tracer = self.tracer.forward_timeout(timeout);
        self
    }

    /// How long after a subscribed topic is reported missing the consumer gives up
    /// with [`ConsumeError::Refused`], when no record arrived meanwhile and it holds
    /// no partition (default 10 s; librdkafka itself waits
    /// `topic.metadata.propagation.max.ms`, 30 s unless set, before it reports a
    /// topic missing).
    pub fn missing_topic_timeout(mut self, timeout: Duration) -> Self {
        self.missing_topic_timeout = timeout;
        self
    }

    /// How often the stored offsets are committed: at most `interval` after a
    /// record is settled, or at once when `records` are settled since the last
    /// commit (default 200 ms, 1,000 records). Commits on revocation and at stop
    /// happen either way. Longer means fewer commit requests, and more records
    /// handled again after a crash.
    pub fn commit_every(mut self, interval: Duration, records: u64) -> Self {
        self.commit_every = (interval, records.max(1));
        self
    }

    /// The consumer.
    pub fn inner(&self) -> &StreamConsumer<StatsContext> {
        &self.consumer
    }

    /// Consumes until `shutdown` completes. A record being handled when it does is
    /// finished and settled first; then the offsets are committed once more, waiting
    /// (for up to five seconds) for the cluster's answer.
    ///
    /// Errors the cluster may recover from (it is away, a partition moves) are
    /// logged and waited out. It stops early, after the same final commit, with
    /// [`ConsumeError::Refused`] when the cluster refuses the consumer
    /// (authentication, authorization), or when a subscribed topic does not exist
    /// for longer than [`TracedConsumer::missing_topic_timeout`].
    pub async fn run_until<H, Fut, S>(
        &self,
        handler: H,
        shutdown: S,
    ) -> Result<ConsumerStats, ConsumeError>
    where
        H: Fn(Record) -> Fut,
        Fut: Future<Output = HandlerResult>,
        S: Future<Output = ()>,
    {
        let counters = ConsumerCounters::new();
        let failed_before = self.consumer.context().failed_commits();
        // The position after the last settled record, per partition held.
        let mut positions = Positions::default();
        let mut revocations = self.consumer.context().revocations();
        let mut shutdown = std::pin::pin!(shutdown);
        // A subscribed topic reported missing (librdkafka says so once), with no
        // record since: when, and the error.
        let mut missing: Option<(tokio::time::Instant, rdkafka::error::KafkaError)> = None;
        let mut refused = None;
        // Settled records whose stored offsets are not committed yet, and since when.
        let mut uncommitted: u64 = 0;
        let (interval, every) = self.commit_every;
        let mut commit_due = tokio::time::Instant::now() + interval;
        // The commit of stored offsets waiting for the cluster's answer, if any.
        let mut committing = None;
        loop {
            if uncommitted > 0
                && (uncommitted >= every || tokio::time::Instant::now() >= commit_due)
            {
                // One commit in flight at a time: while the cluster is slow to
                // answer, the next one waits and then covers both.
                if committing
                    .as_ref()
                    .is_none_or(tokio::task::JoinHandle::<KafkaResult<()>>::is_finished)
                {
                    committing = Some(commit_on_blocking_thread(&self.consumer, None));
                    uncommitted = 0;
                } else {
                    commit_due = tokio::time::Instant::now() + interval;
                }
            }
            if uncommitted == 0 {
                commit_due = tokio::time::Instant::now() + interval;
            }
            let give_up = missing
                .as_ref()
                .map(|(since, _)| *since + self.missing_topic_timeout);
            // When the poll began: what a `poll` span covers.
            let polled_at = std::time::SystemTime::now();
            let received = tokio::select! {
                biased;
                () = shutdown.as_mut() => break,
                // Idle with settled records not committed: commit them on time.
                () = tokio::time::sleep_until(commit_due), if uncommitted > 0 => continue,
                () = sleep_until(give_up) => {
                    // Partitions assigned after all: the report was passing (a
                    // cluster coming back), not a topic that is not there.
                    let assigned = self.consumer.assignment().is_ok_and(|a| a.count() > 0);
                    match missing.take() {
                        Some((_, e)) if !assigned => {
                            refused = Some(e);
                            break;
                        }
                        _ => continue,
                    }
                }
                received = self.consumer.recv() => received.map(|m| m.detach()),
            };
            // Partitions revoked during the poll leave the positions, and end
            // any hold of theirs (a failed seek back paused them).
            for (topic, partition) in
                positions.forget_revoked(self.consumer.context(), &mut revocations)
            {
                self.tracer.release(&*self.consumer, &topic, partition);
            }
            match received {
                Ok(message) => {
                    missing = None;
                    let message = Arc::new(message);
                    let settled = self.handle(Arc::clone(&message), polled_at, &handler).await;
                    counters.record(&settled);
                    // Not past a record whose seek back failed (its partition is
                    // held there).
                    if settled.is_done()
                        && !self.tracer.holds(
                            message.topic(),
                            message.partition(),
                            message.offset(),
                        )
                    {
                        positions.settled(message.topic(), message.partition(), message.offset());
                        uncommitted += 1;
                    }
                }
                Err(e) => {
                    match fatality(&e) {
                        Some(Fatality::Refused) => {
                            refused = Some(e);
                            break;
                        }
                        Some(Fatality::MissingTopic) if missing.is_none() => {
                            tracing::warn!(target: "mqtrace", error = %e, "a subscribed topic is missing");
                            missing = Some((tokio::time::Instant::now(), e));
                            continue;
                        }
                        _ => {}
                    }
                    tracing::warn!(target: "mqtrace", error = %e, "Kafka consumer error");
                    // Errors repeat quickly while the cluster is away.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let _ = positions.forget_revoked(self.consumer.context(), &mut revocations);
        self.final_commit(&positions, committing).await;
        counters.settle_failures(
            self.consumer
                .context()
                .failed_commits()
                .saturating_sub(failed_before),
        );
        match refused {
            Some(error) => {
                tracing::error!(target: "mqtrace", error = %error, "the Kafka cluster refused the consumer; stopping");
                Err(ConsumeError::Refused {
                    error,
                    stats: counters.snapshot(),
                })
            }
            None => Ok(counters.snapshot()),
        }
    }

    /// Commits the position after the last settled record of each partition still
    /// assigned, and waits for the cluster's answer, after the interval commit
    /// still in flight (`committing`). Commits may fail while the cluster is away;
    /// this one is tried again for a few seconds (the group coordinator can take
    /// that long to come back) before giving up, leaving the records to be read
    /// again. It never blocks the consumer's task: each attempt waits on a blocking
    /// thread, while the task serves the consumer's events, and so the rebalances
    /// a returning group may need before it accepts a commit.
    async fn final_commit(
        &self,
        positions: &Positions,
        committing: Option<tokio::task::JoinHandle<KafkaResult<()>>>,
    ) {
        // Only partitions still assigned: one that moved to another member in a
        // rebalance has its progress committed there, and this position is older.
        // Asked again before each attempt: the events served while waiting may
        // run a rebalance that moves partitions away.
        let ours = || {
            let assigned = self.consumer.assignment().ok();
            let mut offsets = TopicPartitionList::new();
            for (topic, partition, next) in positions.iter() {
                let ours = assigned
                    .as_ref()
                    .is_none_or(|a| a.find_partition(topic, partition).is_some());
                if !ours {
                    continue;
                }
                if let Err(e) = offsets.add_partition_offset(topic, partition, Offset::Offset(next))
                {
                    tracing::warn!(target: "mqtrace", error = %e, topic, "cannot commit this partition's position");
                }
            }
            offsets
        };
        let deadline = tokio::time::Instant::now() + FINAL_COMMIT_WAIT * FINAL_COMMIT_ATTEMPTS;
        let mut events = self.consumer.stream();
        if let Some(mut earlier) = committing {
            if serve_until(&mut events, &mut earlier, deadline)
                .await
                .is_none()
            {
                tracing::warn!(target: "mqtrace", "the last interval commit got no answer in time; records after the last committed offset may be processed again");
                return;
            }
        }
        let mut last_error = String::from("no answer from the cluster");
        for _ in 0..FINAL_COMMIT_ATTEMPTS {
            let offsets = ours();
            if offsets.count() == 0 {
                return;
            }
            let mut attempt = commit_on_blocking_thread(&self.consumer, Some(offsets));
            match serve_until(&mut events, &mut attempt, deadline).await {
                Some(Ok(Ok(()))) => return,
                Some(Ok(Err(e))) => last_error = e.to_string(),
                Some(Err(e)) => last_error = e.to_string(),
                None => break,
            }
            if tokio::time::Instant::now() + FINAL_COMMIT_WAIT >= deadline {
                break;
            }
            // The pause serves the consumer's events too.
            serve_until(&mut events, tokio::time::sleep(FINAL_COMMIT_WAIT), deadline).await;
        }
        tracing::warn!(target: "mqtrace", error = %last_error, "final commit failed; records after the last committed offset are processed again");
    }

    /// Processes and settles one record.
    async fn handle<H, Fut>(
        &self,
        inner: Arc<OwnedMessage>,
        polled_at: std::time::SystemTime,
        handler: &H,
    ) -> mqtrace::Settled
    where
        H: Fn(Record) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        let lag = self.consumer.context().lag(&*inner);
        let processed = self
            .tracer
            .process_polled(&*inner, Some(polled_at), lag, |attempt| {
                handler(Record {
                    inner: Arc::clone(&inner),
                    attempt: attempt.number(),
                })
            })
            .await;
        self.tracer
            .settle(processed, &*inner, &*self.consumer)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::Positions;

    #[test]
    fn positions_keep_the_offset_after_each_partition_s_last_settled_record() {
        let mut positions = Positions::default();
        positions.settled("orders", 0, 41);
        positions.settled("orders", 1, 7);
        positions.settled("payments", 0, 3);
        positions.settled("orders", 0, 42);
        let mut all: Vec<_> = positions.iter().collect();
        all.sort_unstable();
        assert_eq!(
            all,
            [("orders", 0, 43), ("orders", 1, 8), ("payments", 0, 4)]
        );
    }

    #[test]
    fn revoked_partitions_leave_the_positions() {
        let context = super::StatsContext::default();
        let mut positions = Positions::default();
        positions.settled("orders", 0, 41);
        positions.settled("orders", 1, 7);
        let mut seen = 0;
        let _ = positions.forget_revoked(&context, &mut seen);
        assert_eq!(positions.iter().count(), 2);
        if let Ok(mut revoked) = context.revoked.lock() {
            revoked.push(("orders".to_owned(), 1));
        }
        context
            .revocations
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        let _ = positions.forget_revoked(&context, &mut seen);
        assert_eq!(positions.iter().collect::<Vec<_>>(), [("orders", 0, 42)]);
        assert_eq!(seen, 1);
    }
}
