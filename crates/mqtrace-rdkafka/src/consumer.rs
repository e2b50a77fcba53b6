//! Traced consuming: process spans, commit or forward by outcome.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mqtrace::{
    Disposition, ForwardKind, HandlerResult, Inbound, Instrumenter, MessageDescription,
    OperationType, Processed,
};
use opentelemetry::propagation::Extractor;
use opentelemetry::KeyValue;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::carrier::{HeadersExtractor, OwnedHeadersInjector};
use crate::describe::{error_type, key_attribute, ClientInfo};
use crate::producer::{record_delivery, TracedProducer};

/// `mqtrace.kafka.consumer.lag`: records behind the partition's high watermark when
/// this one was processed, from librdkafka's statistics (refreshed every
/// `statistics.interval.ms`, 1 s unless set). The conventions have no name for it.
pub const CONSUMER_LAG: &str = "mqtrace.kafka.consumer.lag";

/// Attempts of the final commit when a consumer stops.
const FINAL_COMMIT_ATTEMPTS: u32 = 10;

/// How long one attempt of the final commit waits for the cluster's answer.
const FINAL_COMMIT_WAIT: Duration = Duration::from_millis(500);

/// The consumer's client context: keeps the high watermark of every partition
/// from librdkafka's statistics, so lag costs no request per record, and counts
/// the commits the cluster reported failed.
#[derive(Debug, Default)]
pub struct LagContext {
    high: Mutex<HashMap<String, HashMap<i32, i64>>>,
    failed_commits: AtomicU64,
    /// The final commit while it waits for the cluster's answer.
    final_commit: Mutex<Option<FinalCommit>>,
}

/// The offsets of a consumer's final commit, and whether the cluster stored them.
#[derive(Debug)]
struct FinalCommit {
    offsets: TopicPartitionList,
    stored: Option<bool>,
}

impl FinalCommit {
    /// Whether a commit of `committed` was one of these offsets exactly.
    fn answered_by(&self, committed: &TopicPartitionList) -> bool {
        self.offsets.elements().iter().all(|ours| {
            committed
                .find_partition(ours.topic(), ours.partition())
                .is_some_and(|e| e.offset() == ours.offset())
        })
    }
}

impl LagContext {
    fn lag(&self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let high = self.high.lock().ok()?;
        let hi = *high.get(topic)?.get(&partition)?;
        Some((hi - offset - 1).max(0))
    }
}

impl ClientContext for LagContext {
    fn stats(&self, statistics: Statistics) {
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

impl ConsumerContext for LagContext {
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = &result {
            self.failed_commits.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "mqtrace", error = %e, "commit failed; a later commit covers it, or the records are processed again");
        }
        if let Ok(mut pending) = self.final_commit.lock() {
            if let Some(f) = pending.as_mut().filter(|f| f.answered_by(offsets)) {
                f.stored = Some(result.is_ok());
            }
        }
    }
}

/// A consumed record as the handler sees it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Record(Arc<OwnedMessage>);

// === impl Record ===

impl Record {
    /// The topic.
    pub fn topic(&self) -> &str {
        self.0.topic()
    }

    /// The partition.
    pub fn partition(&self) -> i32 {
        self.0.partition()
    }

    /// The offset.
    pub fn offset(&self) -> i64 {
        self.0.offset()
    }

    /// The key, if any.
    pub fn key(&self) -> Option<&[u8]> {
        self.0.key()
    }

    /// The payload; `None` for a tombstone.
    pub fn payload(&self) -> Option<&[u8]> {
        self.0.payload()
    }

    /// The headers, if any.
    pub fn headers(&self) -> Option<&OwnedHeaders> {
        self.0.headers()
    }

    /// A header's value when it is UTF-8 (see [`HeadersExtractor`]).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.0
            .headers()
            .and_then(|h| HeadersExtractor(h).value(name))
    }

    /// The record's timestamp, in milliseconds since the epoch.
    pub fn timestamp_millis(&self) -> Option<i64> {
        self.0.timestamp().to_millis()
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

/// A record together with the consumer that received it, for the core.
struct Incoming<'a> {
    record: &'a Record,
    info: &'a ClientInfo,
    lag: Option<i64>,
}

static NO_HEADERS: std::sync::LazyLock<OwnedHeaders> = std::sync::LazyLock::new(OwnedHeaders::new);

