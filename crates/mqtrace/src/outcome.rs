//! Handler outcomes: what failed, and whether it is worth retrying.
//!
//! One classification serves tracing (status, `error.type`, `mqtrace.error.retryable`)
//! and settlement (retry or dead-letter), so the span always says what happened to
//! the message.

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;

use opentelemetry::trace::{SpanRef, Status};
use opentelemetry::KeyValue;

use crate::conventions::attr;

/// Whether a failure is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Retryable {
    /// The same message may succeed later (timeout, dependency down). Unknown
    /// failures count as transient.
    Transient,
    /// Retrying cannot help (bad payload, validation failure).
    Permanent,
}

/// Decides whether an error is worth retrying. Implemented for closures, and for
/// `()`, which calls every error transient.
pub trait Classify<E: ?Sized>: Send + Sync {
    /// The verdict for one error.
    fn classify(&self, error: &E) -> Retryable;
}

impl<E: ?Sized> Classify<E> for () {
    fn classify(&self, _: &E) -> Retryable {
        Retryable::Transient
    }
}

impl<E: ?Sized, F> Classify<E> for F
where
    F: Fn(&E) -> Retryable + Send + Sync,
{
    fn classify(&self, error: &E) -> Retryable {
        self(error)
    }
}

type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// The error a message handler returns.
///
/// It carries the classification, a low-cardinality `error.type`, and the source
/// error. Any `std::error::Error` converts into a transient `HandlerError` with `?`,
/// because an unknown failure is worth retrying. Like `anyhow::Error`, it does not
/// implement `std::error::Error` itself (that would collide with the blanket `From`);
/// [`HandlerError::source_error`] gives the error inside.
pub struct HandlerError {
    retryable: Retryable,
    error_type: Cow<'static, str>,
    source: BoxError,
}

impl HandlerError {
    /// A failure that retrying cannot fix.
    pub fn permanent<E: Into<BoxError>>(error: E) -> Self {
        Self::new(Retryable::Permanent, type_label::<E>(), error.into())
    }

    /// A failure that may go away.
    pub fn transient<E: Into<BoxError>>(error: E) -> Self {
        Self::new(Retryable::Transient, type_label::<E>(), error.into())
    }

    /// A failure classified by `classifier`.
    pub fn classified<E>(error: E, classifier: &dyn Classify<E>) -> Self
    where
        E: StdError + Send + Sync + 'static,
    {
        let retryable = classifier.classify(&error);
        Self::new(retryable, type_label::<E>(), Box::new(error))
    }

    fn new(retryable: Retryable, error_type: String, source: BoxError) -> Self {
        Self {
            retryable,
            error_type: Cow::Owned(error_type),
            source,
        }
    }

    /// Replaces the `error.type` (keep it low-cardinality: a code, not a message).
    pub fn with_type(mut self, error_type: impl Into<Cow<'static, str>>) -> Self {
        self.error_type = error_type.into();
        self
    }

    /// Whether retrying may help.
    pub fn retryable(&self) -> Retryable {
        self.retryable
    }

    /// The `error.type` recorded on the span.
    pub fn error_type(&self) -> &str {
        &self.error_type
    }

    /// The underlying error.
    pub fn source_error(&self) -> &(dyn StdError + Send + Sync + 'static) {
        self.source.as_ref()
    }

    /// Records the failure on a span: an `exception` event, status Error with the
    /// message, `error.type` and `mqtrace.error.retryable`.
    pub fn record(&self, span: &SpanRef<'_>) {
        self.record_on(span, true);
    }

    /// [`HandlerError::record`], the `exception` event only when `event`.
    pub(crate) fn record_on(&self, span: &SpanRef<'_>, event: bool) {
        let message = self.source.to_string();
        if event {
            span.add_event(
                "exception",
                vec![
                    KeyValue::new(attr::EXCEPTION_TYPE, self.error_type.to_string()),
                    KeyValue::new(attr::EXCEPTION_MESSAGE, message.clone()),
                ],
            );
        }
        span.set_attribute(KeyValue::new(attr::ERROR_TYPE, self.error_type.to_string()));
        span.set_attribute(KeyValue::new(
            attr::ERROR_RETRYABLE,
            self.retryable == Retryable::Transient,
        ));
        span.set_status(Status::error(message));
    }
}

