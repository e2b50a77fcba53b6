//! The delivery lifecycle after the handler: decide, forward, settle, record, count.
//!
//! Every consumer mqtrace offers, and every loop a user writes around
//! [`Instrumenter::process`], ends a delivery through [`Instrumenter::settle`]. It
//! runs the same steps for every broker:
//!
//! 1. **decide**: the [`Disposition`] by the retry budget and the handler's outcome
//!    ([`crate::forward::decide`]), with the broker's [`Routes`];
//! 2. **forward**: a retry or dead letter goes out under a `send` span (PRODUCER,
//!    child of the process span, linking the original message and the attempt) with
//!    mqtrace's headers, through [`Settler::forward`];
//! 3. **settle**: the [`Settlement`] the decision calls for, inside an optional
//!    settle span (CLIENT, `ack` / `nack` / `commit` / `delete`), through
//!    [`Settler::settle`];
//! 4. **record**: the disposition on the process span, which ends;
//! 5. **count**: the [`Settled`] result, which [`ConsumerCounters`] adds up.
//!
//! An adapter only says how its broker does each operation and what it does on its
//! own (a RabbitMQ dead-letter exchange, SQS's redrive policy); it never rewrites the
//! decision. The rules, the same for every broker:
//!
//! | disposition | routes | settlement | counted as |
//! |---|---|---|---|
//! | settle | — | [`Settlement::Ack`] | settled |
//! | retry | [`RetryRoute::Forward`] | forward, then `Ack`; forward failed: [`Settlement::Redeliver`] | retried (+ redelivered) |
//! | retry | [`RetryRoute::Broker`] | [`Settlement::Leave`]: the broker hands it out again | retried |
//! | dead letter, permanent failure, [`Routes::broker_dead_letter`] | — | [`Settlement::Reject`]: the broker's dead-lettering takes it | dead-lettered |
//! | dead letter | a dead-letter target | forward, then `Ack`; forward failed: `Reject` with a broker dead letter, else `Redeliver` | dead-lettered (or retried + redelivered) |
//! | drop, transient failure (or any, with [`Routes::leave_undeliverable`]), [`RetryRoute::Broker`] | — | `Leave`: the broker's redrive policy decides | retried |
//! | drop | — | `Reject`: removed, `dropped` on the span | dropped |
//!
//! A forward is accepted by the broker before the delivery is settled, so a crash
//! in between duplicates a message but never loses it.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use opentelemetry::propagation::Injector;

use crate::describe::{MessageDescription, OperationType};
use crate::forward::{Disposition, ForwardKind};
use crate::instrument::{Instrumenter, MessagingSpan, Processed};

/// What happens to a delivery at the broker once the core has decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Settlement {
    /// Done with it: ack, commit, delete.
    Ack,
    /// Hand it out again now: nack with requeue, seek back. Used when a forward
    /// failed, so the message is tried again rather than lost.
    Redeliver,
    /// Remove it without a copy of mqtrace's: nack without requeue (the queue's
    /// dead-letter exchange takes it, if any), or commit / delete where the broker
    /// has no such thing.
    Reject,
    /// Leave it alone: the broker hands it out again by itself (SQS's visibility
    /// timeout, then its redrive policy). No call is made.
    Leave,
}

impl Settlement {
    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ack => "ack",
            Self::Redeliver => "redeliver",
            Self::Reject => "reject",
            Self::Leave => "leave",
        }
    }
}

/// Where retries go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryRoute<'a> {
    /// Forwarded to this destination (often the source itself) with the attempt
    /// counter, then the delivery is acknowledged.
    Forward(&'a str),
    /// The broker redelivers by itself (SQS: after the visibility timeout): the
    /// delivery is left alone, and a spent budget with no dead-letter target is
    /// left to the broker's own redrive policy.
    Broker,
}

/// The destinations of one delivery's failures, as its broker and consumer have
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Routes<'a> {
    /// Where retries go.
    pub retry: RetryRoute<'a>,
    /// Where mqtrace forwards dead letters (with its failure metadata), if anywhere.
    pub dead_letter: Option<&'a str>,
    /// Rejecting the delivery moves it to a dead-letter destination of the
    /// broker's own (a RabbitMQ queue's dead-letter exchange). Permanent failures
    /// then go that way, without a copy. A dead letter whose forward failed is
    /// handed back instead ([`Settlement::Redeliver`]): the destination that
    /// refused the copy would lose the original as well.
    pub broker_dead_letter: bool,
    /// With [`RetryRoute::Broker`] and no dead-letter target, a permanent failure
    /// is left to the broker too (its redrive policy decides) instead of removed:
    /// what a Lambda partial batch response does with every failure.
    pub leave_undeliverable: bool,
}

