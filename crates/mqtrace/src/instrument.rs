//! The [`Instrumenter`]: every span mqtrace creates is decided here.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::SystemTime;

use futures_util::{FutureExt as _, StreamExt as _};
use opentelemetry::global::{self, BoxedTracer};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{
    FutureExt as _, Link, Span as _, SpanBuilder, SpanContext, SpanKind, Status, TraceContextExt,
    Tracer, TracerProvider,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};

use crate::conventions::{attr, Conventions};
use crate::describe::{MessageDescription, OperationType};
use crate::exceptions::{ExceptionLogger, ExceptionSignals};
use crate::forward::{self, Disposition, ForwardKind, RetryPolicy};
use crate::metrics::{Measure, Measured, MeterSource, Metrics};
use crate::outcome::{truncate, HandlerError, HandlerResult};
use crate::propagation::Propagation;

/// `error.type` when failures have no one type (the conventions' fallback).
const OTHER_ERROR: &str = "_OTHER";

/// Longest captured header value; longer values are cut at a character boundary.
pub const MAX_CAPTURED_HEADER_LEN: usize = 256;

/// How a `process` span relates to the context the producer injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProcessParenting {
    /// The producer's context is the parent **and** a link: one connected trace that
    /// link-aware backends also show as a link (the default).
    #[default]
    ParentAndLink,
    /// The producer's context is only a link; the process span starts a new trace (or
    /// continues the ambient one, e.g. an HTTP server span). What the conventions
    /// recommend, and right for fan-in.
    LinkOnly,
    /// The producer's context is the parent, with no link.
    ParentOnly,
}

/// What the core knows about a delivery when its handler starts: handed to the
/// handler by [`Instrumenter::process_with`] and carried by each adapter's message
/// type, so no handler re-reads mqtrace's headers.
#[derive(Debug, Clone)]
pub struct Attempt {
    number: u32,
    max: u32,
    context: Context,
}

impl Attempt {
    /// Which delivery attempt this is (1 = first), counting forwarded retries and
    /// the broker's redeliveries.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// The retry budget: attempts before the message is dead-lettered.
    pub fn max_attempts(&self) -> u32 {
        self.max
    }

    /// Whether a transient failure now dead-letters the message.
    pub fn is_last(&self) -> bool {
        self.number >= self.max
    }

    /// The context with the process span active (also the current context while
    /// the handler runs).
    pub fn context(&self) -> &Context {
        &self.context
    }
}

/// A message as the core needs to see it. Adapters implement this for their delivery
/// type: a description, a header carrier, the body, and what the broker says about
/// timing and redelivery.
pub trait Inbound {
    /// The message described for a `process` operation.
    fn description(&self) -> MessageDescription;
    /// The message's headers, as an OpenTelemetry extractor.
    fn headers(&self) -> impl Extractor + '_;
    /// The message body.
    fn body(&self) -> &[u8];
    /// When the broker accepted the message, if it says.
    fn broker_timestamp(&self) -> Option<SystemTime> {
        None
    }
    /// How many times the broker has delivered this message (1 on first delivery).
    fn delivery_count(&self) -> Option<u32> {
        None
    }
    /// Whether the message arrived under a receive span of mqtrace's
    /// ([`Instrumenter::start_receive`]), which counted it in
    /// `messaging.client.consumed.messages`: its processing then does not count
    /// it again, as the conventions ask (default: false, counted at processing).
    fn counted_at_receive(&self) -> bool {
        false
    }
}

/// What a start hook sees.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct MessageView<'a> {
    /// The operation's description.
    pub description: &'a MessageDescription,
    /// The body, where the operation has one message.
    pub body: Option<&'a [u8]>,
}

/// Adds attributes of the user's choosing when a span starts (e.g. an order id taken
/// from the payload). Implemented for closures and for `()` (nothing added).
pub trait OnStart: Send + Sync + 'static {
    /// Appends attributes for this message.
    fn on_start(&self, message: &MessageView<'_>, attributes: &mut Vec<KeyValue>);
}

impl OnStart for () {
    fn on_start(&self, _: &MessageView<'_>, _: &mut Vec<KeyValue>) {}
}

impl<F> OnStart for F
where
    F: Fn(&MessageView<'_>, &mut Vec<KeyValue>) + Send + Sync + 'static,
{
    fn on_start(&self, message: &MessageView<'_>, attributes: &mut Vec<KeyValue>) {
        self(message, attributes)
    }
}

/// A span started by the [`Instrumenter`], held in the context that carries it.
/// Dropping it ends the span too; [`MessagingSpan::end`] says so explicitly. A
/// span that measures an operation (send, receive, process, forward) records its
/// metrics when it ends; clones share the span but not the measurement.
pub struct MessagingSpan {
    cx: Context,
    measure: Option<Measure>,
    /// Where failures go besides the span, and the span's operation.
    exceptions: Option<(Arc<ExceptionSignals>, OperationType)>,
}

impl fmt::Debug for MessagingSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessagingSpan")
            .field("span_context", &self.cx.span().span_context())
            .field("measured", &self.measure.as_ref().map(|m| m.what))
            .finish()
    }
}

impl Clone for MessagingSpan {
    fn clone(&self) -> Self {
        Self {
            cx: self.cx.clone(),
            measure: None,
            exceptions: self.exceptions.clone(),
        }
    }
}

