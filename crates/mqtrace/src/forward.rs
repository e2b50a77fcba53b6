//! Retry and dead-letter forwarding: one mechanism for every broker.
//!
//! After a handler fails, [`decide`] says what happens to the message; when it is
//! forwarded, [`crate::Instrumenter::start_forward`] makes the span and the headers
//! below, and the adapter publishes the original body unchanged and then settles
//! the failed delivery (publish first, so a crash in between duplicates, never
//! loses).
//!
//! | header | on | value |
//! |---|---|---|
//! | [`ATTEMPT_HEADER`] | retries and dead letters | attempts made so far (decimal) |
//! | [`ORIGINAL_TRACEPARENT_HEADER`] | retries and dead letters | W3C `traceparent` of the first publication |
//! | [`ERROR_TYPE_HEADER`] | dead letters | the last failure's `error.type` |
//! | [`ERROR_MESSAGE_HEADER`] | dead letters | the last failure's message, at most [`MAX_ERROR_MESSAGE_LEN`] bytes |
//! | [`FAILED_AT_HEADER`] | dead letters | time of the last failure, RFC 3339 UTC |

use std::str::FromStr;
use std::time::SystemTime;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::SpanContext;

use crate::outcome::{truncate, HandlerError, HandlerResult, Retryable};

/// Attempts made so far.
pub const ATTEMPT_HEADER: &str = "mqtrace-attempt";
/// `traceparent` of the message's first publication.
pub const ORIGINAL_TRACEPARENT_HEADER: &str = "mqtrace-original-traceparent";
/// `error.type` of the failure that dead-lettered the message.
pub const ERROR_TYPE_HEADER: &str = "mqtrace-error-type";
/// Message of the failure that dead-lettered the message (truncated).
pub const ERROR_MESSAGE_HEADER: &str = "mqtrace-error-message";
/// When the message was dead-lettered (RFC 3339, UTC).
pub const FAILED_AT_HEADER: &str = "mqtrace-failed-at";
/// Longest error message carried in [`ERROR_MESSAGE_HEADER`].
pub const MAX_ERROR_MESSAGE_LEN: usize = 512;
/// Highest attempt number believed from a header; larger values are treated as this.
const MAX_ATTEMPT: u32 = 10_000;

/// How many times a message is tried before it is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: u32,
}

impl Default for RetryPolicy {
    /// Three attempts.
    fn default() -> Self {
        Self { max_attempts: 3 }
    }
}

impl RetryPolicy {
    /// At most `max_attempts` deliveries (at least 1).
    pub fn attempts(max_attempts: u32) -> Self {
        Self {
            max_attempts: max_attempts.max(1),
        }
    }

    /// The budget.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }
}

/// What happens to a message after its handler ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Disposition {
    /// Success: acknowledge, commit or delete.
    Settle,
    /// Transient failure within the budget: try again.
    Retry,
    /// Permanent failure, or the budget is spent: to the dead-letter destination.
    DeadLetter,
    /// Permanent failure with no dead-letter destination: removed, and the span says
    /// so (`mqtrace.message.disposition = dropped`).
    Drop,
}

impl Disposition {
    /// The `mqtrace.message.disposition` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Settle => "settled",
            Self::Retry => "retried",
            Self::DeadLetter => "dead_lettered",
            Self::Drop => "dropped",
        }
    }
}

/// Where a failed message is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForwardKind {
    /// To a retry destination (or back to the source).
    Retry,
    /// To the dead-letter destination.
    DeadLetter,
}

/// The decision after attempt number `attempt` (1-based) ended with `outcome`.
pub fn decide(
    policy: &RetryPolicy,
    attempt: u32,
    outcome: &HandlerResult,
    has_dead_letter: bool,
) -> Disposition {
    let give_up = if has_dead_letter {
        Disposition::DeadLetter
    } else {
        Disposition::Drop
    };
    match outcome {
        Ok(()) => Disposition::Settle,
        Err(e) if e.retryable() == Retryable::Permanent => give_up,
        Err(_) if attempt < policy.max_attempts => Disposition::Retry,
        Err(_) => give_up,
    }
}

/// The attempt number of a delivery: one more than the attempts recorded in its
/// headers, or the broker's delivery count, whichever is larger. A malformed
/// counter counts as absent.
pub fn attempt_of(headers: &dyn Extractor, delivery_count: Option<u32>) -> u32 {
    let forwarded = headers
        .get(ATTEMPT_HEADER)
        .and_then(|v| v.trim().parse::<u32>().ok())
        .map(|n| n.min(MAX_ATTEMPT) + 1)
        .unwrap_or(1);
    forwarded.max(delivery_count.unwrap_or(1).min(MAX_ATTEMPT))
}