impl Inbound for Incoming<'_> {
    fn description(&self) -> MessageDescription {
        let r = &self.record;
        let mut d = self.info.describe(OperationType::Process, r.topic());
        d.partition = Some(r.partition().to_string());
        d.offset = Some(r.offset());
        d.key = key_attribute(r.key());
        d.tombstone = r.payload().is_none();
        d.body_size = Some(r.payload().map_or(0, |p| p.len() as u64));
        d.consumer_group.clone_from(&self.info.group);
        if let Some(lag) = self.lag {
            d.extra.push(KeyValue::new(CONSUMER_LAG, lag));
        }
        d
    }

    fn headers(&self) -> impl Extractor + '_ {
        HeadersExtractor(self.record.headers().unwrap_or(&NO_HEADERS))
    }

    fn body(&self) -> &[u8] {
        self.record.payload().unwrap_or_default()
    }

    fn broker_timestamp(&self) -> Option<SystemTime> {
        let ms = u64::try_from(self.record.timestamp_millis()?).ok()?;
        UNIX_EPOCH.checked_add(Duration::from_millis(ms))
    }
}

/// What a consumer did, counted over its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConsumerStats {
    /// Handled successfully and committed.
    pub settled: u64,
    /// Forwarded to the retry topic, then committed.
    pub retried: u64,
    /// Forwarded to the dead-letter topic, then committed.
    pub dead_lettered: u64,
    /// Permanent failures committed without a copy (no dead-letter topic set).
    pub dropped: u64,
    /// Records whose forward failed: not committed, the consumer went back to
    /// them (they are processed again).
    pub rewound: u64,
    /// Commits that failed, refused by the client at once or reported failed by
    /// the cluster, including failed attempts of the final commit. A later commit
    /// covers the records; without one they are processed again, never skipped.
    pub commit_failures: u64,
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
    consumer: StreamConsumer<LagContext>,
    forwarder: TracedProducer,
    instrumenter: Instrumenter,
    info: ClientInfo,
    retry_topic: Option<String>,
    dead_letter_topic: Option<String>,
    poll_spans: bool,
    commit_spans: bool,
    forward_timeout: Duration,
}

impl std::fmt::Debug for TracedConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TracedConsumer")
            .field("info", &self.info)
            .field("retry_topic", &self.retry_topic)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .finish_non_exhaustive()
    }
}

// === impl TracedConsumer ===

impl TracedConsumer {
    /// Creates the consumer from `config` (which needs `group.id`) and subscribes
    /// to `topics`. Auto-commit is turned off: the consumer commits each record
    /// after settling it. `forwarder` publishes retries and dead letters.
    pub fn from_config(
        config: &ClientConfig,
        topics: &[&str],
        forwarder: TracedProducer,
        instrumenter: Instrumenter,
    ) -> KafkaResult<Self> {
        let mut config = config.clone();
        config.set("enable.auto.commit", "false");
        if config.get("statistics.interval.ms").is_none() {
            config.set("statistics.interval.ms", "1000");
        }
        let consumer: StreamConsumer<LagContext> =
            config.create_with_context(LagContext::default())?;
        consumer.subscribe(topics)?;
        Ok(Self {
            consumer,
            forwarder,
            instrumenter,
            info: ClientInfo::from_config(&config),
            retry_topic: None,
            dead_letter_topic: None,
            poll_spans: false,
            commit_spans: false,
            forward_timeout: Duration::from_secs(30),
        })
    }

    /// Retries go to this topic (default: the record's own topic). Subscribe to
    /// it too, or run a consumer for it.
    pub fn retry_topic(mut self, topic: impl Into<String>) -> Self {
        self.retry_topic = Some(topic.into());
        self
    }

    /// Permanent failures and spent budgets go to this topic.
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    /// Emit a `poll` span (CLIENT) per received record, linking it (default: off).
    pub fn poll_spans(mut self, on: bool) -> Self {
        self.poll_spans = on;
        self
    }

    /// Emit a `commit` span (CLIENT) per commit, child of the process span
    /// (default: off).
    pub fn commit_spans(mut self, on: bool) -> Self {
        self.commit_spans = on;
        self
    }

    /// How long a forward may wait in the producer's queue (default 30 s).
    pub fn forward_timeout(mut self, timeout: Duration) -> Self {
        self.forward_timeout = timeout;
        self
    }

    /// The consumer.
    pub fn inner(&self) -> &StreamConsumer<LagContext> {
        &self.consumer
    }