impl Drop for MessagingSpan {
    fn drop(&mut self) {
        if let Some(measure) = self.measure.take() {
            measure.record();
        }
    }
}

impl MessagingSpan {
    /// The context with this span active: the parent for child spans, and what is
    /// injected into an outgoing message.
    pub fn context(&self) -> &Context {
        &self.cx
    }

    /// The span's identity.
    pub fn span_context(&self) -> SpanContext {
        self.cx.span().span_context().clone()
    }

    /// Adds an attribute.
    pub fn set_attribute(&self, attribute: KeyValue) {
        self.cx.span().set_attribute(attribute);
    }

    /// Records a handler failure.
    pub fn record_error(&self, error: &HandlerError) {
        let span = self.cx.span();
        match &self.exceptions {
            Some((signals, operation)) => {
                error.record_on(&span, signals.span_events());
                signals.log(
                    *operation,
                    error.error_type(),
                    &error.to_string(),
                    span.span_context(),
                );
            }
            None => error.record(&span),
        }
        self.failed_with(error.error_type());
    }

    fn failed_with(&self, error_type: &str) {
        if let Some(m) = &self.measure {
            let _ = m.error.set(error_type.to_owned());
        }
    }

    /// The metric attribute set of this span's operation, when it is measured.
    pub(crate) fn stream(&self) -> Option<&Arc<crate::metrics::Stream>> {
        self.measure.as_ref().map(|m| &m.stream)
    }

    /// Records a broker failure (publish, ack...): status Error and `error.type`.
    pub fn record_failure(&self, error_type: &str, error: &dyn std::error::Error) {
        let span = self.cx.span();
        let events = match &self.exceptions {
            Some((signals, operation)) => {
                signals.log(
                    *operation,
                    error_type,
                    &error.to_string(),
                    span.span_context(),
                );
                signals.span_events()
            }
            None => true,
        };
        if events {
            span.add_event(
                "exception",
                vec![
                    KeyValue::new(attr::EXCEPTION_TYPE, error_type.to_owned()),
                    KeyValue::new(attr::EXCEPTION_MESSAGE, error.to_string()),
                ],
            );
        }
        span.set_attribute(KeyValue::new(attr::ERROR_TYPE, error_type.to_owned()));
        span.set_status(Status::error(error.to_string()));
        self.failed_with(error_type);
    }

    /// Ends the span now (and records its measurement).
    pub fn end(self) {
        self.end_measured_at(None);
    }

    /// Ends the span at `now` when given (a clock reading the caller already
    /// has), else now; a measured span's measurement ends at the same reading.
    pub(crate) fn end_measured_at(mut self, now: Option<SystemTime>) {
        let now = match self.measure.take() {
            Some(measure) => {
                let now = now.unwrap_or_else(SystemTime::now);
                measure.record_at(now);
                Some(now)
            }
            None => now,
        };
        match now {
            Some(t) => self.cx.span().end_with_timestamp(t),
            None => self.cx.span().end(),
        }
    }
}

/// The outcome of [`Instrumenter::process`]: the handler's result and the still-open
/// process span, so settlement and forwarding become its children.
#[derive(Debug)]
pub struct Processed {
    span: MessagingSpan,
    outcome: HandlerResult,
    attempt: u32,
    creation: SpanContext,
    original: SpanContext,
    /// Boxed: the lifecycle's futures move `Processed` several times.
    description: Box<MessageDescription>,
}

impl Processed {
    /// The handler's result.
    pub fn outcome(&self) -> &HandlerResult {
        &self.outcome
    }

    /// Which delivery attempt this was (1 = first).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The process span.
    pub fn span(&self) -> &MessagingSpan {
        &self.span
    }

    /// The producer's context found in the message (invalid if there was none).
    pub fn creation_context(&self) -> &SpanContext {
        &self.creation
    }

    /// The creation context of the message's first publication: the same as
    /// [`Processed::creation_context`] unless the message was forwarded.
    pub fn original_context(&self) -> &SpanContext {
        &self.original
    }

    /// The message's description, as on its process span: what settle spans
    /// describe too.
    pub fn description(&self) -> &MessageDescription {
        &self.description
    }

    /// Whether the handler failed with a permanent error.
    pub fn is_permanent_failure(&self) -> bool {
        matches!(&self.outcome, Err(e) if e.retryable() == crate::outcome::Retryable::Permanent)
    }

    /// What should happen to the message, by the policy's rules.
    pub fn disposition(&self, policy: &RetryPolicy, has_dead_letter: bool) -> Disposition {
        forward::decide(policy, self.attempt, &self.outcome, has_dead_letter)
    }

    /// Ends the span without a disposition (the caller settles by its own rules).
    fn end_unsettled(self) -> HandlerResult {
        self.span.end();
        self.outcome
    }

    /// Records the disposition on the span and ends it. Returns the handler's result.
    pub fn finish(self, disposition: Disposition) -> HandlerResult {
        self.finish_at(disposition, None)
    }

    /// [`Processed::finish`], the process measurement ending at `now` when given.
    pub(crate) fn finish_at(
        self,
        disposition: Disposition,
        now: Option<SystemTime>,
    ) -> HandlerResult {
        self.span
            .set_attribute(KeyValue::new(attr::DISPOSITION, disposition.as_str()));
        if let Some(m) = &self.span.measure {
            m.metrics.disposition(&m.stream, disposition);
        }
        self.span.end_measured_at(now);
        self.outcome
    }
}

