//! Instrumenting a consumer loop of one's own: process spans and settlement for
//! rdkafka's own messages (`BorrowedMessage`, `OwnedMessage`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mqtrace::settle::{Forward, Routes, Settled, Settlement, Settler};
use mqtrace::{
    Attempt, ForwardKind, HandlerResult, Inbound, Instrumenter, MessageDescription, OperationType,
    Processed,
};
use opentelemetry::propagation::Extractor;
use opentelemetry::KeyValue;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::carrier::{HeadersExtractor, OwnedHeadersInjector};
use crate::describe::{error_type, key_attribute, partition_text, ClientInfo};
use crate::producer::{record_delivery, TracedProducer};

/// `mqtrace.kafka.consumer.lag`: records behind the partition's high watermark when
/// this one was processed. The conventions have no name for it.
pub const CONSUMER_LAG: &str = "mqtrace.kafka.consumer.lag";

/// The gauge of the same name (`{message}`): a partition's lag, per topic,
/// partition and consumer group, recorded with each record processed while
/// librdkafka's statistics tell it.
#[derive(Debug, Clone, Default)]
struct LagGauge {
    gauge: OnceLock<opentelemetry::metrics::Gauge<i64>>,
    /// Attribute sets per partition and topic, built once.
    sets: Arc<Mutex<LagSets>>,
}

/// Per partition: each topic's attribute set.
type LagSets = HashMap<i32, Vec<(Box<str>, Arc<[KeyValue]>)>>;

impl LagGauge {
    fn record(
        &self,
        instrumenter: &Instrumenter,
        info: &ClientInfo,
        topic: &str,
        partition: i32,
        lag: i64,
    ) {
        let gauge = self.gauge.get_or_init(|| {
            instrumenter
                .meter()
                .i64_gauge(CONSUMER_LAG)
                .with_unit("{message}")
                .with_description("Records behind the partition's high watermark.")
                .build()
        });
        let set = {
            let mut sets = self.sets.lock().unwrap_or_else(PoisonError::into_inner);
            let topics = sets.entry(partition).or_default();
            match topics.iter().find(|(t, _)| &**t == topic) {
                Some((_, set)) => Arc::clone(set),
                None => {
                    let mut d = info.describe(OperationType::Process, topic);
                    d.partition = Some(partition_text(partition));
                    d.consumer_group.clone_from(&info.group);
                    let mut all = Vec::new();
                    instrumenter.conventions().attributes(&d, false, &mut all);
                    let keep = [
                        mqtrace::conventions::attr::MESSAGING_SYSTEM,
                        mqtrace::conventions::attr::MESSAGING_SYSTEM_NAME,
                        mqtrace::conventions::attr::MESSAGING_DESTINATION_NAME,
                        mqtrace::conventions::attr::MESSAGING_DESTINATION_PARTITION_ID,
                        mqtrace::conventions::attr::LEGACY_KAFKA_PARTITION,
                        mqtrace::conventions::attr::MESSAGING_CONSUMER_GROUP_NAME,
                        mqtrace::conventions::attr::LEGACY_KAFKA_CONSUMER_GROUP,
                    ];
                    let set: Arc<[KeyValue]> = all
                        .into_iter()
                        .filter(|kv| keep.contains(&kv.key.as_str()))
                        .collect();
                    topics.push((topic.into(), Arc::clone(&set)));
                    set
                }
            }
        };
        gauge.record(lag, &set);
    }
}

