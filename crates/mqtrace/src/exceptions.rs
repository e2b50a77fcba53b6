//! Where failures are recorded besides span status and `error.type`, which every
//! setting keeps on the span.
//!
//! | conventions | `exception` span event | `messaging.{operation}.exception` log record |
//! |---|---|---|
//! | [`Conventions::Legacy`] | yes | no |
//! | v1.45, v1.44 | no (deprecated) | yes, when a logger provider is given |
//! | dup | yes | yes, when a logger provider is given |
//!
//! `OTEL_SEMCONV_EXCEPTION_SIGNAL_OPT_IN=logs/dup` adds the span events back under
//! v1.45 and v1.44. The log record carries `exception.type` and
//! `exception.message`, the failed span's trace context, event name
//! `messaging.process.exception` at severity ERROR for processing and
//! `messaging.{create,send,receive,settle}.exception` at WARN for the rest.

use std::fmt;

use opentelemetry::logs::{LogRecord as _, Logger, LoggerProvider, Severity};
use opentelemetry::trace::SpanContext;

use crate::conventions::{attr, Conventions};
use crate::describe::OperationType;

/// A logger of any provider, behind one object.
pub(crate) trait ExceptionLogger: Send + Sync {
    fn emit(&self, operation: OperationType, error_type: &str, message: &str, span: &SpanContext);
}

struct ProviderLogger<L>(L);

impl<L> ExceptionLogger for ProviderLogger<L>
where
    L: Logger + Send + Sync,
{
    fn emit(&self, operation: OperationType, error_type: &str, message: &str, span: &SpanContext) {
        let (name, severity) = event(operation);
        let mut record = self.0.create_log_record();
        record.set_event_name(name);
        record.set_severity_number(severity);
        record.set_severity_text(severity.name());
        record.set_timestamp(std::time::SystemTime::now());
        record.add_attribute(attr::EXCEPTION_TYPE, error_type.to_owned());
        record.add_attribute(attr::EXCEPTION_MESSAGE, message.to_owned());
        if span.is_valid() {
            record.set_trace_context(span.trace_id(), span.span_id(), Some(span.trace_flags()));
        }
        self.0.emit(record);
    }
}

/// The event name and severity of a failed operation's exception record.
fn event(operation: OperationType) -> (&'static str, Severity) {
    match operation {
        OperationType::Process => ("messaging.process.exception", Severity::Error),
        OperationType::Create => ("messaging.create.exception", Severity::Warn),
        OperationType::Send => ("messaging.send.exception", Severity::Warn),
        OperationType::Receive => ("messaging.receive.exception", Severity::Warn),
        OperationType::Settle => ("messaging.settle.exception", Severity::Warn),
    }
}

/// An instrumenter's exception signals.
pub(crate) struct ExceptionSignals {
    span_events: bool,
    logger: Option<Box<dyn ExceptionLogger>>,
}

impl fmt::Debug for ExceptionSignals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExceptionSignals")
            .field("span_events", &self.span_events)
            .field("logs", &self.logger.is_some())
            .finish()
    }
}

/// `OTEL_SEMCONV_EXCEPTION_SIGNAL_OPT_IN`, as values for [`ExceptionSignals::new`].
pub(crate) fn dup_from_env() -> bool {
    std::env::var("OTEL_SEMCONV_EXCEPTION_SIGNAL_OPT_IN")
        .is_ok_and(|v| v.split(',').any(|p| p.trim() == "logs/dup"))
}

/// The logger of `provider`, with mqtrace's scope.
pub(crate) fn logger_of<P>(provider: &P) -> Box<dyn ExceptionLogger>
where
    P: LoggerProvider,
    P::Logger: Send + Sync + 'static,
{
    Box::new(ProviderLogger(
        provider.logger_with_scope(crate::instrument::instrumentation_scope()),
    ))
}

impl ExceptionSignals {
    pub(crate) fn new(
        conventions: Conventions,
        logger: Option<Box<dyn ExceptionLogger>>,
        dup: bool,
    ) -> Self {
        Self {
            span_events: matches!(conventions, Conventions::Legacy | Conventions::Dup) || dup,
            // v1.24 had no exception log records.
            logger: logger.filter(|_| conventions != Conventions::Legacy),
        }
    }

    pub(crate) fn span_events(&self) -> bool {
        self.span_events
    }

    pub(crate) fn log(
        &self,
        operation: OperationType,
        error_type: &str,
        message: &str,
        span: &SpanContext,
    ) {
        if let Some(logger) = &self.logger {
            logger.emit(operation, error_type, message, span);
        }
    }
}
