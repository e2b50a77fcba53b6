//! Extension traits for code that keeps its own rdkafka clients.

use std::future::Future;

use mqtrace::{Instrumenter, Propagation};
use opentelemetry::Context;
use rdkafka::message::{BorrowedMessage, Message, OwnedMessage, ToBytes};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::carrier::{HeadersExtractor, OwnedHeadersInjector};
use crate::describe::ClientInfo;
use crate::producer::send_in_span;

mod sealed {
    pub trait Sealed {}
    impl Sealed for rdkafka::producer::FutureProducer {}
    impl<K: ?Sized, P: ?Sized> Sealed for rdkafka::producer::FutureRecord<'_, K, P>
    where
        K: rdkafka::message::ToBytes,
        P: rdkafka::message::ToBytes,
    {
    }
    impl Sealed for rdkafka::message::BorrowedMessage<'_> {}
    impl Sealed for rdkafka::message::OwnedMessage {}
}

/// Adds a trace context to a record about to be produced.
///
/// ```
/// use mqtrace::Propagation;
/// use mqtrace_rdkafka::FutureRecordExt as _;
/// use opentelemetry::Context;
/// use rdkafka::producer::FutureRecord;
///
/// let record = FutureRecord::<str, str>::to("orders")
///     .key("order-7")
///     .payload("{}")
///     .with_trace_context(&Propagation::default(), &Context::current());
/// // Hand `record` to `FutureProducer::send`.
/// # let _ = record;
/// ```
pub trait FutureRecordExt: sealed::Sealed + Sized {
    /// The record with `cx` injected into its headers (existing headers kept). A
    /// context without a valid span adds nothing.
    fn with_trace_context(self, propagation: &Propagation, cx: &Context) -> Self;
}

impl<K, P> FutureRecordExt for FutureRecord<'_, K, P>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    fn with_trace_context(mut self, propagation: &Propagation, cx: &Context) -> Self {
        let mut injector = OwnedHeadersInjector::new(self.headers.take().unwrap_or_default());
        propagation.inject(cx, &mut injector);
        self.headers = Some(injector.into_headers());
        self
    }
}

/// Reads the producer's trace context from a consumed record.
///
/// ```no_run
/// # async fn run(consumer: rdkafka::consumer::StreamConsumer) -> Result<(), rdkafka::error::KafkaError> {
/// use mqtrace::Propagation;
/// use mqtrace_rdkafka::MessageExt as _;
/// use opentelemetry::trace::FutureExt as _;
///
/// let propagation = Propagation::default();
/// loop {
///     let message = consumer.recv().await?;
///     let parent = message.trace_context(&propagation);
///     // Spans started inside belong to the producer's trace.
///     async { /* handle */ }.with_context(parent).await;
/// }
/// # }
/// ```
pub trait MessageExt: sealed::Sealed {
    /// The remote context in the record's headers, extracted from an empty context:
    /// a record without (valid) trace headers gives an empty context, never the
    /// caller's current one.
    fn trace_context(&self, propagation: &Propagation) -> Context;
}

impl MessageExt for BorrowedMessage<'_> {
    fn trace_context(&self, propagation: &Propagation) -> Context {
        match self.headers() {
            Some(h) => propagation.extract(&HeadersExtractor(h)),
            None => Context::new(),
        }
    }
}

impl MessageExt for OwnedMessage {
    fn trace_context(&self, propagation: &Propagation) -> Context {
        match self.headers() {
            Some(h) => propagation.extract(&HeadersExtractor(h)),
            None => Context::new(),
        }
    }
}

/// Sends through a plain rdkafka [`FutureProducer`] inside a `send` span
/// (PRODUCER), as [`crate::TracedProducer`] does: the span's context goes into the
/// record's headers, and the span ends on the delivery report with the partition
/// and offset, or the error.
///
/// ```no_run
/// # async fn run(producer: rdkafka::producer::FutureProducer) {
/// use mqtrace::Instrumenter;
/// use mqtrace_rdkafka::FutureProducerExt as _;
/// use rdkafka::producer::FutureRecord;
/// use std::time::Duration;
///
/// let instrumenter = Instrumenter::default();
/// let record = FutureRecord::<str, str>::to("orders").key("order-7").payload("{}");
/// let delivered = producer.send_traced(&instrumenter, record, Duration::from_secs(5)).await;
/// # let _ = delivered;
/// # }
/// ```
pub trait FutureProducerExt: sealed::Sealed {
    /// `send` inside a `send` span; rdkafka's result comes back unchanged.
    fn send_traced<K, P>(
        &self,
        instrumenter: &Instrumenter,
        record: FutureRecord<'_, K, P>,
        queue_timeout: impl Into<Timeout> + Send,
    ) -> impl Future<Output = OwnedDeliveryResult> + Send
    where
        K: ToBytes + ?Sized + Sync,
        P: ToBytes + ?Sized + Sync;
}

impl FutureProducerExt for FutureProducer {
    async fn send_traced<K, P>(
        &self,
        instrumenter: &Instrumenter,
        record: FutureRecord<'_, K, P>,
        queue_timeout: impl Into<Timeout> + Send,
    ) -> OwnedDeliveryResult
    where
        K: ToBytes + ?Sized + Sync,
        P: ToBytes + ?Sized + Sync,
    {
        // Its configuration is not known here: no client id or server address.
        send_in_span(
            self,
            instrumenter,
            &ClientInfo::default(),
            record,
            queue_timeout.into(),
        )
        .await
    }
}