/// Traces records for a consumer loop of your own: runs the handler inside the
/// record's `process` span and settles it the way [`crate::TracedConsumer`] does
/// (it is built on this): commit after success; a retry or dead letter forwarded
/// through `forwarder` and then committed; a failed forward not committed but
/// sought back to, so the record is handled again.
///
/// ```no_run
/// # async fn run(config: rdkafka::ClientConfig) -> Result<(), rdkafka::error::KafkaError> {
/// use mqtrace::{HandlerError, Instrumenter};
/// use mqtrace_rdkafka::RecordTracer;
/// use rdkafka::consumer::{Consumer as _, StreamConsumer};
/// use rdkafka::message::Message as _;
/// use rdkafka::producer::FutureProducer;
///
/// let forwarder: FutureProducer = config.create()?;
/// let mut config = config.clone();
/// config.set("enable.auto.commit", "false");
/// let consumer: StreamConsumer = config.create()?;
/// consumer.subscribe(&["orders"])?;
/// let tracer = RecordTracer::new(Instrumenter::default(), forwarder)
///     .config(&config)
///     .dead_letter_topic("orders.dlq");
/// tracer.check(&consumer).expect("a consumer mqtrace can settle for");
/// loop {
///     let record = consumer.recv().await?;
///     let body = record.payload().unwrap_or_default();
///     let processed = tracer
///         .process(&record, |attempt| async move {
///             let order: serde_json::Value =
///                 serde_json::from_slice(body).map_err(HandlerError::permanent)?;
///             tracing::info!(%order, attempt = attempt.number(), "billing");
///             Ok(())
///         })
///         .await;
///     tracer.settle(processed, &record, &consumer).await;
/// }
/// # }
/// ```
///
/// # The consumer's settings
///
/// librdkafka's defaults (`enable.auto.commit=true`, `enable.auto.offset.store=true`)
/// commit the offset of every record it hands out on a timer of its own, past
/// records still in their handler or sought back for a retry. mqtrace refuses to
/// settle for such a consumer: every settle fails with [`SettleRefused`] (on the
/// span, in [`Settled::settle_failed`], in the log) and nothing is stored or
/// committed. The default mode needs `enable.auto.commit=false` (or
/// `enable.auto.offset.store=false`); [`RecordTracer::store_offsets`] needs
/// `enable.auto.offset.store=false`. The tracer reads the settings from the
/// configuration given to [`RecordTracer::config`] (give it the consumer's), and
/// in store mode asks the consumer itself once; [`RecordTracer::check`] tells at
/// start-up.
///
/// A record sought back for another try ([`Settlement::Redeliver`] after a failed
/// forward) whose seek fails holds its partition: the partition is paused, and no
/// later record of it is stored or committed ([`SettleRefused::Held`]) until the
/// record is handled again.
#[derive(Debug, Clone)]
pub struct RecordTracer {
    instrumenter: Instrumenter,
    forwarder: TracedProducer,
    info: ClientInfo,
    retry_topic: Option<String>,
    dead_letter_topic: Option<String>,
    receive_spans: bool,
    forward_timeout: Duration,
    lag: LagGauge,
    store_offsets: bool,
    /// The consumer's auto-commit settings, from [`RecordTracer::config`].
    auto: Option<AutoSettings>,
    /// What the tracer learnt from the consumer; shared by its clones.
    guard: Arc<Guard>,
}

/// Why mqtrace refused to settle a record: settling it would let the group's
/// committed offset pass a record not yet handled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SettleRefused {
    /// Offsets are stored ([`RecordTracer::store_offsets`]) on a consumer with
    /// `enable.auto.offset.store=true`.
    #[error(
        "mqtrace refuses to store offsets on a consumer with enable.auto.offset.store=true \
         (librdkafka's default): librdkafka has already stored the offset of every record \
         it handed out, so a commit would pass records still in their handler or sought \
         back for a retry; set enable.auto.offset.store=false"
    )]
    AutoOffsetStore,
    /// A consumer with `enable.auto.commit=true` and
    /// `enable.auto.offset.store=true` (librdkafka's defaults).
    #[error(
        "mqtrace refuses to settle for a consumer with enable.auto.commit=true and \
         enable.auto.offset.store=true (librdkafka's defaults): librdkafka commits the \
         offset of every record it handed out on its own timer, past records still in \
         their handler or sought back for a retry; set enable.auto.commit=false"
    )]
    AutoCommit,
    /// The partition is held at `offset`: the seek back to that record failed,
    /// and a later record's offset would pass it.
    #[error(
        "partition {partition} of {topic} is held at offset {offset}: the seek back to \
         that record failed, so no later record's offset is stored or committed until \
         it is handled again"
    )]
    Held {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The record that could not be sought back to.
        offset: i64,
    },
}

