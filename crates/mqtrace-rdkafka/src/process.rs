//! Instrumenting a consumer loop of one's own: process spans and settlement for
//! rdkafka's own messages (`BorrowedMessage`, `OwnedMessage`).

use std::collections::HashMap;
use std::future::Future;
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
/// let consumer: StreamConsumer = config.clone().set("enable.auto.commit", "false").create()?;
/// consumer.subscribe(&["orders"])?;
/// let forwarder: FutureProducer = config.create()?;
/// let tracer = RecordTracer::new(Instrumenter::default(), forwarder)
///     .config(&config)
///     .dead_letter_topic("orders.dlq");
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
        }
    }

    /// Settle by storing each record's offset in the client
    /// (`rd_kafka_offsets_store`: no request to the cluster) instead of committing
    /// it (default: an asynchronous commit per record). Something must then commit
    /// the stored offsets (`Consumer::commit_consumer_state`), as
    /// [`TracedConsumer`](crate::TracedConsumer) does every 200 ms, before a
    /// rebalance and at stop. The consumer needs `enable.auto.offset.store=false`.
    pub fn store_offsets(mut self, on: bool) -> Self {
        self.store_offsets = on;
        self
    }

    /// What the spans say about the consumer, from its configuration:
    /// `group.id`, `client.id` and the first `bootstrap.servers` entry.
    pub fn config(mut self, config: &ClientConfig) -> Self {
        self.info = ClientInfo::from_config(config);
        self
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
    type Error = KafkaError;

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
        let result = match settlement {
            // Stored for the next commit: librdkafka stores the offset after
            // the record's (no partition list built for one record).
            Settlement::Ack | Settlement::Reject if self.tracer.store_offsets => self
                .consumer
                .store_offset(r.topic(), r.partition(), r.offset()),
            Settlement::Ack | Settlement::Reject => {
                let mut offsets = TopicPartitionList::new();
                offsets
                    .add_partition_offset(r.topic(), r.partition(), Offset::Offset(r.offset() + 1))
                    .and_then(|()| self.consumer.commit(&offsets, CommitMode::Async))
            }
            // Back to the record, so it is handled again rather than lost. A zero
            // timeout makes librdkafka seek asynchronously: nothing blocks.
            Settlement::Redeliver => self.consumer.seek(
                r.topic(),
                r.partition(),
                Offset::Offset(r.offset()),
                Duration::ZERO,
            ),
            Settlement::Leave => Ok(()),
        };
        std::future::ready(result)
    }

    fn error_type(error: &Self::Error) -> String {
        error_type(error)
    }
}
