//! Traced consuming: process spans, commit or forward by outcome.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mqtrace::settle::{ConsumerCounters, ConsumerStats};
use mqtrace::{HandlerResult, Instrumenter};
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Message as _, OwnedHeaders, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::carrier::HeadersExtractor;
use crate::describe::{partition_text, ClientInfo};
use crate::process::RecordTracer;
use crate::producer::TracedProducer;

/// How often librdkafka commits the full consumer's stored offsets, unless the
/// configuration sets `auto.commit.interval.ms` (milliseconds).
const COMMIT_INTERVAL_MS: &str = "200";

/// How long a stopping consumer waits, at most, for the cluster to answer the
/// commit of its settled records and for its partitions to be given up.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// How often a stopping consumer looks again whether its settled records'
/// offsets are committed, between the events it serves.
const STOP_TICK: Duration = Duration::from_millis(20);

/// A consumer context that keeps what mqtrace reads from librdkafka: the high
/// watermark of every partition from its statistics (so lag costs no request per
/// record), and the answers to the consumer's commits. [`TracedConsumer`] uses
/// it; an own loop gets consumer lag on its process spans by creating its consumer
/// with it (`config.create_with_context(StatsContext::default())`, with
/// `statistics.interval.ms` set) and passing [`StatsContext::lag`] to
/// [`crate::RecordTracer::process_lagging`].
///
/// Commit answers arrive for librdkafka's own commits (`enable.auto.commit=true`:
/// the timer's, on revocation, at close), which is how [`TracedConsumer`]
/// commits, and how an own loop in store mode can
/// ([`crate::RecordTracer::store_offsets`]). librdkafka drops the answers to
/// commits asked for with `Consumer::commit` in `CommitMode::Async` (rdkafka
/// 0.39 gives them no reply queue, rust-rdkafka#856): those are not counted.
#[derive(Debug, Default)]
pub struct StatsContext {
    high: Mutex<HashMap<String, HashMap<i32, i64>>>,
    /// Commit answers received, and those that reported a failure.
    commits: AtomicU64,
    failed_commits: AtomicU64,
    /// The offset the cluster last confirmed committed, per topic and
    /// partition: from commit answers, and from the statistics (which also
    /// show the commits whose answers librdkafka drops).
    committed: Mutex<HashMap<String, HashMap<i32, i64>>>,
    /// Rebalances that revoked partitions from this consumer.
    revocations: AtomicU64,
    /// Partitions revoked since the full consumer last took them (it forgets
    /// their positions: a partition's new owner commits its progress).
    revoked: Mutex<Vec<(String, i32)>>,
    /// Keep the revoked partitions for the full consumer to take (an own loop's
    /// context does not, so that list stays empty).
    track_revoked: std::sync::atomic::AtomicBool,
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

    /// Commit answers that reported a failure so far: the whole request refused
    /// (the coordinator away, the group rebalancing) or any partition's offset
    /// not stored. librdkafka commits the stored offsets again on its next
    /// timer tick, so a failed commit is retried while the offsets stay stored.
    pub fn failed_commits(&self) -> u64 {
        self.failed_commits.load(Ordering::Relaxed)
    }

    /// Commit answers received so far, failed or not: one per commit request
    /// librdkafka made (a timer tick with nothing newly stored makes none).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// The offset the cluster last confirmed committed for a partition, from
    /// the commit answers this consumer received and from its statistics
    /// (`statistics.interval.ms`).
    pub fn committed(&self, topic: &str, partition: i32) -> Option<i64> {
        let committed = self.committed.lock().ok()?;
        committed.get(topic)?.get(&partition).copied()
    }

    /// Takes a confirmed committed offset; the highest seen stands (a commit's
    /// answer can overtake the statistics made before it).
    fn confirmed(
        committed: &mut HashMap<String, HashMap<i32, i64>>,
        topic: &str,
        partition: i32,
        at: i64,
    ) {
        let partitions = match committed.get_mut(topic) {
            Some(partitions) => partitions,
            None => committed.entry(topic.to_owned()).or_default(),
        };
        let entry = partitions.entry(partition).or_insert(at);
        *entry = (*entry).max(at);
    }

    /// The partitions revoked since the last call.
    fn take_revoked(&self) -> Vec<(String, i32)> {
        match self.revoked.lock() {
            Ok(mut revoked) => std::mem::take(&mut *revoked),
            Err(_) => Vec::new(),
        }
    }