    /// Consumes until `shutdown` completes. A record being handled when it does is
    /// finished and settled first; then the offsets are committed once more, waiting
    /// (for up to five seconds) for the cluster's answer.
    pub async fn run_until<H, Fut, S>(&self, handler: H, shutdown: S) -> ConsumerStats
    where
        H: Fn(Record) -> Fut,
        Fut: Future<Output = HandlerResult>,
        S: Future<Output = ()>,
    {
        let mut stats = ConsumerStats::default();
        let failed_before = self
            .consumer
            .context()
            .failed_commits
            .load(Ordering::Relaxed);
        // The position after the last settled record, per partition.
        let mut positions = HashMap::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let received = tokio::select! {
                biased;
                () = shutdown.as_mut() => break,
                received = self.consumer.recv() => received.map(|m| m.detach()),
            };
            match received {
                Ok(message) => {
                    let at = (
                        message.topic().to_owned(),
                        message.partition(),
                        message.offset(),
                    );
                    if self.handle(message, &handler, &mut stats).await {
                        positions.insert((at.0, at.1), at.2 + 1);
                    }
                }
                Err(e) => {
                    tracing::warn!(target: "mqtrace", error = %e, "Kafka consumer error");
                    // Errors repeat quickly while the cluster is away.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        self.final_commit(&positions).await;
        stats.commit_failures += self
            .consumer
            .context()
            .failed_commits
            .load(Ordering::Relaxed)
            .saturating_sub(failed_before);
        stats
    }

    /// Commits the position after the last settled record of each partition still
    /// assigned, and waits for the cluster's answer. Asynchronous commits may have
    /// failed while the cluster was away; this one is tried again for a few seconds
    /// (the group coordinator can take that long to come back) before giving up,
    /// leaving the records to be read again. It never blocks a thread: the answer
    /// arrives through the consumer's events, which are served meanwhile, and so are
    /// the rebalances a returning group may need before it accepts a commit.
    async fn final_commit(&self, positions: &HashMap<(String, i32), i64>) {
        if positions.is_empty() {
            return;
        }
        // Only partitions still assigned: one that moved to another member in a
        // rebalance has its progress committed there, and this position is older.
        let assigned = self.consumer.assignment().ok();
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), next) in positions {
            let ours = assigned
                .as_ref()
                .is_none_or(|a| a.find_partition(topic, *partition).is_some());
            if !ours {
                continue;
            }
            if let Err(e) = offsets.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
                tracing::warn!(target: "mqtrace", error = %e, topic, "cannot commit this partition's position");
            }
        }
        if offsets.count() == 0 {
            return;
        }
        let context = self.consumer.context();
        let set = |f: Option<FinalCommit>| {
            if let Ok(mut pending) = context.final_commit.lock() {
                *pending = f;
            }
        };
        let stored = || {
            context
                .final_commit
                .lock()
                .ok()
                .and_then(|f| f.as_ref().and_then(|f| f.stored))
        };
        let mut last_error = String::from("no answer from the cluster");
        for _ in 0..FINAL_COMMIT_ATTEMPTS {
            set(Some(FinalCommit {
                offsets: offsets.clone(),
                stored: None,
            }));
            if let Err(e) = self.consumer.commit(&offsets, CommitMode::Async) {
                last_error = e.to_string();
                tokio::time::sleep(FINAL_COMMIT_WAIT).await;
                continue;
            }
            let deadline = tokio::time::Instant::now() + FINAL_COMMIT_WAIT;
            let mut events = self.consumer.stream();
            let answer = loop {
                if let Some(answer) = stored() {
                    break Some(answer);
                }
                if tokio::time::Instant::now() >= deadline {
                    break None;
                }
                // Serves the consumer's events, a little at a time: the commit's
                // answer is one of them, and the stream yields only records. A record
                // received here is not handled: its offset is not committed, and the
                // group reads it again.
                let slice = deadline.min(tokio::time::Instant::now() + Duration::from_millis(20));
                let _ = tokio::time::timeout_at(slice, futures_util::StreamExt::next(&mut events))
                    .await;
            };
            match answer {
                Some(true) => {
                    set(None);
                    return;
                }
                Some(false) => {
                    last_error = String::from("the cluster refused it");
                    tokio::time::sleep(FINAL_COMMIT_WAIT).await;
                }
                None => last_error = String::from("no answer from the cluster"),
            }
        }
        set(None);
        tracing::warn!(target: "mqtrace", error = %last_error, "final commit failed; records after the last committed offset are processed again");
    }

    /// Processes and settles one record; true when its offset was committed (or
    /// the commit was sent).
    async fn handle<H, Fut>(
        &self,
        message: OwnedMessage,
        handler: &H,
        stats: &mut ConsumerStats,
    ) -> bool
    where
        H: Fn(Record) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        let record = Record(Arc::new(message));
        let lag = self
            .consumer
            .context()
            .lag(record.topic(), record.partition(), record.offset());
        let incoming = Incoming {
            record: &record,
            info: &self.info,
            lag,
        };
        let instrumenter = &self.instrumenter;
        if self.poll_spans {
            let d = self
                .info
                .describe(OperationType::Receive, record.topic())
                .operation_named("poll");
            instrumenter
                .start_receive(&d, std::slice::from_ref(&incoming))
                .end();
        }
        let processed = instrumenter
            .process(&incoming, handler(record.clone()))
            .await;
        let has_dead_letter = self.dead_letter_topic.is_some();
        let mut disposition = processed.disposition(instrumenter.retry_policy(), has_dead_letter);
        let target = match disposition {
            Disposition::Retry => Some((
                ForwardKind::Retry,
                self.retry_topic.as_deref().unwrap_or(record.topic()),
            )),
            Disposition::DeadLetter => self
                .dead_letter_topic
                .as_deref()
                .map(|t| (ForwardKind::DeadLetter, t)),
            Disposition::Settle | Disposition::Drop => None,
        };
        let forwarded = match target {
            Some((kind, topic)) => self.forward(&processed, &record, kind, topic).await,
            None => true,
        };
        if forwarded {
            self.commit(&record, &incoming, &processed, stats);
            match disposition {
                Disposition::Settle => stats.settled += 1,
                Disposition::Retry => stats.retried += 1,
                Disposition::DeadLetter => stats.dead_lettered += 1,
                Disposition::Drop => stats.dropped += 1,
            }
        } else {
            // Not committed: read it again rather than lose it.
            disposition = Disposition::Retry;
            stats.rewound += 1;
            let seek = self.consumer.seek(
                record.topic(),
                record.partition(),
                Offset::Offset(record.offset()),
                Duration::from_secs(5),
            );
            if let Err(e) = seek {
                tracing::warn!(target: "mqtrace", error = %e, "cannot seek back to a record whose forward failed; it is redelivered after a restart or rebalance");
            }
        }
        let _ = processed.finish(disposition);
        forwarded
    }

    fn commit(
        &self,
        record: &Record,
        incoming: &Incoming<'_>,
        processed: &Processed,
        stats: &mut ConsumerStats,
    ) {
        let span = self.commit_spans.then(|| {
            let d = incoming
                .description()
                .for_operation(OperationType::Settle, Some("commit"));
            self.instrumenter.start_settle(&d, processed.span())
        });
        let mut offsets = TopicPartitionList::new();
        let result = offsets
            .add_partition_offset(
                record.topic(),
                record.partition(),
                Offset::Offset(record.offset() + 1),
            )
            .and_then(|()| self.consumer.commit(&offsets, CommitMode::Async));
        if let Err(e) = &result {
            stats.commit_failures += 1;
            tracing::warn!(target: "mqtrace", error = %e, "commit failed; the record may be processed again");
            if let Some(span) = &span {
                span.record_failure(&error_type(e), e);
            }
        }
        if let Some(span) = span {
            span.end();
        }
    }

    /// Produces the record's key and original bytes to `topic` with the forward
    /// span's headers; true once delivered.
    async fn forward(
        &self,
        processed: &Processed,
        record: &Record,
        kind: ForwardKind,
        topic: &str,
    ) -> bool {
        let mut headers = OwnedHeaders::new();
        if let Some(original) = record.headers() {
            for h in original.iter() {
                if !self.instrumenter.is_managed_header(h.key) {
                    headers = headers.insert(Header {
                        key: h.key,
                        value: h.value,
                    });
                }
            }
        }
        let mut outgoing: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
        outgoing.key = record.key();
        outgoing.payload = record.payload();
        let d = self.forwarder.describe(&outgoing);
        let mut injector = OwnedHeadersInjector::new(headers);
        let span = self
            .instrumenter
            .start_forward(processed, kind, &d, &mut injector);
        outgoing.headers = Some(injector.into_headers());
        let result = self
            .forwarder
            .inner()
            .send(outgoing, self.forward_timeout)
            .await;
        record_delivery(&self.instrumenter, &span, &result);
        span.end();
        if let Err((e, _)) = &result {
            tracing::warn!(target: "mqtrace", error = %e, topic, "forward failed");
        }
        result.is_ok()
    }
}
