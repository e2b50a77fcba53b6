//! Traced producing.

use mqtrace::{Instrumenter, MessageDescription, MessagingSpan, OperationType};
use opentelemetry::KeyValue;
use rdkafka::error::KafkaResult;
use rdkafka::message::ToBytes;
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;

use crate::carrier::OwnedHeadersInjector;
use crate::describe::{error_type, key_attribute, partition_text, ClientInfo};

/// Produces with a `send` span (PRODUCER) whose context travels in the record's
/// headers. The span ends on the delivery report, with the partition and offset
/// the broker assigned; a failed delivery marks it with `error.type` from the
/// Kafka error code. The caller gets rdkafka's result unchanged.
#[derive(Clone)]
pub struct TracedProducer {
    producer: FutureProducer,
    instrumenter: Instrumenter,
    info: ClientInfo,
}

impl std::fmt::Debug for TracedProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TracedProducer")
            .field("instrumenter", &self.instrumenter)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl TracedProducer {
    /// Creates the producer from `config`, whose `client.id` and first
    /// `bootstrap.servers` entry are recorded on the spans.
    pub fn from_config(config: &ClientConfig, instrumenter: Instrumenter) -> KafkaResult<Self> {
        Ok(Self {
            producer: config.create()?,
            instrumenter,
            info: ClientInfo::from_config(config),
        })
    }

    /// Wraps an existing producer (its configuration is not known: no client id or
    /// server address on the spans).
    pub fn new(producer: FutureProducer, instrumenter: Instrumenter) -> Self {
        Self {
            producer,
            instrumenter,
            info: ClientInfo::default(),
        }
    }

    /// The producer.
    pub fn inner(&self) -> &FutureProducer {
        &self.producer
    }

    /// The producer, unwrapped.
    pub fn into_inner(self) -> FutureProducer {
        self.producer
    }

    /// Sends a record inside a `send` span that ends on its delivery report.
    /// The span's context is added to the record's headers.
    pub async fn send<K, P>(
        &self,
        record: FutureRecord<'_, K, P>,
        queue_timeout: impl Into<Timeout>,
    ) -> OwnedDeliveryResult
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        send_in_span(
            &self.producer,
            &self.instrumenter,
            &self.info,
            record,
            queue_timeout.into(),
        )
        .await
    }

    pub(crate) fn describe<K, P>(&self, record: &FutureRecord<'_, K, P>) -> MessageDescription
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        describe_send(&self.info, record)
    }
}

fn describe_send<K, P>(info: &ClientInfo, record: &FutureRecord<'_, K, P>) -> MessageDescription
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    let mut d = info.describe(OperationType::Send, record.topic);
    d.key = key_attribute(record.key.map(ToBytes::to_bytes));
    d.tombstone = record.payload.is_none();
    d.body_size = Some(record.payload.map_or(0, |p| p.to_bytes().len() as u64));
    d.partition = record.partition.map(partition_text);
    d
}

/// Sends inside a `send` span that ends on the delivery report: what
/// [`TracedProducer`] and [`crate::FutureProducerExt`] share.
pub(crate) async fn send_in_span<K, P>(
    producer: &FutureProducer,
    instrumenter: &Instrumenter,
    info: &ClientInfo,
    mut record: FutureRecord<'_, K, P>,
    queue_timeout: Timeout,
) -> OwnedDeliveryResult
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    let d = describe_send(info, &record);
    let payload = record.payload.map(ToBytes::to_bytes);
    let span = instrumenter.start_send(&d, payload);
    let mut injector = OwnedHeadersInjector::new(record.headers.take().unwrap_or_default());
    instrumenter.inject(&span, &mut injector);
    record.headers = Some(injector.into_headers());
    let result = producer.send(record, queue_timeout).await;
    record_delivery(instrumenter, &span, &result);
    span.end();
    result
}

/// Records the delivery report on a send span.
pub(crate) fn record_delivery(
    instrumenter: &Instrumenter,
    span: &MessagingSpan,
    result: &OwnedDeliveryResult,
) {
    match result {
        Ok(delivery) => {
            let mut attributes: Vec<KeyValue> = Vec::with_capacity(3);
            instrumenter.conventions().position_attributes(
                mqtrace::MessagingSystem::Kafka,
                Some(&partition_text(delivery.partition)),
                Some(delivery.offset),
                &mut attributes,
            );
            for a in attributes {
                span.set_attribute(a);
            }
        }
        Err((e, _)) => span.record_failure(&error_type(e), e),
    }
}