/// The outcome of [`Instrumenter::process_batch`].
#[derive(Debug)]
#[non_exhaustive]
pub struct BatchProcessed {
    /// One result per message, in the order given.
    pub outcomes: Vec<HandlerResult>,
    /// Messages whose handler succeeded.
    pub succeeded: usize,
    /// Messages whose handler failed.
    pub failed: usize,
}

/// Builds and configures an [`Instrumenter`].
pub struct InstrumenterBuilder {
    tracer: Option<BoxedTracer>,
    meter: Option<opentelemetry::metrics::Meter>,
    logger: Option<Box<dyn ExceptionLogger>>,
    conventions: Conventions,
    parenting: ProcessParenting,
    propagation: Option<Propagation>,
    capture_headers: Vec<String>,
    on_start: Arc<dyn OnStart>,
    retry: RetryPolicy,
    settle_spans: bool,
    body_size: bool,
    metrics: bool,
}

impl fmt::Debug for InstrumenterBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstrumenterBuilder")
            .field("conventions", &self.conventions)
            .field("parenting", &self.parenting)
            .field("propagation", &self.propagation)
            .field("capture_headers", &self.capture_headers)
            .field("retry", &self.retry)
            .field("settle_spans", &self.settle_spans)
            .field("body_size", &self.body_size)
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

/// The instrumentation scope of every span mqtrace makes: `mqtrace`, with the
/// core's version. Adapters and the telemetry set-up use it too, so a backend sees
/// one library.
pub fn instrumentation_scope() -> InstrumentationScope {
    InstrumentationScope::builder("mqtrace")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

impl InstrumenterBuilder {
    /// Spans go to this provider instead of the global one.
    pub fn tracer_provider<P>(mut self, provider: &P) -> Self
    where
        P: TracerProvider,
        P::Tracer: Send + Sync + 'static,
        <P::Tracer as Tracer>::Span: Send + Sync + 'static,
    {
        self.tracer = Some(BoxedTracer::new(Box::new(
            provider.tracer_with_scope(instrumentation_scope()),
        )));
        self
    }

    /// Metrics go to this provider instead of the global one (which is otherwise
    /// looked up at the first measurement).
    pub fn meter_provider<P>(mut self, provider: &P) -> Self
    where
        P: opentelemetry::metrics::MeterProvider,
    {
        self.meter = Some(provider.meter_with_scope(instrumentation_scope()));
        self
    }

    /// Failures become `messaging.{operation}.exception` log records of this
    /// provider (not under legacy conventions; see [`crate::exceptions`]).
    pub fn logger_provider<P>(mut self, provider: &P) -> Self
    where
        P: opentelemetry::logs::LoggerProvider,
        P::Logger: Send + Sync + 'static,
    {
        self.logger = Some(crate::exceptions::logger_of(provider));
        self
    }

    /// The attribute names to emit (default: from the environment, see
    /// [`Conventions::from_env`]).
    pub fn conventions(mut self, conventions: Conventions) -> Self {
        self.conventions = conventions;
        self
    }

    /// How process spans relate to the producer's context.
    pub fn parenting(mut self, parenting: ProcessParenting) -> Self {
        self.parenting = parenting;
        self
    }

    /// The propagation formats (default: the process's default, see
    /// [`Propagation::set_default`]: what the telemetry set-up installed, taken at
    /// the first inject or extract after it did; W3C trace context and baggage
    /// until then).
    pub fn propagation(mut self, propagation: Propagation) -> Self {
        self.propagation = Some(propagation);
        self
    }

    /// Records this header of incoming messages as `messaging.header.<name>` on the
    /// process span. Nothing is captured unless listed; bodies never are.
    pub fn capture_header(mut self, name: impl Into<String>) -> Self {
        self.capture_headers.push(name.into().to_ascii_lowercase());
        self
    }

    /// A hook that adds attributes when a span starts.
    pub fn on_start(mut self, hook: impl OnStart) -> Self {
        self.on_start = Arc::new(hook);
        self
    }

    /// Retry budget and dead-letter rules.
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Settle spans (CLIENT: `ack`, `nack`, `commit`, `delete`), children of the
    /// process span, for every settlement made through
    /// [`Instrumenter::settle`] (default: off).
    pub fn settle_spans(mut self, on: bool) -> Self {
        self.settle_spans = on;
        self
    }

    /// `messaging.message.body.size` on send, create and process spans (default:
    /// off, the attribute is opt-in in the conventions).
    pub fn body_size(mut self, on: bool) -> Self {
        self.body_size = on;
        self
    }

    /// Whether to record the messaging metrics (default: on; see
    /// [`crate::metrics`]). Off, no measurement is taken at all.
    pub fn metrics(mut self, on: bool) -> Self {
        self.metrics = on;
        self
    }

    /// Finishes the instrumenter.
    pub fn build(self) -> Instrumenter {
        Instrumenter {
            propagation: match self.propagation {
                Some(p) => PropagationSource::Given(Arc::new(p)),
                None => PropagationSource::Default(Arc::default()),
            },
            settle_spans: self.settle_spans,
            inner: Arc::new(Inner {
                tracer: match self.tracer {
                    Some(tracer) => TracerSource::Given(tracer),
                    None => TracerSource::Global(std::sync::OnceLock::new()),
                },
                metrics: Arc::new(Metrics::new(
                    match self.meter {
                        Some(meter) => MeterSource::Given(meter),
                        None => MeterSource::Global,
                    },
                    self.conventions,
                )),
                exceptions: Arc::new(ExceptionSignals::new(
                    self.conventions,
                    self.logger,
                    crate::exceptions::dup_from_env(),
                )),
                conventions: self.conventions,
                parenting: self.parenting,
                capture_headers: self.capture_headers,
                on_start: self.on_start,
                retry: self.retry,
                body_size: self.body_size,
                metrics_on: self.metrics,
            }),
        }
    }
}

/// The formats: given to the builder, or the process's default, resolved when
/// first used (so an instrumenter made before the telemetry set-up still uses what
/// the set-up installed).
#[derive(Clone)]
enum PropagationSource {
    Given(Arc<Propagation>),
    Default(Arc<std::sync::OnceLock<Propagation>>),
}

impl fmt::Debug for PropagationSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Given(p) => p.fmt(f),
            Self::Default(cell) => match cell.get() {
                Some(p) => p.fmt(f),
                None => f.write_str("(the process default, not yet used)"),
            },
        }
    }
}

