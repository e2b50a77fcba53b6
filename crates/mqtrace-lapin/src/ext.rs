//! Extension traits for code that keeps its own lapin calls.

use lapin::message::Delivery;
use lapin::BasicProperties;
use mqtrace::Propagation;
use opentelemetry::Context;

use crate::carrier::{FieldTableExtractor, FieldTableInjector};

mod sealed {
    pub trait Sealed {}
    impl Sealed for lapin::BasicProperties {}
    impl Sealed for lapin::message::Delivery {}
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