impl<'a> Routes<'a> {
    /// Retries forwarded to `retry`; no dead-letter destination.
    pub fn forward_retries(retry: &'a str) -> Self {
        Self {
            retry: RetryRoute::Forward(retry),
            dead_letter: None,
            broker_dead_letter: false,
            leave_undeliverable: false,
        }
    }

    /// Retries left to the broker's redelivery; no dead-letter destination.
    pub fn broker_retries() -> Self {
        Self {
            retry: RetryRoute::Broker,
            dead_letter: None,
            broker_dead_letter: false,
            leave_undeliverable: false,
        }
    }

    /// Dead letters forwarded to `target`.
    pub fn dead_letter(mut self, target: Option<&'a str>) -> Self {
        self.dead_letter = target;
        self
    }

    /// Whether rejecting moves the delivery to a dead-letter destination of the
    /// broker's own.
    pub fn broker_dead_letter(mut self, on: bool) -> Self {
        self.broker_dead_letter = on;
        self
    }

    /// Whether failures with nowhere to go are left to the broker (see
    /// [`Routes::leave_undeliverable`]).
    pub fn leave_undeliverable(mut self, on: bool) -> Self {
        self.leave_undeliverable = on;
        self
    }

    fn has_dead_letter(&self) -> bool {
        self.dead_letter.is_some() || self.broker_dead_letter
    }
}

/// The headers of a forwarded message that mqtrace writes: a fresh trace context,
/// the attempt counter, the original `traceparent`, and for dead letters the
/// failure metadata. In the order written; a key set twice keeps its last value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardHeaders(Vec<(String, String)>);

impl ForwardHeaders {
    /// The entries, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Removes and returns the entry under `key` (compared without regard to case).
    pub fn remove(&mut self, key: &str) -> Option<String> {
        let at = self
            .0
            .iter()
            .position(|(k, _)| k.eq_ignore_ascii_case(key))?;
        Some(self.0.remove(at).1)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Injector for ForwardHeaders {
    fn set(&mut self, key: &str, value: String) {
        match self.0.iter_mut().find(|(k, _)| k.eq_ignore_ascii_case(key)) {
            Some(entry) => entry.1 = value,
            None => self.0.push((key.to_owned(), value)),
        }
    }
}

impl IntoIterator for ForwardHeaders {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// One forward for the adapter to publish: where, and the headers to add.
#[derive(Debug)]
pub struct Forward<'a> {
    /// Retry or dead letter.
    pub kind: ForwardKind,
    /// The destination, as the [`Routes`] named it.
    pub target: &'a str,
    /// mqtrace's headers: add them to the original headers less those for which
    /// [`Forward::replaces`] is true.
    pub headers: ForwardHeaders,
    /// The forward span: record the broker's answer on it (message id, partition
    /// and offset; or the failure with [`MessagingSpan::record_failure`]). The core
    /// ends it.
    pub span: &'a MessagingSpan,
    instrumenter: &'a Instrumenter,
}

impl Forward<'_> {
    /// Whether an original header is rewritten by the forward (trace context and
    /// mqtrace's own), so it must not be copied.
    pub fn replaces(&self, key: &str) -> bool {
        self.instrumenter.is_managed_header(key)
    }

    /// Whether a header mqtrace writes belongs to the trace context (rather than
    /// its own metadata): what an adapter with a header budget keeps whole.
    pub fn is_trace_context(&self, key: &str) -> bool {
        self.instrumenter
            .propagation()
            .header_fields()
            .iter()
            .any(|f| f.eq_ignore_ascii_case(key))
    }
}

/// A broker's operations on one delivery, for [`Instrumenter::settle`]. Adapters
/// implement it; the core calls it.
pub trait Settler {
    /// The broker client's error.
    type Error: std::error::Error + 'static;

    /// Where this delivery's retries and dead letters go.
    fn routes(&self) -> Routes<'_>;