/// `error.type` default: the error's type name, short but unambiguous
/// (`ParseIntError`, `io::Error`, `serde_json::Error`); `_OTHER` for plain strings
/// and boxed errors, whose type says nothing.
fn type_label<E>() -> String {
    let full = std::any::type_name::<E>();
    let path = full.split('<').next().unwrap_or(full);
    let segments: Vec<&str> = path.split("::").collect();
    let last = segments.last().copied().unwrap_or(path);
    if matches!(last, "&str" | "str" | "String" | "Box" | "Cow") || last.starts_with('&') {
        return "_OTHER".to_owned();
    }
    if last == "Error" {
        if let Some(owner) = segments.iter().rev().skip(1).find(|s| **s != "error") {
            return format!("{owner}::Error");
        }
    }
    last.to_owned()
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("retryable", &self.retryable)
            .field("error_type", &self.error_type)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl<E> From<E> for HandlerError
where
    E: StdError + Send + Sync + 'static,
{
    fn from(error: E) -> Self {
        Self::transient(error)
    }
}

/// Classifies the error of any result whose error boxes (`std` errors,
/// `Box<dyn Error + Send + Sync>`, `anyhow::Error`, `eyre::Report`...), for `?` in
/// a handler. `?` alone already converts `std` errors as transient; a boxed error
/// cannot convert on its own (it is not a `std::error::Error`), so say what it is:
///
/// ```
/// use mqtrace::{HandlerResult, ResultExt as _};
///
/// fn load() -> Result<u32, Box<dyn std::error::Error + Send + Sync>> {
///     Err("connection reset".into())
/// }
///
/// fn handler() -> HandlerResult {
///     let _ = load().transient()?;
///     Ok(())
/// }
/// let error = handler().unwrap_err();
/// assert_eq!(error.error_type(), "_OTHER");
/// assert_eq!(error.to_string(), "connection reset");
/// ```
pub trait ResultExt<T> {
    /// A failure that may go away.
    fn transient(self) -> Result<T, HandlerError>;
    /// A failure that retrying cannot fix.
    fn permanent(self) -> Result<T, HandlerError>;
}

impl<T, E: Into<BoxError>> ResultExt<T> for Result<T, E> {
    fn transient(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::transient)
    }

    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::permanent)
    }
}

/// What a handler returns.
pub type HandlerResult = Result<(), HandlerError>;

/// Cuts a string to at most `max` bytes at a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_errors_are_transient_and_named_by_type() {
        fn parse() -> HandlerResult {
            let _: u32 = "x".parse()?;
            Ok(())
        }
        let err = parse()
            .err()
            .unwrap_or_else(|| HandlerError::permanent("unexpected"));
        assert_eq!(err.retryable(), Retryable::Transient);
        assert_eq!(err.error_type(), "ParseIntError");
    }

    #[test]
    fn string_errors_get_other_and_can_be_renamed() {
        let err = HandlerError::permanent("bad order");
        assert_eq!(err.retryable(), Retryable::Permanent);
        assert_eq!(err.error_type(), "_OTHER");
        assert_eq!(err.with_type("invalid_order").error_type(), "invalid_order");
    }

    #[test]
    fn boxed_errors_are_transient() {
        fn boxed() -> Result<(), BoxError> {
            Err("connection reset".into())
        }
        fn handler() -> HandlerResult {
            boxed().transient()?;
            Ok(())
        }
        let err = handler()
            .err()
            .unwrap_or_else(|| HandlerError::permanent("unexpected"));
        assert_eq!(err.retryable(), Retryable::Transient);
        assert_eq!(err.error_type(), "_OTHER");
        assert_eq!(err.to_string(), "connection reset");
    }

    #[test]
    fn io_errors_are_named_with_their_module() {
        let io = std::io::Error::other("disk");
        assert_eq!(HandlerError::from(io).error_type(), "io::Error");
    }

    #[test]
    fn classifier_closures_decide() {
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, "nope");
        let by_kind = |e: &std::io::Error| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                Retryable::Permanent
            } else {
                Retryable::Transient
            }
        };
        assert_eq!(
            HandlerError::classified(io, &by_kind).retryable(),
            Retryable::Permanent
        );
    }
}