    /// Rebalances that revoked this consumer's partitions so far (the full
    /// consumer's settled offsets are committed at each, by librdkafka).
    pub fn revocations(&self) -> u64 {
        self.revocations.load(Ordering::Relaxed)
    }
}

impl ClientContext for StatsContext {
    fn stats(&self, statistics: Statistics) {
        if let Some(gauges) = &self.gauges {
            gauges.record(&statistics);
        }
        if let Ok(mut committed) = self.committed.lock() {
            for (name, topic) in &statistics.topics {
                for (p, partition) in &topic.partitions {
                    if *p >= 0 && partition.committed_offset >= 0 {
                        Self::confirmed(&mut committed, name, *p, partition.committed_offset);
                    }
                }
            }
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
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        let rdkafka::consumer::Rebalance::Revoke(partitions) = rebalance else {
            return;
        };
        // librdkafka commits the revoked partitions' stored offsets itself
        // (`enable.auto.commit=true`), after this callback; the answer comes
        // back as an event like any other commit's.
        if self.track_revoked.load(Ordering::Relaxed) {
            if let Ok(mut revoked) = self.revoked.lock() {
                revoked.extend(
                    partitions
                        .elements()
                        .iter()
                        .map(|p| (p.topic().to_owned(), p.partition())),
                );
            }
        }
        // After the partitions are listed: the consumer takes them when it sees
        // the count move.
        self.revocations.fetch_add(1, Ordering::Release);
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        let mut failed = result.as_ref().err().map(ToString::to_string);
        if let Ok(mut committed) = self.committed.lock() {
            for p in offsets.elements() {
                match (p.error(), p.offset()) {
                    (Err(e), _) => {
                        failed.get_or_insert_with(|| e.to_string());
                    }
                    (Ok(()), Offset::Offset(at)) if result.is_ok() => {
                        Self::confirmed(&mut committed, p.topic(), p.partition(), at);
                    }
                    _ => {}
                }
            }
        }
        if let Some(error) = failed {
            self.failed_commits.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "mqtrace", %error, "commit failed; librdkafka commits the stored offsets again, or the records are processed again");
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
        let revoked = context.take_revoked();
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
///
/// Offsets are committed by librdkafka (`enable.auto.commit=true` with
/// `enable.auto.offset.store=false`): settling a record stores its offset, and
/// librdkafka commits what is stored every `auto.commit.interval.ms` (200 ms
/// unless the configuration says otherwise), when partitions are revoked, and
/// when the consumer stops. Every answer comes back through the consumer's
/// events: a refused commit is counted ([`StatsContext::failed_commits`], and in
/// the stats' `settle_failures`) and made again on the next tick, since the
/// offsets stay stored.
///
/// Dropping the consumer closes it on a thread of its own (`mqtrace-kafka-close`):
/// librdkafka's close waits for the group coordinator, up to
/// `session.timeout.ms` when it is away, and neither the caller nor the
/// process's exit waits with it. A process that exits right after the drop may
/// cut that close short; [`TracedConsumer::close`] waits for it, within a
/// bound.
pub struct TracedConsumer {
    consumer: Closing,
    topics: Vec<String>,
    tracer: RecordTracer,
    missing_topic_timeout: Duration,
}

/// The consumer, closed on a thread of its own when dropped.
struct Closing(Option<StreamConsumer<StatsContext>>);

impl std::ops::Deref for Closing {
    type Target = StreamConsumer<StatsContext>;

    fn deref(&self) -> &Self::Target {
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("the consumer is taken only when dropped"))
    }
}

impl Closing {
    /// Takes the consumer and closes it on a thread of its own; the receiver
    /// hears when the close is over. `None` when it was closed already, or when
    /// the thread did not start: the consumer was then closed on this one.
    fn close(&mut self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let consumer = self.0.take()?;
        let (closed, done) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("mqtrace-kafka-close".into())
            .spawn(move || {
                drop(consumer);
                let _ = closed.send(());
            })
            .ok()
            .map(|_| done)
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// Why [`TracedConsumer::run_until`] stopped before being asked to.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// The cluster refused the consumer (authentication or authorization failed,
    /// or a subscribed topic does not exist): waiting would not help. The records
    /// settled until then are in `stats`; the stop waited, as it always does,
    /// for the cluster to confirm their offsets committed (a cluster that
    /// refuses the consumer may refuse that too: they are then read again).
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
/// statistics, commit answers) on the way. A record received here is not
/// handled: the first of each partition is sought back to, so that neither it
/// nor the records fetched after it are passed (the seek drops them from
/// librdkafka's queue, and they are fetched again if the consumer runs again
/// before giving the partition up); `sought` keeps the partitions already
/// sought back.
async fn serve_until<F: Future>(
    consumer: &StreamConsumer<StatsContext>,
    events: &mut rdkafka::consumer::MessageStream<'_, StatsContext>,
    until: F,
    deadline: tokio::time::Instant,
    sought: &mut std::collections::HashSet<(String, i32)>,
) -> Option<F::Output> {
    let mut until = std::pin::pin!(until);
    loop {
        tokio::select! {
            output = &mut until => break Some(output),
            () = tokio::time::sleep_until(deadline) => break None,
            received = futures_util::StreamExt::next(events) => {
                let Some(Ok(record)) = received else { continue };
                let key = (record.topic().to_owned(), record.partition());
                if sought.contains(&key) {
                    continue;
                }
                // A zero timeout: librdkafka seeks asynchronously. A partition
                // given up meanwhile answers an error, and is read again from
                // the group's committed offset by whoever takes it.
                if let Err(e) = consumer.seek(
                    record.topic(),
                    record.partition(),
                    Offset::Offset(record.offset()),
                    Duration::ZERO,
                ) {
                    tracing::debug!(target: "mqtrace", error = %e, "cannot seek back to a record received while stopping");
                }
                sought.insert(key);
            }
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
    /// to `topics`. Settling a record stores its offset
    /// ([`RecordTracer::store_offsets`]) and librdkafka commits the stored
    /// offsets: `enable.auto.commit=true` and `enable.auto.offset.store=false`
    /// are set whatever `config` says, and `auto.commit.interval.ms` is 200 unless
    /// `config` sets it. A commit request per interval rather than per record,
    /// never past a record not yet settled. `forwarder` publishes retries and
    /// dead letters.
    pub fn from_config(
        config: &ClientConfig,
        topics: &[&str],
        forwarder: TracedProducer,
        instrumenter: Instrumenter,
    ) -> KafkaResult<Self> {
        let mut config = config.clone();
        config
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false");
        if config.get("auto.commit.interval.ms").is_none() {
            config.set("auto.commit.interval.ms", COMMIT_INTERVAL_MS);
        }
        if config.get("statistics.interval.ms").is_none() {
            config.set("statistics.interval.ms", "1000");
        }
        let context = StatsContext::metered(&instrumenter);
        context.track_revoked.store(true, Ordering::Relaxed);
        let consumer: StreamConsumer<StatsContext> = config.create_with_context(context)?;
        consumer.subscribe(topics)?;
        Ok(Self {
            consumer: Closing(Some(consumer)),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            tracer: RecordTracer::with_forwarder(instrumenter, forwarder, ClientInfo::default())
                .config(&config)
                .store_offsets(true),
            missing_topic_timeout: Duration::from_secs(10),
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

    /// The consumer.
    pub fn inner(&self) -> &StreamConsumer<StatsContext> {
        &self.consumer
    }

    /// Closes the consumer (librdkafka's close: the last commit of what is
    /// stored, leaving the group) on a thread of its own, and waits for it up
    /// to `within`. Returns whether it closed in that time; if not, it goes on
    /// closing on its thread. Call it before a process exits, after
    /// [`TracedConsumer::run_until`], so the group hands the partitions on at
    /// once instead of after `session.timeout.ms`.
    pub async fn close(mut self, within: Duration) -> bool {
        match self.consumer.close() {
            Some(done) => tokio::time::timeout(within, done).await.is_ok(),
            None => true,
        }
    }

    /// Consumes until `shutdown` completes. A record being handled when it does is
    /// finished and settled first. Then the consumer waits, for up to five
    /// seconds, until the cluster has confirmed the commit of every settled
    /// record's offset (librdkafka makes it on its next tick, and again after a
    /// refusal), and gives its partitions up (it unsubscribes, and librdkafka
    /// commits once more as it lets them go). Running it again subscribes again.
    ///
    /// Errors the cluster may recover from (it is away, a partition moves) are
    /// logged and waited out. It stops early, the same way, with
    /// [`ConsumeError::Refused`] when the cluster refuses the consumer
    /// (authentication, authorization), or when a subscribed topic does not exist
    /// for longer than [`TracedConsumer::missing_topic_timeout`].
    ///
    /// The stats' `settle_failures` include the commits the cluster refused
    /// during the run.
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
        // Given up by an earlier run.
        if self.consumer.subscription().is_ok_and(|s| s.count() == 0) {
            let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
            if let Err(error) = self.consumer.subscribe(&topics) {
                tracing::error!(target: "mqtrace", %error, "cannot subscribe again");
                return Err(ConsumeError::Refused {
                    error,
                    stats: counters.snapshot(),
                });
            }
        }
        // The position after the last settled record, per partition held.
        let mut positions = Positions::default();
        let mut revocations = self.consumer.context().revocations();
        // Revoked before this run (an earlier run's giving up): no position of
        // this run's is theirs, and any hold of theirs ends.
        for (topic, partition) in self.consumer.context().take_revoked() {
            self.tracer.release(&*self.consumer, &topic, partition);
        }
        let mut shutdown = std::pin::pin!(shutdown);
        // A subscribed topic reported missing (librdkafka says so once), with no
        // record since: when, and the error.
        let mut missing: Option<(tokio::time::Instant, rdkafka::error::KafkaError)> = None;
        let mut refused = None;
        loop {
            let give_up = missing
                .as_ref()
                .map(|(since, _)| *since + self.missing_topic_timeout);
            // When the poll began: what a `poll` span covers.
            let polled_at = std::time::SystemTime::now();
            let received = tokio::select! {
                biased;
                () = shutdown.as_mut() => break,
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
            self.forget_revoked(&mut positions, &mut revocations);
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
        self.stop(&mut positions, &mut revocations).await;
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

    /// Partitions revoked since the consumer last looked leave the positions,
    /// and any hold of theirs ends (a failed seek back paused them).
    fn forget_revoked(&self, positions: &mut Positions, revocations: &mut u64) {
        for (topic, partition) in positions.forget_revoked(self.consumer.context(), revocations) {
            self.tracer.release(&*self.consumer, &topic, partition);
        }
    }

    /// Waits until the cluster has confirmed the commit of every settled record
    /// of the partitions still held (up to [`STOP_WAIT`]), then unsubscribes and
    /// waits until the partitions are given up and librdkafka's commit of them
    /// is answered (the rest of that bound, half a second at least). Never
    /// blocks the task: it serves the consumer's events meanwhile (the commit
    /// answers and rebalances come that way; a record received is not handled,
    /// and its partition is sought back to it).
    async fn stop(&self, positions: &mut Positions, revocations: &mut u64) {
        let context = self.consumer.context();
        let deadline = tokio::time::Instant::now() + STOP_WAIT;
        let mut events = self.consumer.stream();
        let mut sought = std::collections::HashSet::new();
        // The settled positions not confirmed committed yet, of partitions held.
        let unconfirmed = |positions: &Positions| -> usize {
            let assigned = self.consumer.assignment().ok();
            positions
                .iter()
                .filter(|(topic, partition, next)| {
                    let held = assigned
                        .as_ref()
                        .is_none_or(|a| a.find_partition(topic, *partition).is_some());
                    held && context
                        .committed(topic, *partition)
                        .is_none_or(|at| at < *next)
                })
                .count()
        };
        if unconfirmed(positions) > 0 {
            // librdkafka's next tick would commit them too; this one does not
            // wait for it. Its answer is dropped (rust-rdkafka#856), but the
            // statistics show what it stored; refused, the tick commits again.
            // An asynchronous commit only queues the request: no error to read.
            let _ = self
                .consumer
                .commit_consumer_state(rdkafka::consumer::CommitMode::Async);
        }
        loop {
            self.forget_revoked(positions, revocations);
            let left = unconfirmed(positions);
            if left == 0 {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(target: "mqtrace", partitions = left, "the cluster did not confirm the last commits in time; records after the last committed offset are processed again");
                break;
            }
            let tick = tokio::time::sleep(STOP_TICK);
            serve_until(&self.consumer, &mut events, tick, deadline, &mut sought).await;
        }
        // Giving the partitions up: librdkafka commits their stored offsets once
        // more (the same ones, when confirmed above) and then leaves the group
        // (sent once that commit is answered, which is why this waits for it).
        let answered = context.commits();
        let expect_answer = positions.iter().next().is_some();
        self.consumer.unsubscribe();
        let deadline = deadline.max(tokio::time::Instant::now() + STOP_TICK * 25);
        loop {
            self.forget_revoked(positions, revocations);
            let given_up = self.consumer.assignment().is_ok_and(|a| a.count() == 0);
            if given_up && (!expect_answer || context.commits() > answered) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            let tick = tokio::time::sleep(STOP_TICK);
            serve_until(&self.consumer, &mut events, tick, deadline, &mut sought).await;
        }
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