/// The original creation context carried by a forwarded message.
pub fn original_context(headers: &dyn Extractor) -> Option<SpanContext> {
    let traceparent = headers.get(ORIGINAL_TRACEPARENT_HEADER)?;
    crate::w3c::TraceContextFormat::parse(&OneHeader(traceparent))
}

struct OneHeader<'a>(&'a str);

impl Extractor for OneHeader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent" && self.0.len() <= 128).then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

fn traceparent(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

pub(crate) fn write_headers(
    attempt: u32,
    original: &SpanContext,
    error: Option<&HandlerError>,
    kind: ForwardKind,
    carrier: &mut dyn Injector,
) {
    carrier.set(ATTEMPT_HEADER, attempt.to_string());
    if original.is_valid() {
        carrier.set(ORIGINAL_TRACEPARENT_HEADER, traceparent(original));
    }
    if kind == ForwardKind::DeadLetter {
        if let Some(error) = error {
            carrier.set(ERROR_TYPE_HEADER, error.error_type().to_owned());
            let message = error.to_string();
            carrier.set(
                ERROR_MESSAGE_HEADER,
                truncate(&message, MAX_ERROR_MESSAGE_LEN).to_owned(),
            );
        }
        carrier.set(
            FAILED_AT_HEADER,
            humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        );
    }
}

pub(crate) fn is_mqtrace_header(key: &str) -> bool {
    [
        ATTEMPT_HEADER,
        ORIGINAL_TRACEPARENT_HEADER,
        ERROR_TYPE_HEADER,
        ERROR_MESSAGE_HEADER,
        FAILED_AT_HEADER,
    ]
    .iter()
    .any(|h| h.eq_ignore_ascii_case(key))
}

/// Parses a [`FAILED_AT_HEADER`] value.
pub fn parse_failed_at(value: &str) -> Option<SystemTime> {
    humantime::Timestamp::from_str(value).ok().map(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::HandlerError;
    use crate::propagation::SimpleCarrier;

    #[test]
    fn budget_and_classification() {
        let p = RetryPolicy::default();
        let transient: HandlerResult = Err(HandlerError::transient("down"));
        let permanent: HandlerResult = Err(HandlerError::permanent("bad"));
        assert_eq!(decide(&p, 1, &Ok(()), true), Disposition::Settle);
        assert_eq!(decide(&p, 1, &transient, true), Disposition::Retry);
        assert_eq!(decide(&p, 2, &transient, true), Disposition::Retry);
        assert_eq!(decide(&p, 3, &transient, true), Disposition::DeadLetter);
        assert_eq!(decide(&p, 3, &transient, false), Disposition::Drop);
        assert_eq!(decide(&p, 1, &permanent, true), Disposition::DeadLetter);
        assert_eq!(decide(&p, 1, &permanent, false), Disposition::Drop);
        assert_eq!(RetryPolicy::attempts(0).max_attempts(), 1);
    }

    #[test]
    fn attempt_counting_tolerates_bad_headers() {
        let mut h = SimpleCarrier::new();
        assert_eq!(attempt_of(&h, None), 1);
        assert_eq!(attempt_of(&h, Some(3)), 3);
        h.insert(ATTEMPT_HEADER.into(), "2".into());
        assert_eq!(attempt_of(&h, Some(1)), 3);
        h.insert(ATTEMPT_HEADER.into(), "two".into());
        assert_eq!(attempt_of(&h, None), 1);
        h.insert(ATTEMPT_HEADER.into(), u32::MAX.to_string());
        assert_eq!(attempt_of(&h, None), MAX_ATTEMPT + 1);
    }

    #[test]
    fn original_context_parses_only_valid_traceparents() {
        let mut h = SimpleCarrier::new();
        assert!(original_context(&h).is_none());
        h.insert(ORIGINAL_TRACEPARENT_HEADER.into(), "garbage".into());
        assert!(original_context(&h).is_none());
        h.insert(
            ORIGINAL_TRACEPARENT_HEADER.into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        );
        let sc = original_context(&h).map(|sc| traceparent(&sc));
        assert_eq!(
            sc.as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
    }
}