/// Where spans go: a provider given to the builder, or the global provider, looked
/// up when spans start until it answers with real spans. An instrumenter built
/// before the application installs its provider (a `static`, a field set up
/// early) then exports once the provider is there, instead of holding the no-op
/// tracer it saw at build time.
enum TracerSource {
    Given(BoxedTracer),
    Global(std::sync::OnceLock<BoxedTracer>),
}

struct Inner {
    tracer: TracerSource,
    metrics: Arc<Metrics>,
    exceptions: Arc<ExceptionSignals>,
    conventions: Conventions,
    parenting: ProcessParenting,
    capture_headers: Vec<String>,
    on_start: Arc<dyn OnStart>,
    retry: RetryPolicy,
    body_size: bool,
    metrics_on: bool,
}

/// Creates every messaging span: it names them, picks kind, parent and links, sets
/// the attributes of the chosen conventions at start, and maps outcomes to status.
/// Adapters describe; the instrumenter decides. Cheap to clone.
#[derive(Clone)]
pub struct Instrumenter {
    inner: Arc<Inner>,
    // Beside `inner`, so an adapter can swap formats cheaply (`with_propagation`).
    propagation: PropagationSource,
    settle_spans: bool,
}

impl fmt::Debug for Instrumenter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Instrumenter")
            .field("conventions", &self.inner.conventions)
            .field("parenting", &self.inner.parenting)
            .field("propagation", &self.propagation)
            .field("retry", &self.inner.retry)
            .field("settle_spans", &self.settle_spans)
            .finish_non_exhaustive()
    }
}

impl Default for Instrumenter {
    fn default() -> Self {
        Self::builder().build()
    }
}

// === impl Instrumenter ===

impl Instrumenter {
    /// A builder with the defaults: global tracer provider, conventions from the
    /// environment, producer as parent and link, W3C propagation, retry budget 3.
    pub fn builder() -> InstrumenterBuilder {
        InstrumenterBuilder {
            tracer: None,
            meter: None,
            logger: None,
            conventions: Conventions::from_env(),
            parenting: ProcessParenting::default(),
            propagation: None,
            capture_headers: Vec::new(),
            on_start: Arc::new(()),
            retry: RetryPolicy::default(),
            settle_spans: false,
            body_size: false,
            metrics: true,
        }
    }

    /// Starts a span of the adapter's own making (a Lambda invocation, say) with
    /// the tracer every mqtrace span comes from (scope [`instrumentation_scope`]),
    /// as a child of `parent`.
    pub fn start_span(&self, builder: SpanBuilder, parent: &Context) -> MessagingSpan {
        let span = match &self.inner.tracer {
            TracerSource::Given(tracer) => builder.start_with_context(tracer, parent),
            TracerSource::Global(cached) => match cached.get() {
                Some(tracer) => builder.start_with_context(tracer, parent),
                None => {
                    let tracer =
                        global::tracer_provider().tracer_with_scope(instrumentation_scope());
                    let span = builder.start_with_context(&tracer, parent);
                    // A provider that makes real spans (valid ids, sampled or not)
                    // has been installed: keep its tracer from now on.
                    if span.span_context().is_valid() {
                        let _ = cached.set(tracer);
                    }
                    span
                }
            },
        };
        MessagingSpan {
            cx: parent.with_span(span),
            measure: None,
            exceptions: None,
        }
    }