    /// Describes a forward of this delivery to `target`, for the forward span.
    fn describe_forward(&self, kind: ForwardKind, target: &str) -> MessageDescription;

    /// Publishes the delivery's body, byte for byte, to `forward.target` with its
    /// headers (less those [`Forward::replaces`]) and `forward.headers`; true once
    /// the broker has accepted it. Record the broker's answer on `forward.span`.
    fn forward(&self, forward: Forward<'_>) -> impl Future<Output = bool> + Send;

    /// The settle span's operation name for a settlement (`ack`, `nack`,
    /// `commit`, `delete`), or `None` where it makes no call.
    fn settle_name(&self, settlement: Settlement) -> Option<&'static str>;

    /// Carries out a settlement ([`Settlement::Leave`] is never passed).
    fn settle(self, settlement: Settlement)
        -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// `error.type` for a failed settlement.
    fn error_type(error: &Self::Error) -> String;
}

/// What [`Instrumenter::settle`] did with one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settled {
    /// What happened to the message, as recorded on its span.
    pub disposition: Disposition,
    /// The settlement made at the broker.
    pub settlement: Settlement,
    /// A forward failed, so the message was handed back for another try.
    pub redelivered: bool,
    /// The settlement call failed (the broker hands the message out again).
    pub settle_failed: bool,
}

impl Settled {
    /// Whether the delivery's position may be committed past (Kafka): it was
    /// settled, not handed back. A settlement call that failed still counts: a
    /// later commit covers it.
    pub fn is_done(&self) -> bool {
        self.settlement != Settlement::Redeliver
    }
}

/// What a consumer did with the messages it processed, counted over its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ConsumerStats {
    /// Handled successfully and settled.
    pub settled: u64,
    /// Tried again: forwarded for another attempt, left to the broker's
    /// redelivery, or handed back after a failed forward.
    pub retried: u64,
    /// Sent to a dead-letter destination.
    pub dead_lettered: u64,
    /// Permanent failures removed because there is no dead-letter destination.
    pub dropped: u64,
    /// Handed back to the broker because forwarding failed (requeued, sought back):
    /// processed again, never lost. Counted in `retried` too.
    pub redelivered: u64,
    /// Settlements (acks, commits, deletes) that failed, at once or as reported by
    /// the broker later: those messages are handed out again, never skipped.
    pub settle_failures: u64,
    /// Receive requests that failed (retried after a pause).
    pub receive_failures: u64,
    /// Connections established (1 plus reconnections), where the consumer owns
    /// its connection.
    pub connections: u64,
}

/// [`ConsumerStats`] shared by concurrent tasks. Cheap to clone; clones count
/// together.
#[derive(Debug, Clone, Default)]
pub struct ConsumerCounters(Arc<[AtomicU64; 8]>);

impl ConsumerCounters {
    /// Counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&self, i: usize, n: u64) {
        self.0[i].fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one delivery's end.
    pub fn record(&self, settled: &Settled) {
        self.add(
            match settled.disposition {
                Disposition::Settle => 0,
                Disposition::Retry => 1,
                Disposition::DeadLetter => 2,
                Disposition::Drop => 3,
            },
            1,
        );
        if settled.redelivered {
            self.add(4, 1);
        }
        if settled.settle_failed {
            self.add(5, 1);
        }
    }

    /// Counts settlements that the broker reported failed after the call returned
    /// (Kafka's asynchronous commits).
    pub fn settle_failures(&self, n: u64) {
        self.add(5, n);
    }

    /// Counts a failed receive request.
    pub fn receive_failure(&self) {
        self.add(6, 1);
    }

    /// Counts an established connection.
    pub fn connection(&self) {
        self.add(7, 1);
    }

    /// The counts so far.
    pub fn snapshot(&self) -> ConsumerStats {
        let n = |i: usize| self.0[i].load(Ordering::Relaxed);
        ConsumerStats {
            settled: n(0),
            retried: n(1),
            dead_lettered: n(2),
            dropped: n(3),
            redelivered: n(4),
            settle_failures: n(5),
            receive_failures: n(6),
            connections: n(7),
        }
    }
}

// === impl Instrumenter ===