impl SettleRefused {
    /// `error.type` on the settle span and the settle metric.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::AutoOffsetStore => "auto_offset_store",
            Self::AutoCommit => "auto_commit",
            Self::Held { .. } => "partition_held",
        }
    }
}

/// The consumer's `enable.auto.commit` and `enable.auto.offset.store`, with
/// librdkafka's defaults (both on) where unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AutoSettings {
    commit: bool,
    store: bool,
}

impl AutoSettings {
    fn from_config(config: &ClientConfig) -> Self {
        // librdkafka's reading of a boolean property.
        let on = |key: &str| {
            config.get(key).is_none_or(|v| {
                !(v.eq_ignore_ascii_case("false") || v.eq_ignore_ascii_case("f") || v == "0")
            })
        };
        Self {
            commit: on("enable.auto.commit"),
            store: on("enable.auto.offset.store"),
        }
    }

    /// What these settings make unsafe, in store mode or not.
    fn refusal(self, store_offsets: bool) -> Option<SettleRefused> {
        match self {
            Self { store: true, .. } if store_offsets => Some(SettleRefused::AutoOffsetStore),
            Self {
                store: true,
                commit: true,
            } => Some(SettleRefused::AutoCommit),
            _ => None,
        }
    }
}

/// The store probe's states (0: not asked yet).
const STORE_OK: u8 = 1;
const AUTO_STORE: u8 = 2;

/// What a tracer learnt from its consumer: whether it may store offsets, and the
/// partitions held after a failed seek.
#[derive(Debug, Default)]
struct Guard {
    /// `rd_kafka_offsets_store`'s answer to an empty list: it refuses when
    /// `enable.auto.offset.store=true`.
    store_probe: AtomicU8,
    /// Whether `held` has an entry: the common case reads this alone.
    any_held: AtomicBool,
    /// Partitions whose seek back failed, at the record sought back to.
    held: Mutex<HashMap<(String, i32), i64>>,
}

impl Guard {
    /// In store mode: whether the consumer stores offsets only when told. Asks
    /// the consumer once (an empty store, which librdkafka refuses at once when
    /// it stores offsets itself); librdkafka's legacy one-partition store, used
    /// for speed, does not check.
    fn store_allowed<C: Consumer<X>, X: ConsumerContext>(&self, consumer: &C) -> bool {
        match self.store_probe.load(Ordering::Relaxed) {
            STORE_OK => true,
            AUTO_STORE => false,
            _ => {
                let refused = matches!(
                    consumer.store_offsets(&TopicPartitionList::new()),
                    Err(KafkaError::StoreOffset(RDKafkaErrorCode::InvalidArgument))
                );
                if refused {
                    tracing::error!(target: "mqtrace", error = %SettleRefused::AutoOffsetStore, "the consumer cannot be settled for");
                }
                self.store_probe.store(
                    if refused { AUTO_STORE } else { STORE_OK },
                    Ordering::Relaxed,
                );
                !refused
            }
        }
    }

