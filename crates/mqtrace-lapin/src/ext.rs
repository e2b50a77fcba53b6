//! Extension traits for code that keeps its own lapin calls.

use std::future::Future;

use lapin::message::Delivery;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation};
use mqtrace::{Instrumenter, Propagation};
use opentelemetry::Context;

use crate::carrier::{FieldTableExtractor, FieldTableInjector};
use crate::publisher::publish_in_span;

mod sealed {
    pub trait Sealed {}
    impl Sealed for lapin::BasicProperties {}
    impl Sealed for lapin::message::Delivery {}
    impl Sealed for lapin::Channel {}
}

/// Publishes through a plain lapin [`Channel`] inside a `send` span (PRODUCER),
/// as [`crate::TracedPublisher`] does: the span's context goes into the headers,
/// the `timestamp` property is set unless given, and the span ends on the
/// publisher confirm (in confirm mode) with a nack or return marked as an error.
///
/// ```no_run
/// # async fn run(channel: lapin::Channel) -> Result<(), lapin::Error> {
/// use lapin::options::BasicPublishOptions;
/// use lapin::BasicProperties;
/// use mqtrace::Instrumenter;
/// use mqtrace_lapin::ChannelExt as _;
///
/// let instrumenter = Instrumenter::default();
/// channel
///     .publish_traced(
///         &instrumenter,
///         "shop".into(),
///         "order.created".into(),
///         BasicPublishOptions::default(),
///         br#"{"id":7}"#,
///         BasicProperties::default(),
///     )
///     .await?;
/// # Ok(()) }
/// ```
pub trait ChannelExt: sealed::Sealed {
    /// `basic_publish` inside a `send` span; lapin's answer comes back unchanged.
    fn publish_traced(
        &self,
        instrumenter: &Instrumenter,
        exchange: ShortString,
        routing_key: ShortString,
        options: BasicPublishOptions,
        payload: &[u8],
        properties: BasicProperties,
    ) -> impl Future<Output = lapin::Result<Confirmation>> + Send;
}

impl ChannelExt for Channel {
    fn publish_traced(
        &self,
        instrumenter: &Instrumenter,
        exchange: ShortString,
        routing_key: ShortString,
        options: BasicPublishOptions,
        payload: &[u8],
        properties: BasicProperties,
    ) -> impl Future<Output = lapin::Result<Confirmation>> + Send {
        publish_in_span(
            self,
            instrumenter,
            None,
            (exchange, routing_key),
            options,
            payload,
            properties,
        )
    }
}

/// Adds a trace context to the properties of a message about to be published.
///
/// ```
/// use lapin::BasicProperties;
/// use mqtrace::Propagation;
/// use mqtrace_lapin::BasicPropertiesExt as _;
/// use opentelemetry::Context;
///
/// // Inside a span, `Context::current()` carries it to the consumer.
/// let properties = BasicProperties::default()
///     .with_trace_context(&Propagation::default(), &Context::current());
/// // Pass `properties` to `Channel::basic_publish`.
/// # let _ = properties;
/// ```
pub trait BasicPropertiesExt: sealed::Sealed {
    /// The properties with `cx` injected into their headers (existing headers are
    /// kept). A context without a valid span adds nothing.
    fn with_trace_context(self, propagation: &Propagation, cx: &Context) -> BasicProperties;
}

impl BasicPropertiesExt for BasicProperties {
    fn with_trace_context(self, propagation: &Propagation, cx: &Context) -> BasicProperties {
        let mut headers = self.headers().clone().unwrap_or_default();
        propagation.inject(cx, &mut FieldTableInjector(&mut headers));
        self.with_headers(headers)
    }
}

/// Reads the producer's trace context from a delivery.
///
/// ```no_run
/// # async fn run(mut consumer: lapin::Consumer) -> Result<(), lapin::Error> {
/// use futures_util::StreamExt as _;
/// use mqtrace::Propagation;
/// use mqtrace_lapin::DeliveryExt as _;
/// use opentelemetry::trace::FutureExt as _;
///
/// let propagation = Propagation::default();
/// while let Some(delivery) = consumer.next().await {
///     let delivery = delivery?;
///     let parent = delivery.trace_context(&propagation);
///     // Spans started inside belong to the producer's trace.
///     async { /* handle */ }.with_context(parent).await;
///     delivery.ack(Default::default()).await?;
/// }
/// # Ok(()) }
/// ```
pub trait DeliveryExt: sealed::Sealed {
    /// The remote context in the delivery's headers, extracted from an empty
    /// context: a delivery without (valid) trace headers gives an empty context,
    /// never the caller's current one.
    fn trace_context(&self, propagation: &Propagation) -> Context;
}

impl DeliveryExt for Delivery {
    fn trace_context(&self, propagation: &Propagation) -> Context {
        match self.properties.headers() {
            Some(h) => propagation.extract(&FieldTableExtractor(h)),
            None => Context::new(),
        }
    }
}