    /// The meter mqtrace's metrics come from (scope [`instrumentation_scope`]): for
    /// adapters' own instruments, such as Kafka's consumer lag.
    pub fn meter(&self) -> opentelemetry::metrics::Meter {
        self.inner.metrics.meter()
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The conventions in force.
    pub fn conventions(&self) -> Conventions {
        self.inner.conventions
    }

    /// The propagation formats.
    pub fn propagation(&self) -> &Propagation {
        match &self.propagation {
            PropagationSource::Given(p) => p,
            PropagationSource::Default(cell) => match cell.get() {
                Some(p) => p,
                None => match Propagation::installed_default() {
                    Some(installed) => cell.get_or_init(|| installed),
                    None => Propagation::builtin(),
                },
            },
        }
    }

    /// The same instrumenter with other propagation formats: what adapters use
    /// when a broker carries context in more places than headers (SQS's
    /// `AWSTraceHeader`).
    pub fn with_propagation(&self, propagation: Propagation) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            propagation: PropagationSource::Given(Arc::new(propagation)),
            settle_spans: self.settle_spans,
        }
    }

    /// The same instrumenter with settle spans on or off (see
    /// [`InstrumenterBuilder::settle_spans`]).
    pub fn with_settle_spans(&self, on: bool) -> Self {
        Self {
            settle_spans: on,
            ..self.clone()
        }
    }

    /// Whether the messaging metrics are on ([`InstrumenterBuilder::metrics`]):
    /// an adapter's own instruments (Kafka's lag and statistics gauges) follow
    /// the same switch.
    pub fn metrics_on(&self) -> bool {
        self.inner.metrics_on
    }

    /// Whether settle spans are on: an adapter that coalesces settlements (one
    /// ack for many deliveries) does so only when they are off, since a settle
    /// span describes one call for one delivery.
    pub fn settle_spans_on(&self) -> bool {
        self.settle_spans
    }

    /// The retry policy.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.retry
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        &self,
        d: &MessageDescription,
        kind: SpanKind,
        parent: &Context,
        links: Vec<Link>,
        body: Option<&[u8]>,
        extra: impl FnOnce(&mut Vec<KeyValue>),
        measured: Option<Measured>,
    ) -> MessagingSpan {
        self.start_at(d, kind, parent, links, body, extra, None, measured)
    }

    #[allow(clippy::too_many_arguments)]
    fn start_at(
        &self,
        d: &MessageDescription,
        kind: SpanKind,
        parent: &Context,
        links: Vec<Link>,
        body: Option<&[u8]>,
        extra: impl FnOnce(&mut Vec<KeyValue>),
        start_time: Option<SystemTime>,
        measured: Option<Measured>,
    ) -> MessagingSpan {
        let mut attributes = Vec::with_capacity(16);
        self.inner
            .conventions
            .attributes(d, self.inner.body_size, &mut attributes);
        extra(&mut attributes);
        self.inner.on_start.on_start(
            &MessageView {
                description: d,
                body,
            },
            &mut attributes,
        );
        // A measured span's start is read here, once, for the span and its
        // measurement (the SDK would read the clock again otherwise).
        let mut start_time = start_time;
        let measure = measured
            .filter(|_| self.inner.metrics_on)
            .map(|what| Measure {
                metrics: Arc::clone(&self.inner.metrics),
                what,
                stream: self.inner.metrics.stream(d),
                started: *start_time.get_or_insert_with(SystemTime::now),
                error: std::sync::OnceLock::new(),
            });
        let mut builder = SpanBuilder::from_name(self.inner.conventions.span_name(d))
            .with_kind(kind)
            .with_attributes(attributes)
            .with_links(links);
        if let Some(t) = start_time {
            builder = builder.with_start_time(t);
        }
        let mut span = self.start_span(builder, parent);
        span.measure = measure;
        span.exceptions = Some((Arc::clone(&self.inner.exceptions), d.operation));
        span
    }

    /// A `send` span (PRODUCER), child of the current context. Inject its context
    /// into the message with [`Instrumenter::inject`]; end it when the broker has
    /// acknowledged the message.
    pub fn start_send(&self, d: &MessageDescription, body: Option<&[u8]>) -> MessagingSpan {
        self.start(
            d,
            SpanKind::Producer,
            &Context::current(),
            Vec::new(),
            body,
            |_| {},
            Some(Measured::Send(1)),
        )
    }

    /// A `create` span (PRODUCER) for one message of a batch send.
    pub fn start_create(&self, d: &MessageDescription, body: Option<&[u8]>) -> MessagingSpan {
        self.start(
            d,
            SpanKind::Producer,
            &Context::current(),
            Vec::new(),
            body,
            |_| {},
            None,
        )
    }

    /// The `send` span of a batch (CLIENT) linking every message's `create` span.
    pub fn start_batch_send(
        &self,
        d: &MessageDescription,
        created: &[SpanContext],
    ) -> MessagingSpan {
        let links = created
            .iter()
            .filter(|sc| sc.is_valid())
            .map(|sc| Link::with_context(sc.clone()))
            .collect();
        self.start(
            d,
            SpanKind::Client,
            &Context::current(),
            links,
            None,
            |_| {},
            Some(Measured::Send(
                d.batch_message_count.unwrap_or(created.len() as u64),
            )),
        )
    }

    /// A `receive` span (CLIENT) for one poll, linking each received message's
    /// creation context (with its message id on the link). The messages are
    /// counted in `messaging.client.consumed.messages` here, with the receive's
    /// operation name; their [`Inbound::counted_at_receive`] should say so, or
    /// their processing counts them again.
    pub fn start_receive<'a, M>(&self, d: &MessageDescription, messages: &'a [M]) -> MessagingSpan
    where
        M: Inbound + 'a,
    {
        self.receive_span(d, messages, None)
    }

    fn receive_span<'a, M>(
        &self,
        d: &MessageDescription,
        messages: &'a [M],
        started: Option<SystemTime>,
    ) -> MessagingSpan
    where
        M: Inbound + 'a,
    {
        let links = messages
            .iter()
            .filter_map(|m| Self::message_link(m, &self.creation_of(m)))
            .collect();
        let span = self.start_at(
            d,
            SpanKind::Client,
            &Context::current(),
            links,
            None,
            |_| {},
            started,
            Some(Measured::Client),
        );
        if let (Some(stream), false) = (span.stream(), messages.is_empty()) {
            self.inner.metrics.received(stream, messages.len() as u64);
        }
        span
    }

    /// A `receive` span like [`Instrumenter::start_receive`], started at
    /// `started`: for pulls whose messages (and so the links) are known only once
    /// the poll has returned, while the span should cover the poll.
    pub fn start_receive_at<'a, M>(
        &self,
        d: &MessageDescription,
        messages: &'a [M],
        started: SystemTime,
    ) -> MessagingSpan
    where
        M: Inbound + 'a,
    {
        self.receive_span(d, messages, Some(started))
    }

    /// The producer's context carried by a message (invalid when there is none).
    fn creation_of(&self, m: &impl Inbound) -> SpanContext {
        self.extract(&m.headers()).span().span_context().clone()
    }

    /// A link to a message's creation context, with its message id.
    fn message_link(m: &impl Inbound, sc: &SpanContext) -> Option<Link> {
        if !sc.is_valid() {
            return None;
        }
        let sc = sc.clone();
        let d = m.description();
        let attributes = d
            .message_id
            .map(|id| vec![KeyValue::new(attr::MESSAGING_MESSAGE_ID, id)])
            .unwrap_or_default();
        Some(Link::new(sc, attributes, 0))
    }

    /// A settle span (CLIENT: `ack`, `nack`, `commit`, `delete`...), child of the
    /// process span.
    pub fn start_settle(&self, d: &MessageDescription, process: &MessagingSpan) -> MessagingSpan {
        self.settle_span_at(d, process, None)
    }

    /// A settle span started at `started` when given (a clock reading the
    /// lifecycle already has).
    pub(crate) fn settle_span_at(
        &self,
        d: &MessageDescription,
        process: &MessagingSpan,
        started: Option<SystemTime>,
    ) -> MessagingSpan {
        self.start_at(
            d,
            SpanKind::Client,
            process.context(),
            Vec::new(),
            None,
            |_| {},
            started,
            None,
        )
    }

    /// Injects a span's context into outgoing headers.
    pub fn inject(&self, span: &MessagingSpan, carrier: &mut dyn Injector) {
        self.propagation().inject(span.context(), carrier);
    }

    /// Injects within a header budget (SQS allows 10 attributes): each format whole
    /// or not at all. Returns the number of entries written.
    pub fn inject_within(
        &self,
        span: &MessagingSpan,
        carrier: &mut dyn Injector,
        budget: usize,
    ) -> usize {
        self.propagation()
            .inject_within(span.context(), carrier, budget)
    }

    /// Extracts a message's remote context, from an empty context.
    pub fn extract(&self, carrier: &dyn Extractor) -> Context {
        self.propagation().extract(carrier)
    }

    /// Starts the `process` span (CONSUMER) of a message, per the parenting switch.
    /// [`Instrumenter::process`] does this and runs the handler; use this directly
    /// only when the handler cannot be handed over.
    pub fn start_process<M: Inbound>(&self, message: &M) -> (MessagingSpan, SpanContext, u32) {
        let (span, creation, attempt, _) = self.begin_process(message);
        (span, creation, attempt)
    }

    fn begin_process<M: Inbound>(
        &self,
        message: &M,
    ) -> (MessagingSpan, SpanContext, u32, Box<MessageDescription>) {
        let headers = message.headers();
        let remote = self.extract(&headers);
        let creation = remote.span().span_context().clone();
        let ambient = Context::current();
        let ambient_sc = ambient.span().span_context().clone();
        let (parent, mut links) = match (self.inner.parenting, creation.is_valid()) {
            (_, false) => (ambient, Vec::new()),
            (ProcessParenting::ParentAndLink, true) => {
                (remote, vec![Link::with_context(creation.clone())])
            }
            (ProcessParenting::ParentOnly, true) => (remote, Vec::new()),
            (ProcessParenting::LinkOnly, true) => {
                (ambient, vec![Link::with_context(creation.clone())])
            }
        };
        // Processing inside another span (say an HTTP request) while the producer is
        // the parent: keep the ambient span as a link.
        if ambient_sc.is_valid() && parent.span().span_context() != &ambient_sc {
            links.push(Link::with_context(ambient_sc));
        }
        let attempt = forward::attempt_of(&headers, message.delivery_count());
        let (span, d) = self.start_process_span(message, &headers, &parent, links, attempt);
        (span, creation, attempt, d)
    }

    fn start_process_span<M: Inbound>(
        &self,
        message: &M,
        headers: &dyn Extractor,
        parent: &Context,
        links: Vec<Link>,
        attempt: u32,
    ) -> (MessagingSpan, Box<MessageDescription>) {
        let d = message.description();
        // One wall-clock reading for the span's start, its measurement, and the
        // queue time's attribute and metric.
        let published = message.broker_timestamp();
        let now = (published.is_some() || self.inner.metrics_on).then(SystemTime::now);
        let waited = published
            .zip(now)
            .map(|(sent, now)| crate::metrics::seconds_between(sent, now));
        let span = self.start_at(
            &d,
            SpanKind::Consumer,
            parent,
            links,
            Some(message.body()),
            |attributes| {
                attributes.push(KeyValue::new(attr::ATTEMPT, i64::from(attempt)));
                if let Some(waited) = waited {
                    attributes.push(KeyValue::new(attr::QUEUE_TIME, waited));
                }
                for name in &self.inner.capture_headers {
                    if let Some(value) = headers.get(name) {
                        attributes.push(KeyValue::new(
                            format!("{}{name}", attr::HEADER_PREFIX),
                            truncate(value, MAX_CAPTURED_HEADER_LEN).to_owned(),
                        ));
                    }
                }
            },
            now,
            Some(Measured::Process),
        );
        if let Some(stream) = span.stream() {
            self.inner
                .metrics
                .consumed(stream, waited, message.counted_at_receive());
        }
        (span, Box::new(d))
    }

    /// Processes one message: extracts its context, starts the `process` span, runs
    /// the handler inside it (spans the handler creates, with the OpenTelemetry API
    /// or `tracing`, are its children), and records the outcome. A handler that
    /// panics counts as a transient failure with `error.type = panic`.
    ///
    /// The span stays open in the returned [`Processed`] so settlement and
    /// forwarding are its children; [`Processed::finish`] ends it.
    pub async fn process<M, Fut>(&self, message: &M, handler: Fut) -> Processed
    where
        M: Inbound,
        Fut: Future<Output = HandlerResult>,
    {
        self.process_with(message, |_| handler).await
    }

    /// [`Instrumenter::process`] for a handler that wants to know the delivery's
    /// [`Attempt`] (its number, the budget, the process span's context): the
    /// handler is called with it once the span has started.
    pub async fn process_with<M, F, Fut>(&self, message: &M, handler: F) -> Processed
    where
        M: Inbound,
        F: FnOnce(Attempt) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        let (span, creation, attempt, description) = self.begin_process(message);
        let original =
            forward::original_context(&message.headers()).unwrap_or_else(|| creation.clone());
        let handler = handler(Attempt {
            number: attempt,
            max: self.inner.retry.max_attempts(),
            context: span.context().clone(),
        });
        let outcome = run_in(&span, handler).await;
        Processed {
            span,
            outcome,
            attempt,
            creation,
            original,
            description,
        }
    }

    /// Processes a batch: one `process` span (CONSUMER) for the batch with a link
    /// per message (carrying its message id) and `messaging.batch.message_count`,
    /// and a child `process` span per message linking its creation context. The
    /// batch span counts successes and failures and is an Error when any failed.
    /// Outcomes are handed back in order so the caller settles each message.
    pub async fn process_batch<M, F, Fut>(
        &self,
        batch: &MessageDescription,
        messages: &[M],
        mut handler: F,
    ) -> BatchProcessed
    where
        M: Inbound,
        F: FnMut(&M) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        let (outcomes, failed) = self
            .run_batch(
                batch,
                messages,
                1,
                |m, _| handler(m),
                |_, processed| std::future::ready(processed.end_unsettled()),
            )
            .await;
        BatchProcessed {
            succeeded: outcomes.len() - failed,
            outcomes,
            failed,
        }
    }

    /// [`Instrumenter::process_batch`] where each message is settled through the
    /// core's lifecycle ([`Instrumenter::settle`]) as soon as its handler is done,
    /// with a settler from `settler_for`: what a batch consumer whose broker
    /// settles per message uses (Lambda's partial batch response). The handler is
    /// told each message's [`Attempt`]. Up to `concurrency` handlers run at once
    /// (1: one after another, each called once the one before has finished), each
    /// in its own message's context; results are settled in the messages' order.
    pub async fn process_batch_settled<'m, M, F, Fut, S, G>(
        &self,
        batch: &MessageDescription,
        messages: &'m [M],
        concurrency: usize,
        handler: F,
        mut settler_for: G,
    ) -> Vec<crate::settle::Settled>
    where
        M: Inbound,
        F: FnMut(&M, Attempt) -> Fut,
        Fut: Future<Output = HandlerResult>,
        S: crate::settle::Settler + 'm,
        G: FnMut(&'m M) -> S,
    {
        let (settled, _) = self
            .run_batch(
                batch,
                messages,
                concurrency,
                handler,
                |message, processed| self.settle(processed, settler_for(message)),
            )
            .await;
        settled
    }

    /// The batch span and one process span per message, each handed to `finish`
    /// once its handler is done; returns what `finish` made and how many failed.
    async fn run_batch<'m, M, F, Fut, E, EFut, T>(
        &self,
        batch: &MessageDescription,
        messages: &'m [M],
        concurrency: usize,
        mut handler: F,
        mut finish: E,
    ) -> (Vec<T>, usize)
    where
        M: Inbound,
        F: FnMut(&M, Attempt) -> Fut,
        Fut: Future<Output = HandlerResult>,
        E: FnMut(&'m M, Processed) -> EFut,
        EFut: Future<Output = T>,
    {
        let mut d = batch.clone();
        d.operation = OperationType::Process;
        d.batch_message_count = Some(messages.len() as u64);
        // Each message's context is extracted once, for the batch link and its own span.
        let creations: Vec<SpanContext> = messages.iter().map(|m| self.creation_of(m)).collect();
        let links = messages
            .iter()
            .zip(&creations)
            .filter_map(|(m, sc)| Self::message_link(m, sc))
            .collect();
        let batch_span = self.start(
            &d,
            SpanKind::Consumer,
            &Context::current(),
            links,
            None,
            |_| {},
            None,
        );

        // Each message's span starts when its turn comes; up to `concurrency`
        // handlers run at once, each in its own span's context, and the results
        // are finished in the messages' order.
        let mut error_type: Option<String> = None;
        let (out, failed) = {
            let batch_cx = batch_span.context();
            let turns = messages.iter().zip(creations).map(|(message, creation)| {
                let headers = message.headers();
                let links = if creation.is_valid() {
                    vec![Link::with_context(creation.clone())]
                } else {
                    Vec::new()
                };
                let attempt = forward::attempt_of(&headers, message.delivery_count());
                let (span, description) =
                    self.start_process_span(message, &headers, batch_cx, links, attempt);
                let original =
                    forward::original_context(&headers).unwrap_or_else(|| creation.clone());
                let told = Attempt {
                    number: attempt,
                    max: self.inner.retry.max_attempts(),
                    context: span.context().clone(),
                };
                let run = handler(message, told);
                async move {
                    let outcome = run_in(&span, run).await;
                    let processed = Processed {
                        span,
                        outcome,
                        attempt,
                        creation,
                        original,
                        description,
                    };
                    (message, processed)
                }
            });
            let mut turns =
                std::pin::pin!(futures_util::stream::iter(turns).buffered(concurrency.max(1)));
            let mut out = Vec::with_capacity(messages.len());
            let mut failed = 0;
            while let Some((message, processed)) = futures_util::StreamExt::next(&mut turns).await {
                if let Err(e) = &processed.outcome {
                    failed += 1;
                    error_type = match error_type {
                        None => Some(e.error_type().to_owned()),
                        Some(t) if t == e.error_type() => Some(t),
                        Some(_) => Some(OTHER_ERROR.to_owned()),
                    };
                }
                out.push(finish(message, processed).await);
            }
            (out, failed)
        };
        batch_span.set_attribute(KeyValue::new(
            attr::BATCH_SUCCEEDED,
            (out.len() - failed) as i64,
        ));
        batch_span.set_attribute(KeyValue::new(attr::BATCH_FAILED, failed as i64));
        if failed > 0 {
            // The failures' type when they share one, else `_OTHER`.
            batch_span.set_attribute(KeyValue::new(
                attr::ERROR_TYPE,
                error_type.unwrap_or_else(|| OTHER_ERROR.to_owned()),
            ));
            batch_span.cx.span().set_status(Status::error(format!(
                "{failed} of {} messages failed",
                out.len()
            )));
        }
        batch_span.end();
        (out, failed)
    }

    /// Starts the span that forwards a failed message to a retry or dead-letter
    /// destination, and writes the forwarded message's headers.
    ///
    /// The span is a PRODUCER child of the failed process span, linking the
    /// message's original creation context (`mqtrace.link.relationship = original_message`) and
    /// the processing attempt (`mqtrace.link.relationship = processing_attempt`). The headers get
    /// a fresh trace context, the attempt counter, the original `traceparent`, and
    /// for dead letters the error type, a truncated error message and the time of
    /// failure. Copy the other headers and the body from the original unchanged,
    /// leaving out those for which [`Instrumenter::is_managed_header`] is true.
    pub fn start_forward(
        &self,
        processed: &Processed,
        kind: ForwardKind,
        destination: &MessageDescription,
        carrier: &mut dyn Injector,
    ) -> MessagingSpan {
        let mut links = Vec::with_capacity(2);
        if processed.original.is_valid() {
            links.push(Link::new(
                processed.original.clone(),
                vec![KeyValue::new(attr::RELATIONSHIP, "original_message")],
                0,
            ));
        }
        links.push(Link::new(
            processed.span.span_context(),
            vec![KeyValue::new(attr::RELATIONSHIP, "processing_attempt")],
            0,
        ));
        let mut d = destination.clone();
        d.operation = OperationType::Send;
        let span = self.start(
            &d,
            SpanKind::Producer,
            processed.span.context(),
            links,
            None,
            |attributes| {
                attributes.push(KeyValue::new(attr::ATTEMPT, i64::from(processed.attempt)));
                attributes.push(KeyValue::new(
                    attr::DISPOSITION,
                    match kind {
                        ForwardKind::Retry => Disposition::Retry.as_str(),
                        ForwardKind::DeadLetter => Disposition::DeadLetter.as_str(),
                    },
                ));
            },
            Some(Measured::Send(1)),
        );
        self.inject(&span, carrier);
        forward::write_headers(
            processed.attempt,
            &processed.original,
            processed.outcome.as_ref().err(),
            kind,
            carrier,
        );
        span
    }

    /// Whether forwarding rewrites this header (trace context and mqtrace's own),
    /// so it must not be copied from the failed message.
    pub fn is_managed_header(&self, key: &str) -> bool {
        forward::is_mqtrace_header(key)
            || self
                .propagation()
                .header_fields()
                .iter()
                .any(|f| f.eq_ignore_ascii_case(key))
    }
}

/// Runs a handler inside a process span and records its failure there.
async fn run_in<Fut>(span: &MessagingSpan, handler: Fut) -> HandlerResult
where
    Fut: Future<Output = HandlerResult>,
{
    let outcome = run_handler(handler, span.context().clone()).await;
    if let Err(error) = &outcome {
        span.record_error(error);
    }
    outcome
}

async fn run_handler<Fut>(handler: Fut, cx: Context) -> HandlerResult
where
    Fut: Future<Output = HandlerResult>,
{
    match AssertUnwindSafe(handler.with_context(cx))
        .catch_unwind()
        .await
    {
        Ok(outcome) => outcome,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "handler panicked".to_owned());
            Err(HandlerError::transient(message).with_type("panic"))
        }
    }
}