    /// Holds the partition at `offset` (the lowest, when held already) and pauses
    /// it, so nothing later of it is handed out (pausing drops the records already
    /// fetched).
    fn hold<C: Consumer<X>, X: ConsumerContext>(
        &self,
        consumer: &C,
        topic: &str,
        partition: i32,
        offset: i64,
    ) {
        {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            let at = held.entry((topic.to_owned(), partition)).or_insert(offset);
            *at = (*at).min(offset);
            self.any_held.store(true, Ordering::Release);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        match consumer.pause(&tpl) {
            Ok(()) => {
                tracing::error!(target: "mqtrace", topic, partition, offset, "cannot seek back to a record for another try; the partition is paused and held there until the record is handled again (a rebalance or restart reads it from the committed offset)");
            }
            Err(e) => {
                tracing::error!(target: "mqtrace", error = %e, topic, partition, offset, "cannot seek back to a record for another try, nor pause its partition; no later record of the partition is stored or committed until the record is handled again");
            }
        }
    }

    /// Whether settling the record at `offset` would pass a held record: if so,
    /// tries the seek back again (resuming the partition when it is accepted).
    /// Only the held record itself, handed out again, ends the hold; a record
    /// before it (one still in flight in a concurrent loop) settles but leaves
    /// the hold in place, since the partition was not read again from there.
    fn passes_held<C: Consumer<X>, X: ConsumerContext>(
        &self,
        consumer: &C,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Option<SettleRefused> {
        if !self.any_held.load(Ordering::Acquire) {
            return None;
        }
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (topic.to_owned(), partition);
        let at = *held.get(&key)?;
        if offset < at {
            return None;
        }
        if offset == at {
            held.remove(&key);
            self.any_held.store(!held.is_empty(), Ordering::Release);
            return None;
        }
        if consumer
            .seek(topic, partition, Offset::Offset(at), Duration::ZERO)
            .is_ok()
        {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(topic, partition);
            let _ = consumer.resume(&tpl);
        }
        Some(SettleRefused::Held {
            topic: topic.to_owned(),
            partition,
            offset: at,
        })
    }

    /// Ends the hold of a partition revoked from the consumer, and resumes it:
    /// its next owner (or this consumer, when it comes back) reads it from the
    /// committed offset, which never passed the held record. librdkafka keeps an
    /// application's pause across a revocation, so it is undone here.
    fn release<C: Consumer<X>, X: ConsumerContext>(
        &self,
        consumer: &C,
        topic: &str,
        partition: i32,
    ) {
        if !self.any_held.load(Ordering::Acquire) {
            return;
        }
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if held.remove(&(topic.to_owned(), partition)).is_some() {
            self.any_held.store(!held.is_empty(), Ordering::Release);
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(topic, partition);
            if let Err(e) = consumer.resume(&tpl) {
                tracing::warn!(target: "mqtrace", error = %e, topic, partition, "cannot resume a revoked partition that was held");
            }
        }
    }

    /// Whether the record at `offset` is past a held record of its partition.
    fn holds(&self, topic: &str, partition: i32, offset: i64) -> bool {
        self.any_held.load(Ordering::Acquire)
            && self
                .held
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&(topic.to_owned(), partition))
                .is_some_and(|&at| offset > at)
    }
}

/// A settlement's failure: the broker's, or mqtrace's refusal.
#[derive(Debug, thiserror::Error)]
enum SettleError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Refused(#[from] SettleRefused),
}

// === impl RecordTracer ===

impl RecordTracer {
    /// Traces records; `forwarder` publishes retries and dead letters.
    pub fn new(instrumenter: Instrumenter, forwarder: FutureProducer) -> Self {
        let forwarder = TracedProducer::new(forwarder, instrumenter.clone());
        Self::with_forwarder(instrumenter, forwarder, ClientInfo::default())
    }

    pub(crate) fn with_forwarder(
        instrumenter: Instrumenter,
        forwarder: TracedProducer,
        info: ClientInfo,
    ) -> Self {
        Self {
            instrumenter,
            forwarder,
            info,
            retry_topic: None,
            dead_letter_topic: None,
            receive_spans: false,
            forward_timeout: Duration::from_secs(30),
            lag: LagGauge::default(),
            store_offsets: false,
            auto: None,
            guard: Arc::default(),
        }
    }