impl Instrumenter {
    /// Ends one delivery after its handler: decides by the retry budget and the
    /// broker's routes, forwards a retry or dead letter under a forward span,
    /// settles through `settler` (inside a settle span when
    /// [`crate::InstrumenterBuilder::settle_spans`] is on), records the disposition
    /// on the process span and ends it. See the [module docs](crate::settle) for
    /// the rules.
    pub async fn settle<S: Settler>(&self, processed: Processed, settler: S) -> Settled {
        let routes = settler.routes();
        let permanent = processed.is_permanent_failure();
        let decided = processed.disposition(self.retry_policy(), routes.has_dead_letter());
        let (mut disposition, mut redelivered) = (decided, false);
        let settlement = match decided {
            Disposition::Settle => Settlement::Ack,
            Disposition::Retry => match routes.retry {
                RetryRoute::Forward(target) => {
                    if self
                        .forward(&processed, &settler, ForwardKind::Retry, target)
                        .await
                    {
                        Settlement::Ack
                    } else {
                        redelivered = true;
                        Settlement::Redeliver
                    }
                }
                RetryRoute::Broker => Settlement::Leave,
            },
            Disposition::DeadLetter if permanent && routes.broker_dead_letter => Settlement::Reject,
            Disposition::DeadLetter => match routes.dead_letter {
                Some(target) => {
                    if self
                        .forward(&processed, &settler, ForwardKind::DeadLetter, target)
                        .await
                    {
                        Settlement::Ack
                    } else {
                        // Never rejected into a broker dead letter instead: the
                        // destination that refused the copy (unroutable, gone)
                        // would drop the original too.
                        redelivered = true;
                        Settlement::Redeliver
                    }
                }
                None => Settlement::Reject,
            },
            Disposition::Drop
                if routes.retry == RetryRoute::Broker
                    && (!permanent || routes.leave_undeliverable) =>
            {
                disposition = Disposition::Retry;
                Settlement::Leave
            }
            Disposition::Drop => Settlement::Reject,
        };
        if redelivered {
            disposition = Disposition::Retry;
        }
        let mut settle_failed = false;
        // The settle call's end is the process span's too: one clock reading.
        let mut ended = None;
        if settlement != Settlement::Leave {
            let name = settler.settle_name(settlement);
            // Timed only when measured (metrics on); the settle span, when there
            // is one, starts at the same reading.
            let timed = processed.span().stream().is_some();
            let started = timed.then(std::time::SystemTime::now);
            let span = match name {
                Some(name) if self.settle_spans_on() => {
                    let d = processed
                        .description()
                        .for_operation(OperationType::Settle, Some(name));
                    Some(self.settle_span_at(&d, processed.span(), started))
                }
                _ => None,
            };
            let result = settler.settle(settlement).await;
            ended = started.map(|_| std::time::SystemTime::now());
            let seconds = match (started, ended) {
                (Some(s), Some(e)) => crate::metrics::seconds_between(s, e),
                _ => 0.0,
            };
            let error_type = result.as_ref().err().map(|e| S::error_type(e));
            if let Err(error) = &result {
                settle_failed = true;
                tracing::warn!(target: "mqtrace", error = %error, settlement = settlement.as_str(), "settlement failed; the broker hands the message out again");
                if let Some(span) = &span {
                    span.record_failure(error_type.as_deref().unwrap_or("_OTHER"), error);
                }
            }
            if let (Some(name), Some(stream)) = (name, processed.span().stream()) {
                self.metrics()
                    .settled(stream, name, seconds, error_type.as_deref());
            }
            if let Some(span) = span {
                span.end_measured_at(ended);
            }
        }
        let _ = processed.finish_at(disposition, ended);
        Settled {
            disposition,
            settlement,
            redelivered,
            settle_failed,
        }
    }

    async fn forward<S: Settler>(
        &self,
        processed: &Processed,
        settler: &S,
        kind: ForwardKind,
        target: &str,
    ) -> bool {
        let d = settler.describe_forward(kind, target);
        let mut headers = ForwardHeaders::default();
        let span = self.start_forward(processed, kind, &d, &mut headers);
        let accepted = settler
            .forward(Forward {
                kind,
                target,
                headers,
                span: &span,
                instrumenter: self,
            })
            .await;
        if !accepted {
            tracing::warn!(target: "mqtrace", target, kind = ?kind, "forward failed; the message is kept for another try");
        }
        span.end();
        accepted
    }
}