    /// Settle by storing each record's offset in the client (librdkafka's
    /// `rd_kafka_offset_store`: no request to the cluster) instead of committing
    /// it (default: an asynchronous commit per record). Something must then commit
    /// the stored offsets: librdkafka itself with `enable.auto.commit=true`, as in
    /// [`TracedConsumer`](crate::TracedConsumer) (on its timer, on revocation, at
    /// close; the answers reach a [`StatsContext`](crate::StatsContext)), or
    /// `Consumer::commit_consumer_state`.
    ///
    /// The consumer needs `enable.auto.offset.store=false`: otherwise librdkafka
    /// has stored every record's offset as it handed it out, and a commit passes
    /// records still in their handler. mqtrace refuses to store for such a
    /// consumer ([`SettleRefused::AutoOffsetStore`] on every settle): it asks the
    /// consumer once, at the first settle or at [`RecordTracer::check`].
    pub fn store_offsets(mut self, on: bool) -> Self {
        self.store_offsets = on;
        self
    }

    /// What the spans say about the consumer, from its configuration:
    /// `group.id`, `client.id` and the first `bootstrap.servers` entry; and its
    /// `enable.auto.commit` and `enable.auto.offset.store`, which settling checks
    /// (see [the consumer's settings](RecordTracer#the-consumers-settings)).
    pub fn config(mut self, config: &ClientConfig) -> Self {
        self.info = ClientInfo::from_config(config);
        self.auto = Some(AutoSettings::from_config(config));
        self
    }

    /// Whether this tracer can settle for `consumer`: an error when the
    /// configuration given to [`RecordTracer::config`] or, in store mode, the
    /// consumer itself stores or commits offsets on its own (see [the consumer's
    /// settings](RecordTracer#the-consumers-settings)). Settling refuses the same
    /// way; this tells at start-up.
    pub fn check<C: Consumer<X>, X: ConsumerContext>(
        &self,
        consumer: &C,
    ) -> Result<(), SettleRefused> {
        if let Some(refused) = self.config_refusal() {
            return Err(refused);
        }
        if self.store_offsets && !self.guard.store_allowed(consumer) {
            return Err(SettleRefused::AutoOffsetStore);
        }
        Ok(())
    }

    /// What the consumer's configuration makes unsafe, when it was given.
    fn config_refusal(&self) -> Option<SettleRefused> {
        self.auto.and_then(|a| a.refusal(self.store_offsets))
    }

    /// A partition was revoked: its hold, if any, ends and it is resumed.
    pub(crate) fn release<C: Consumer<X>, X: ConsumerContext>(
        &self,
        consumer: &C,
        topic: &str,
        partition: i32,
    ) {
        self.guard.release(consumer, topic, partition);
    }

    /// Whether the record at `offset` is past a record of its partition whose
    /// seek back failed: it is not to be committed past.
    pub(crate) fn holds(&self, topic: &str, partition: i32, offset: i64) -> bool {
        self.guard.holds(topic, partition, offset)
    }

    /// Retries go to this topic (default: the record's own topic).
    pub fn retry_topic(mut self, topic: impl Into<String>) -> Self {
        self.retry_topic = Some(topic.into());
        self
    }

    /// Permanent failures and spent budgets go to this topic (default: none, so
    /// they are committed and recorded as `dropped`).
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    /// A `poll` span (CLIENT) per received record, linking it (default: off).
    pub fn receive_spans(mut self, on: bool) -> Self {
        self.receive_spans = on;
        self
    }

    /// A `commit` span (CLIENT) per commit, child of the process span (default:
    /// the instrumenter's setting).
    pub fn settle_spans(mut self, on: bool) -> Self {
        self.instrumenter = self.instrumenter.with_settle_spans(on);
        self
    }

    /// How long a forward may wait in the producer's queue (default 30 s).
    pub fn forward_timeout(mut self, timeout: Duration) -> Self {
        self.forward_timeout = timeout;
        self
    }

    /// The instrumenter.
    pub fn instrumenter(&self) -> &Instrumenter {
        &self.instrumenter
    }

    /// Runs `handler` inside the record's `process` span (CONSUMER; partition,
    /// offset, key, consumer group, queue time from the record's timestamp, the
    /// attempt, the error status). The handler is told the [`Attempt`]. The span
    /// stays open in the [`Processed`] until [`RecordTracer::settle`].
    pub async fn process<M, F, Fut>(&self, record: &M, handler: F) -> Processed
    where
        M: Message,
        F: FnOnce(Attempt) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        self.process_lagging(record, None, handler).await
    }

    /// [`RecordTracer::process`] with the record's consumer lag (records behind
    /// its partition's high watermark), recorded as [`CONSUMER_LAG`]: from
    /// [`crate::StatsContext::lag`] when the consumer was made with that context.
    pub async fn process_lagging<M, F, Fut>(
        &self,
        record: &M,
        lag: Option<i64>,
        handler: F,
    ) -> Processed
    where
        M: Message,
        F: FnOnce(Attempt) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        self.process_polled(record, None, lag, handler).await
    }

    /// [`RecordTracer::process_lagging`] for a record whose poll began at
    /// `polled_at`: the `poll` span (with [`RecordTracer::receive_spans`]) then
    /// covers the poll, not only the moment the record is in hand.
    pub async fn process_polled<M, F, Fut>(
        &self,
        record: &M,
        polled_at: Option<SystemTime>,
        lag: Option<i64>,
        handler: F,
    ) -> Processed
    where
        M: Message,
        F: FnOnce(Attempt) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        if let Some(lag) = lag.filter(|_| self.instrumenter.metrics_on()) {
            self.lag.record(
                &self.instrumenter,
                &self.info,
                record.topic(),
                record.partition(),
                lag,
            );
        }
        let incoming = Incoming {
            record,
            info: &self.info,
            lag,
            polled: self.receive_spans,
        };
        if self.receive_spans {
            // The record's own attributes (partition, offset, key, group, lag), as
            // a `poll`.
            let d = incoming
                .description()
                .for_operation(OperationType::Receive, Some("poll"));
            let one = std::slice::from_ref(&incoming);
            let span = match polled_at {
                Some(at) => self.instrumenter.start_receive_at(&d, one, at),
                None => self.instrumenter.start_receive(&d, one),
            };
            span.end();
        }
        self.instrumenter.process_with(&incoming, handler).await
    }

    /// Settles a processed record through `consumer` (its offset committed
    /// asynchronously, or a seek back after a failed forward, which never blocks)
    /// and ends the process span with the disposition.
    pub async fn settle<M, C, X>(&self, processed: Processed, record: &M, consumer: &C) -> Settled
    where
        M: Message + Sync,
        C: Consumer<X> + Sync,
        X: ConsumerContext + 'static,
    {
        let settler = KafkaSettler {
            tracer: self,
            record,
            consumer,
            _context: std::marker::PhantomData,
        };
        self.instrumenter.settle(processed, settler).await
    }
}

/// A record with what the consumer knows, for the core.
struct Incoming<'a, M> {
    record: &'a M,
    info: &'a ClientInfo,
    lag: Option<i64>,
    /// Received under a `poll` span, which counted it as consumed.
    polled: bool,
}

impl<M: Message> Inbound for Incoming<'_, M> {
    fn description(&self) -> MessageDescription {
        let r = self.record;
        let mut d = self.info.describe(OperationType::Process, r.topic());
        d.partition = Some(partition_text(r.partition()));
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
        MaybeHeaders(self.record.headers())
    }

    fn body(&self) -> &[u8] {
        self.record.payload().unwrap_or_default()
    }

    fn broker_timestamp(&self) -> Option<SystemTime> {
        let ms = u64::try_from(self.record.timestamp().to_millis()?).ok()?;
        UNIX_EPOCH.checked_add(Duration::from_millis(ms))
    }

    fn counted_at_receive(&self) -> bool {
        self.polled
    }
}

/// A record's headers, which may be absent.
struct MaybeHeaders<'a, H: ?Sized>(Option<&'a H>);

impl<H: Headers + ?Sized> Extractor for MaybeHeaders<'_, H> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.and_then(|h| HeadersExtractor(h).value(key))
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .map(|h| HeadersExtractor(h).names())
            .unwrap_or_default()
    }
}

/// Kafka's operations on one record, for the core's lifecycle.
struct KafkaSettler<'a, M, C, X> {
    tracer: &'a RecordTracer,
    record: &'a M,
    consumer: &'a C,
    _context: std::marker::PhantomData<fn() -> X>,
}

impl<M, C, X> Settler for KafkaSettler<'_, M, C, X>
where
    M: Message + Sync,
    C: Consumer<X> + Sync,
    X: ConsumerContext + 'static,
{
    type Error = SettleError;

    fn routes(&self) -> Routes<'_> {
        let retry = self
            .tracer
            .retry_topic
            .as_deref()
            .unwrap_or(self.record.topic());
        Routes::forward_retries(retry).dead_letter(self.tracer.dead_letter_topic.as_deref())
    }

    fn describe_forward(&self, _: ForwardKind, target: &str) -> MessageDescription {
        let mut outgoing: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(target);
        outgoing.key = self.record.key();
        outgoing.payload = self.record.payload();
        self.tracer.forwarder.describe(&outgoing)
    }

    fn forward(&self, forward: Forward<'_>) -> impl Future<Output = bool> + Send {
        let mut headers = OwnedHeaders::new();
        if let Some(original) = self.record.headers() {
            for h in original.iter() {
                if !forward.replaces(h.key) {
                    headers = headers.insert(Header {
                        key: h.key,
                        value: h.value,
                    });
                }
            }
        }
        let mut injector = OwnedHeadersInjector::new(headers);
        for (k, v) in forward.headers {
            opentelemetry::propagation::Injector::set(&mut injector, &k, v);
        }
        let headers = injector.into_headers();
        let (key, payload) = (self.record.key(), self.record.payload());
        let (target, span) = (forward.target, forward.span);
        let tracer = self.tracer;
        async move {
            let mut outgoing: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(target);
            outgoing.key = key;
            outgoing.payload = payload;
            outgoing.headers = Some(headers);
            let result = tracer
                .forwarder
                .inner()
                .send(outgoing, tracer.forward_timeout)
                .await;
            record_delivery(&tracer.instrumenter, span, &result);
            result.is_ok()
        }
    }

    fn settle_name(&self, settlement: Settlement) -> Option<&'static str> {
        match settlement {
            Settlement::Ack | Settlement::Reject => Some("commit"),
            Settlement::Redeliver | Settlement::Leave => None,
        }
    }

    fn settle(
        self,
        settlement: Settlement,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let r = self.record;
        let (tracer, consumer) = (self.tracer, self.consumer);
        let result = match settlement {
            Settlement::Ack | Settlement::Reject => {
                if let Err(refused) = tracer.check(consumer) {
                    Err(refused.into())
                } else if let Some(refused) =
                    tracer
                        .guard
                        .passes_held(consumer, r.topic(), r.partition(), r.offset())
                {
                    Err(refused.into())
                } else if tracer.store_offsets {
                    // Stored for the next commit: librdkafka stores the offset
                    // after the record's (no partition list built for one record;
                    // the probe above stands for the check this call skips).
                    consumer
                        .store_offset(r.topic(), r.partition(), r.offset())
                        .map_err(SettleError::from)
                } else {
                    let mut offsets = TopicPartitionList::new();
                    offsets
                        .add_partition_offset(
                            r.topic(),
                            r.partition(),
                            Offset::Offset(r.offset() + 1),
                        )
                        .and_then(|()| consumer.commit(&offsets, CommitMode::Async))
                        .map_err(SettleError::from)
                }
            }
            // Back to the record, so it is handled again rather than lost. A zero
            // timeout makes librdkafka seek asynchronously: nothing blocks. A seek
            // that fails holds the partition there: never past the record.
            Settlement::Redeliver => consumer
                .seek(
                    r.topic(),
                    r.partition(),
                    Offset::Offset(r.offset()),
                    Duration::ZERO,
                )
                .map_err(|e| {
                    tracer
                        .guard
                        .hold(consumer, r.topic(), r.partition(), r.offset());
                    SettleError::from(e)
                }),
            Settlement::Leave => Ok(()),
        };
        std::future::ready(result)
    }

    fn error_type(error: &Self::Error) -> String {
        match error {
            SettleError::Kafka(e) => error_type(e),
            SettleError::Refused(refused) => refused.error_type().to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{AutoSettings, Guard, SettleRefused};
    use rdkafka::ClientConfig;

    /// A record before the held one, still in flight in a concurrent loop when
    /// the hold began, settles without ending the hold: the partition was not
    /// read again, so a later record must still not pass the held one (before,
    /// it ended the hold and the next record committed past it). Only the held
    /// record itself, handed out again, or a revocation ends it.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn only_the_held_record_ends_the_hold() {
        let consumer: rdkafka::consumer::BaseConsumer = ClientConfig::new()
            .set("group.id", "hold-test")
            .set("bootstrap.servers", "127.0.0.1:1")
            .create()
            .unwrap();
        let guard = Guard::default();
        guard.held.lock().unwrap().insert(("t".to_owned(), 0), 10);
        guard
            .any_held
            .store(true, std::sync::atomic::Ordering::Release);
        assert!(guard.passes_held(&consumer, "t", 0, 9).is_none());
        assert!(guard.holds("t", 0, 11), "9 did not end the hold");
        assert!(matches!(
            guard.passes_held(&consumer, "t", 0, 11),
            Some(SettleRefused::Held { offset: 10, .. })
        ));
        assert!(guard.passes_held(&consumer, "t", 0, 10).is_none());
        assert!(!guard.holds("t", 0, 11));
        guard.held.lock().unwrap().insert(("t".to_owned(), 1), 5);
        guard
            .any_held
            .store(true, std::sync::atomic::Ordering::Release);
        guard.release(&consumer, "t", 1);
        assert!(!guard.holds("t", 1, 6), "a revoked partition is released");
    }

    fn settings(pairs: &[(&str, &str)]) -> AutoSettings {
        let mut config = ClientConfig::new();
        for (k, v) in pairs {
            config.set(*k, *v);
        }
        AutoSettings::from_config(&config)
    }

    #[test]
    fn librdkafka_s_defaults_are_refused_in_both_modes() {
        let defaults = settings(&[]);
        assert_eq!(defaults.refusal(false), Some(SettleRefused::AutoCommit));
        assert_eq!(defaults.refusal(true), Some(SettleRefused::AutoOffsetStore));
        assert!(SettleRefused::AutoOffsetStore
            .to_string()
            .contains("set enable.auto.offset.store=false"));
    }

    #[test]
    fn store_mode_needs_the_offset_store_off_and_commits_need_one_of_them_off() {
        let no_commit = settings(&[("enable.auto.commit", "false")]);
        assert_eq!(no_commit.refusal(false), None);
        assert_eq!(
            no_commit.refusal(true),
            Some(SettleRefused::AutoOffsetStore)
        );
        let no_store = settings(&[("enable.auto.offset.store", "FALSE")]);
        assert_eq!(no_store.refusal(false), None);
        assert_eq!(no_store.refusal(true), None);
        let both_off = settings(&[
            ("enable.auto.commit", "0"),
            ("enable.auto.offset.store", "f"),
        ]);
        assert_eq!(both_off.refusal(true), None);
        let on = settings(&[
            ("enable.auto.offset.store", "true"),
            ("enable.auto.commit", "false"),
        ]);
        assert_eq!(on.refusal(true), Some(SettleRefused::AutoOffsetStore));
    }
}
