//! OpenTelemetry traces for SQS-triggered AWS Lambda functions on
//! [lambda_runtime]: each invocation is a SERVER span, each batch a CONSUMER span
//! linking every record's producer, and each record a CONSUMER span of its own in
//! which the handler runs. Failed records go into the partial batch response
//! (`batchItemFailures`) and their spans are errors. Spans are flushed before the
//! invocation returns, so a frozen or recycled execution environment loses none.
//!
//! # Span model
//!
//! | span | name | kind | parent | links | attributes |
//! |---|---|---|---|---|---|
//! | invocation | the function's name | SERVER | current context | — | `faas.trigger = pubsub`, `faas.invocation.id` (`faas.invocation_id` before v1.45), `faas.coldstart`, `cloud.provider = aws`, `cloud.region`, `cloud.account.id`, `cloud.resource_id` |
//! | batch | `{queue} process`, or `multiple_sources process` | CONSUMER | invocation | every record's producer, with its message id | `messaging.system.name = aws.sqs`, `messaging.operation.type = process`, `messaging.batch.message_count`, `faas.trigger`, successes and failures; the queue when there is one |
//! | record | `process {queue}` (the conventions' name) | CONSUMER | batch | the record's producer | message id, body size, receive count, queue time (`SentTimestamp`), attempt, `faas.trigger` |
//!
//! A record's producer context is read from its `messageAttributes` in the
//! instrumenter's formats first (W3C by default), then, with
//! [`TracedSqsHandler::sns_envelopes`], from the `MessageAttributes` of an SNS
//! notification in its body (SNS to SQS without raw delivery), then from the
//! `AWSTraceHeader` system attribute (X-Ray), which is what AWS itself propagates. Handler spans,
//! made with the OpenTelemetry API or with `tracing` through
//! `tracing-opentelemetry`, are children of the record span.
//!
//! # Partial batch responses need `ReportBatchItemFailures`
//!
//! The response lists the failed records (`batchItemFailures`) so that Lambda
//! deletes only the others. Lambda reads it only when the event source mapping
//! has `ReportBatchItemFailures` in its `FunctionResponseTypes`; without it, any
//! response counts as success and the whole batch is deleted, failed records
//! included. The handler cannot see the mapping: for a mapping without it, set
//! [`TracedSqsHandler::partial_batch_responses`]`(false)`, and a failure fails
//! the whole invocation instead ([`BatchFailed`]), so Lambda retries the batch.
//!
//! FIFO queues: once a record fails, the later records of its message group are
//! not processed; they are reported with it, and the group keeps its order. A
//! record held back this way is never dead-lettered by mqtrace, whatever its
//! receive count: it was not handled.
//!
//! # The invocation's deadline
//!
//! No record is started once the invocation's deadline is nearer than
//! [`TracedSqsHandler::deadline_margin`] (1 s by default, at most a quarter of the
//! invocation's time): the records left are reported as failures, for SQS to
//! hand out again, and the flush before returning is bounded by the time left.
//! An invocation that Lambda stops at its timeout fails its whole batch and
//! loses its spans; one that returns in time loses neither.
//!
//! Permanent failures go back to SQS like transient ones unless a dead-letter
//! queue is set ([`TracedSqsHandler::dead_letter_queue`]): then they are sent there
//! with mqtrace's failure metadata and leave the batch.
//!
//! # Composing with lambda_runtime
//!
//! [`TracedSqsLayer`] wraps a per-record `tower` service into a service of whole
//! events, so the handler composes with lambda_runtime's own layers. When
//! lambda_runtime's OpenTelemetry layer already makes the invocation span, set
//! [`TracedSqsHandler::invocation_span`]`(false)`.
//!
//! # Your own loop over the records
//!
//! [`TracedSqsHandler::process_record`] runs a handler inside one record's span and
//! [`TracedSqsHandler::settle_record`] ends it through the same lifecycle, saying
//! whether the record goes into `batchItemFailures`; call
//! [`TracedSqsHandler::flush`] before returning.
//!
//! # Examples
//!
//! ```no_run
//! use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
//! use lambda_runtime::{service_fn, Error, LambdaEvent};
//! use mqtrace::{HandlerError, HandlerResult, Instrumenter};
//! use mqtrace_aws_lambda::TracedSqsHandler;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Error> {
//!     let telemetry = mqtrace_telemetry::init()?;
//!     let instrumenter = Instrumenter::default();
//!     let traced = TracedSqsHandler::new(&instrumenter, telemetry.flusher());
//!     lambda_runtime::run(service_fn(|event: LambdaEvent<SqsEvent>| {
//!         let traced = traced.clone();
//!         async move {
//!             let response: SqsBatchResponse = traced
//!                 .handle(event, |record| {
//!                     let body = record.body.clone().unwrap_or_default();
//!                     async move {
//!                         let order: serde_json::Value = serde_json::from_str(&body)
//!                             .map_err(|e| HandlerError::permanent(e))?;
//!                         tracing::info!(%order, "billing");
//!                         HandlerResult::Ok(())
//!                     }
//!                 })
//!                 .await?;
//!             Ok::<_, Error>(response)
//!         }
//!     }))
//!     .await
//! }
//! ```
//!
//! [lambda_runtime]: https://docs.rs/lambda_runtime

#![forbid(unsafe_code)]

mod layer;

pub use layer::{TracedSqsLayer, TracedSqsService};

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lambda_events::event::sqs::{
    BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage, SqsMessageAttribute,
};
use lambda_runtime::LambdaEvent;
use mqtrace::propagation::{lookup, WithTraceHeader};
use mqtrace::settle::{Forward, Routes, Settlement, Settler};
use mqtrace::{
    Attempt, ForwardKind, HandlerError, HandlerResult, Inbound, Instrumenter, MessageDescription,
    MessagingSystem, OperationType, Processed,
};
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::{FutureExt as _, SpanBuilder, SpanKind, Status, TraceContextExt as _};
use opentelemetry::{Context, KeyValue};

/// `faas.trigger`.
pub const FAAS_TRIGGER: &str = "faas.trigger";

/// Wraps SQS batch handlers of one function. Cheap to clone.
#[derive(Clone)]
pub struct TracedSqsHandler {
    flush: Arc<dyn Fn() + Send + Sync>,
    instrumenter: Instrumenter,
    cold: Arc<AtomicBool>,
    partial: bool,
    sns: bool,
    invocation_span: bool,
    dead_letter: Option<Arc<DeadLetter>>,
    concurrency: usize,
    deadline_margin: Duration,
}

/// `error.type` of a FIFO record not handed to the handler because an earlier
/// record of its message group failed in the same invocation: the SQS
/// consumer's, the same rule.
pub use mqtrace_aws_sqs::FIFO_GROUP_BLOCKED_ERROR;

/// `error.type` of a record not started because the invocation's deadline was
/// near ([`TracedSqsHandler::deadline_margin`]).
pub const DEADLINE_NEAR_ERROR: &str = "deadline_near";

/// The default of [`TracedSqsHandler::deadline_margin`].
pub const DEFAULT_DEADLINE_MARGIN: Duration = Duration::from_secs(1);

/// Time kept back from the flush before returning, for the response to reach
/// the runtime.
const RETURN_SLACK: Duration = Duration::from_millis(50);

/// Where permanent failures go, and the client that sends them.
#[derive(Debug)]
struct DeadLetter {
    tracer: mqtrace_aws_sqs::MessageTracer,
    queue_url: String,
}

/// `error.type` of an invocation that failed as a whole
/// (`partial_batch_responses(false)` and a failed record).
pub const BATCH_FAILED_ERROR: &str = "batch_failed";

/// The whole batch failed, on purpose: partial batch responses are off
/// ([`TracedSqsHandler::partial_batch_responses`]) and a record failed, so the
/// invocation fails and Lambda hands the whole batch out again. Return it as the
/// handler's error.
#[derive(Debug, thiserror::Error)]
#[error("{failed} of {total} records failed; the batch is failed whole so that Lambda retries it (partial batch responses are off)")]
#[non_exhaustive]
pub struct BatchFailed {
    /// Records that failed (or were not processed, behind a failed one of their
    /// FIFO message group).
    pub failed: usize,
    /// Records in the batch.
    pub total: usize,
}

impl std::fmt::Debug for TracedSqsHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TracedSqsHandler")
            .field("instrumenter", &self.instrumenter)
            .finish_non_exhaustive()
    }
}

impl TracedSqsHandler {
    /// Spans follow `instrumenter`'s settings (and go to its provider), with
    /// X-Ray added as the last format to read. `flush` exports what is pending; it
    /// runs on tokio's blocking pool before each invocation returns, so a frozen
    /// execution environment loses nothing
    /// (`mqtrace_telemetry::TelemetryGuard::flusher`, or a closure calling the
    /// provider's `force_flush`).
    pub fn new(instrumenter: &Instrumenter, flush: impl Fn() + Send + Sync + 'static) -> Self {
        let propagation = instrumenter.propagation().with_xray_fallback();
        Self {
            flush: Arc::new(flush),
            instrumenter: instrumenter.with_propagation(propagation),
            cold: Arc::new(AtomicBool::new(true)),
            partial: true,
            sns: false,
            invocation_span: true,
            dead_letter: None,
            concurrency: 1,
            deadline_margin: DEFAULT_DEADLINE_MARGIN,
        }
    }

    /// Whether failures are reported record by record in `batchItemFailures`
    /// (default: on). That works only when the event source mapping has
    /// `ReportBatchItemFailures` in its `FunctionResponseTypes`: without it Lambda
    /// reads any response as success and deletes the whole batch, failed records
    /// included. The handler cannot see the mapping's setting; for a mapping
    /// without it, turn this off: any failure then fails the whole invocation
    /// ([`BatchFailed`]), Lambda retries the batch, and nothing is lost.
    pub fn partial_batch_responses(mut self, on: bool) -> Self {
        self.partial = on;
        self
    }

    /// Whether records may be SNS notifications delivered to SQS without raw
    /// message delivery (default: off). Their body is the SNS envelope, and the
    /// producer's context sits in the envelope's `MessageAttributes`; when on, a
    /// context missing from the record's own message attributes is read from
    /// there (before `AWSTraceHeader`). A body that is not an SNS notification is
    /// read as it is.
    pub fn sns_envelopes(mut self, on: bool) -> Self {
        self.sns = on;
        self
    }

    /// Permanent failures (and records whose retry budget is spent, by their
    /// receive count) are sent to this queue through `client`, with the same
    /// metadata as every mqtrace dead letter (`mqtrace-error-type`,
    /// `mqtrace-error-message`, `mqtrace-failed-at`, `mqtrace-attempt`,
    /// `mqtrace-original-traceparent`, within SQS's limits) and the original
    /// body; once SQS has accepted the copy, the record counts as done and Lambda
    /// deletes it. Without one (the default), every failure is reported in
    /// `batchItemFailures` and the queue's redrive policy decides.
    pub fn dead_letter_queue(
        mut self,
        client: aws_sdk_sqs::Client,
        queue_url: impl Into<String>,
    ) -> Self {
        let queue_url = queue_url.into();
        self.dead_letter = Some(Arc::new(DeadLetter {
            tracer: mqtrace_aws_sqs::MessageTracer::new(client, &queue_url, &self.instrumenter),
            queue_url,
        }));
        self
    }

    /// Records of a standard queue handled at once (default 1: one after
    /// another). Each runs in its own record span's context. FIFO batches are
    /// always handled in order, whatever this says.
    pub fn concurrency(mut self, records: usize) -> Self {
        self.concurrency = records.max(1);
        self
    }

    /// How long before the invocation's deadline no record is started any more
    /// (default [`DEFAULT_DEADLINE_MARGIN`], 1 s; at most a quarter of the time
    /// the invocation had when it began, so that a short timeout still handles
    /// records). A record not started is reported in `batchItemFailures` (its
    /// span says `error.type = deadline_near`), never dead-lettered, and SQS
    /// hands it out again; the time kept back lets the spans be flushed and the
    /// response returned before Lambda stops the invocation, which would fail
    /// the whole batch and lose its spans. The flush before returning is bounded
    /// by the time left. An invocation without a deadline (a context made by
    /// hand, deadline 0), or whose deadline had already passed when it began (a
    /// local emulator's, such as cargo-lambda's), starts every record and
    /// flushes without a bound. With
    /// [`TracedSqsHandler::partial_batch_responses`] off, a record not started
    /// fails the invocation ([`BatchFailed`]) like any failure.
    pub fn deadline_margin(mut self, margin: Duration) -> Self {
        self.deadline_margin = margin;
        self
    }

    /// The deadline of an invocation that began at `now`, from the context's
    /// `deadline_ms` (milliseconds since the epoch; 0: none). A deadline
    /// already past when the invocation starts is not one it can keep
    /// (cargo-lambda's emulator sends `Lambda-Runtime-Deadline-Ms: 600000`, ten
    /// minutes as a duration, which reads as a time in 1970): the invocation
    /// runs, and flushes, as without a deadline.
    fn deadline(deadline_ms: u64, now: SystemTime) -> Option<SystemTime> {
        if deadline_ms == 0 {
            return None;
        }
        UNIX_EPOCH
            .checked_add(Duration::from_millis(deadline_ms))
            .filter(|d| *d > now)
    }

    /// When records stop being started in an invocation that began at `now`
    /// with `deadline` ([`TracedSqsHandler::deadline`]).
    fn cutoff(&self, deadline: Option<SystemTime>, now: SystemTime) -> Option<SystemTime> {
        let deadline = deadline?;
        let left = deadline.duration_since(now).unwrap_or_default();
        deadline.checked_sub(self.deadline_margin.min(left / 4))
    }

    /// Whether mqtrace makes the invocation's SERVER span (default: on). Turn it
    /// off when lambda_runtime's own OpenTelemetry layer already makes one: the
    /// batch span is then a child of the current context, that layer's span.
    pub fn invocation_span(mut self, on: bool) -> Self {
        self.invocation_span = on;
        self
    }

    fn record<'a>(&self, message: &'a SqsMessage) -> Record<'a> {
        Record {
            message,
            envelope: if self.sns {
                sns_attributes(message)
            } else {
                HashMap::new()
            },
            held: AtomicBool::new(false),
        }
    }

    /// For a loop of your own over the event's records: runs `handler` inside the
    /// record's `process` span (CONSUMER, the record's producer as parent and
    /// link, its attempt, queue time and error status), a child of the current
    /// context. Then [`TracedSqsHandler::settle_record`] records what becomes of it
    /// and tells whether it belongs in the partial batch response.
    pub async fn process_record<F, Fut>(&self, record: &SqsMessage, handler: F) -> Processed
    where
        F: FnOnce(Attempt) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        self.instrumenter
            .process_with(&self.record(record), handler)
            .await
    }

    /// Ends a record processed with [`TracedSqsHandler::process_record`] through
    /// the core's lifecycle, as [`TracedSqsHandler::handle`] does: a success is
    /// deleted by Lambda, a failure is left to SQS. Returns whether the record's
    /// id goes into `batchItemFailures`.
    pub async fn settle_record(&self, record: &SqsMessage, processed: Processed) -> bool {
        let settled = self
            .instrumenter
            .settle(processed, self.settler(record))
            .await;
        settled.settlement != Settlement::Ack
    }

    fn settler<'a>(&'a self, record: &'a SqsMessage) -> RecordSettler<'a> {
        RecordSettler {
            record,
            dead_letter: self.dead_letter.as_deref(),
        }
    }

    /// Exports what is pending, off the async threads: call it before your own
    /// handler returns ([`TracedSqsHandler::handle`] does).
    pub async fn flush(&self) {
        self.flush_within(None).await;
    }

    /// [`TracedSqsHandler::flush`], waited for until `deadline` at most: an
    /// export still running then goes on off the async threads, and the
    /// invocation returns in time.
    async fn flush_within(&self, deadline: Option<SystemTime>) {
        let flush = Arc::clone(&self.flush);
        let flushing = tokio::task::spawn_blocking(move || flush());
        let done = match deadline {
            None => flushing.await,
            Some(deadline) => {
                let left = deadline
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .saturating_sub(RETURN_SLACK);
                match tokio::time::timeout(left, flushing).await {
                    Ok(done) => done,
                    Err(_) => {
                        tracing::warn!(target: "mqtrace", "the flush before return did not finish before the invocation's deadline; returning without waiting for it");
                        return;
                    }
                }
            }
        };
        if let Err(e) = done {
            tracing::debug!(target: "mqtrace", error = %e, "flush before return failed");
        }
    }

    /// Handles one invocation: runs `handler` on each record inside its span, in
    /// order, and returns the ids of the records that failed as the partial batch
    /// response. A failed record without a message id is reported with an empty
    /// id, which makes Lambda retry the whole batch: nothing is lost.
    ///
    /// Records of a FIFO queue keep their message group's order: once a record
    /// fails, the later records of its group are not handed to the handler; they
    /// are reported with it (their spans say `error.type = fifo_group_blocked`),
    /// and SQS delivers the group again from the failed one. A record held back
    /// this way is never dead-lettered by mqtrace, whatever its receive count:
    /// it was not handled.
    ///
    /// Near the invocation's deadline ([`TracedSqsHandler::deadline_margin`]) no
    /// record is started any more: those left are reported as failures
    /// (`error.type = deadline_near`) for SQS to hand out again, and the flush
    /// before returning is bounded by the time left.
    ///
    /// With [`TracedSqsHandler::partial_batch_responses`] off, any failure is
    /// returned as [`BatchFailed`] instead.
    pub async fn handle<F, Fut>(
        &self,
        event: LambdaEvent<SqsEvent>,
        mut handler: F,
    ) -> Result<SqsBatchResponse, BatchFailed>
    where
        F: FnMut(&SqsMessage) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        self.handle_with(event, |record, _| handler(record)).await
    }

    /// [`TracedSqsHandler::handle`] for a handler that wants each record's
    /// [`Attempt`] (its number from `ApproximateReceiveCount` and mqtrace's
    /// counter, the budget, the record span's context).
    pub async fn handle_with<F, Fut>(
        &self,
        event: LambdaEvent<SqsEvent>,
        mut handler: F,
    ) -> Result<SqsBatchResponse, BatchFailed>
    where
        F: FnMut(&SqsMessage, Attempt) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        let LambdaEvent { payload, context } = event;
        let now = SystemTime::now();
        let deadline = Self::deadline(context.deadline, now);
        let cutoff = self.cutoff(deadline, now);
        let records: Vec<Record<'_>> = payload.records.iter().map(|r| self.record(r)).collect();
        let invocation = self
            .invocation_span
            .then(|| self.start_invocation(&context, &payload));
        let batch = batch_description(&payload);
        // Each record ends through the core's lifecycle: a failure is left to SQS
        // (listed in the partial batch response), whatever its kind, for the
        // queue's redrive policy to decide.
        // FIFO message groups whose record failed in this batch: their later
        // records wait, so that the group keeps its order.
        let blocked: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        let fifo = records
            .iter()
            .any(|r| r.attribute("MessageGroupId").is_some());
        let concurrency = if fifo { 1 } else { self.concurrency };
        let settled = self
            .instrumenter
            .process_batch_settled(
                &batch,
                &records,
                concurrency,
                |r, attempt| {
                    let group = r.attribute("MessageGroupId").map(str::to_owned);
                    // Records not handed to the handler stay for SQS to hand
                    // out again, and are never dead-lettered: see `settler_for`.
                    let late = cutoff.is_some_and(|c| SystemTime::now() >= c);
                    let held = group.as_ref().is_some_and(|g| {
                        blocked
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .contains(g)
                    });
                    if late || held {
                        r.held.store(true, Ordering::Relaxed);
                    }
                    if late {
                        // Nothing later of its group may start after it, whatever
                        // the clock says next.
                        if let Some(g) = &group {
                            blocked
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .push(g.clone());
                        }
                    }
                    let run = (!late && !held).then(|| handler(r.message, attempt));
                    let blocked = &blocked;
                    async move {
                        let Some(run) = run else {
                            return Err(if late {
                                HandlerError::transient(
                                    "not started: the invocation's deadline is near",
                                )
                                .with_type(DEADLINE_NEAR_ERROR)
                            } else {
                                HandlerError::transient(format!(
                                    "not processed: an earlier record of message group {} failed",
                                    group.as_deref().unwrap_or_default()
                                ))
                                .with_type(FIFO_GROUP_BLOCKED_ERROR)
                            });
                        };
                        let outcome = run.await;
                        if let (Err(_), Some(group)) = (&outcome, group) {
                            blocked
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .push(group);
                        }
                        outcome
                    }
                },
                |r| RecordSettler {
                    record: r.message,
                    // A record that was not handled is only ever left to SQS.
                    dead_letter: self
                        .dead_letter
                        .as_deref()
                        .filter(|_| !r.held.load(Ordering::Relaxed)),
                },
            )
            .with_context(invocation.clone().unwrap_or_else(Context::current))
            .await;
        let failed = settled
            .iter()
            .filter(|s| s.settlement != Settlement::Ack)
            .count();
        let whole = (!self.partial && failed > 0).then_some(BatchFailed {
            failed,
            total: settled.len(),
        });
        if let Some(invocation) = &invocation {
            let span = invocation.span();
            if failed > 0 {
                span.set_attribute(KeyValue::new(
                    mqtrace::conventions::attr::BATCH_FAILED,
                    failed as i64,
                ));
            }
            if let Some(e) = &whole {
                span.set_attribute(KeyValue::new(
                    mqtrace::conventions::attr::ERROR_TYPE,
                    BATCH_FAILED_ERROR,
                ));
                span.set_status(Status::error(e.to_string()));
            }
            span.end();
        }
        let failures = payload
            .records
            .iter()
            .zip(&settled)
            .filter(|(_, s)| s.settlement != Settlement::Ack)
            .map(|(r, _)| {
                let mut failure = BatchItemFailure::default();
                failure.item_identifier = r.message_id.clone().unwrap_or_default();
                failure
            })
            .collect();
        self.flush_within(deadline).await;
        if let Some(e) = whole {
            return Err(e);
        }
        let mut response = SqsBatchResponse::default();
        response.batch_item_failures = failures;
        Ok(response)
    }

    fn start_invocation(&self, context: &lambda_runtime::Context, event: &SqsEvent) -> Context {
        let name = if context.env_config.function_name.is_empty() {
            std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| "lambda".to_owned())
        } else {
            context.env_config.function_name.clone()
        };
        let cold = self.cold.swap(false, Ordering::SeqCst);
        let mut attributes = vec![
            KeyValue::new(FAAS_TRIGGER, "pubsub"),
            KeyValue::new("faas.coldstart", cold),
            KeyValue::new("cloud.provider", "aws"),
        ];
        self.instrumenter
            .conventions()
            .invocation_id(&context.request_id, &mut attributes);
        let region = std::env::var("AWS_REGION")
            .ok()
            .or_else(|| event.records.iter().find_map(|r| r.aws_region.clone()));
        if let Some(region) = region {
            attributes.push(KeyValue::new("cloud.region", region));
        }
        let arn = &context.invoked_function_arn;
        if let Some(account) = arn.split(':').nth(4).filter(|a| !a.is_empty()) {
            attributes.push(KeyValue::new("cloud.account.id", account.to_owned()));
        }
        if !arn.is_empty() {
            attributes.push(KeyValue::new("cloud.resource_id", arn.clone()));
        }
        let builder = SpanBuilder::from_name(name)
            .with_kind(SpanKind::Server)
            .with_attributes(attributes);
        self.instrumenter
            .start_span(builder, &Context::current())
            .context()
            .clone()
    }
}

/// A record's settlement: Lambda deletes the records the response does not list,
/// and leaves those it lists to SQS; dead letters go out through the SQS adapter.
struct RecordSettler<'a> {
    record: &'a SqsMessage,
    dead_letter: Option<&'a DeadLetter>,
}

impl Settler for RecordSettler<'_> {
    type Error = std::convert::Infallible;

    fn routes(&self) -> Routes<'_> {
        Routes::broker_retries()
            .dead_letter(self.dead_letter.map(|d| d.queue_url.as_str()))
            .leave_undeliverable(true)
    }

    fn describe_forward(&self, _: ForwardKind, target: &str) -> MessageDescription {
        let mut d = MessageDescription::new(MessagingSystem::AwsSqs, OperationType::Send)
            .body_size(self.record.body.as_deref().map_or(0, str::len));
        d.destination.name = Some(mqtrace_aws_sqs::queue_name(target).into());
        d
    }

    fn forward(&self, forward: Forward<'_>) -> impl Future<Output = bool> + Send {
        let copy = self
            .dead_letter
            .map(|d| d.tracer.forward_copy(&sdk_message(self.record), forward));
        // Boxed: the SDK's request future is deep, and this path is the rare one;
        // unboxed, it would take every handler's future past the compiler's
        // default type-depth limit.
        Box::pin(async move {
            match copy {
                Some(copy) => copy.await,
                // No dead-letter route is declared without a queue: never called.
                None => false,
            }
        })
    }

    fn settle_name(&self, _: Settlement) -> Option<&'static str> {
        // The response settles the batch at once; no call per record.
        None
    }

    fn settle(self, _: Settlement) -> impl Future<Output = Result<(), Self::Error>> + Send {
        std::future::ready(Ok(()))
    }

    fn error_type(error: &Self::Error) -> String {
        match *error {}
    }
}

/// A record as the SDK's message, for the SQS adapter's dead-letter copy: body,
/// id, message attributes and the system attributes a copy keeps.
fn sdk_message(record: &SqsMessage) -> aws_sdk_sqs::types::Message {
    use aws_sdk_sqs::primitives::Blob;
    use aws_sdk_sqs::types::{Message, MessageAttributeValue, MessageSystemAttributeName};
    let attributes = record
        .message_attributes
        .iter()
        .filter_map(|(k, v)| {
            let value = MessageAttributeValue::builder()
                .set_data_type(v.data_type.clone())
                .set_string_value(v.string_value.clone())
                .set_binary_value(v.binary_value.as_ref().map(|b| Blob::new(b.0.clone())))
                .build()
                .ok()?;
            Some((k.clone(), value))
        })
        .collect();
    let system = record
        .attributes
        .iter()
        .filter(|(k, _)| matches!(k.as_str(), "AWSTraceHeader" | "MessageGroupId"))
        .map(|(k, v)| (MessageSystemAttributeName::from(k.as_str()), v.clone()))
        .collect();
    Message::builder()
        .set_message_id(record.message_id.clone())
        .set_body(record.body.clone())
        .set_message_attributes(Some(attributes))
        .set_attributes(Some(system))
        .build()
}

/// The queue name of an event source ARN (its last `:` field).
fn queue_of(record: &SqsMessage) -> Option<&str> {
    record.event_source_arn.as_deref()?.rsplit(':').next()
}

fn batch_description(event: &SqsEvent) -> MessageDescription {
    let mut d = MessageDescription::new(MessagingSystem::AwsSqs, OperationType::Process);
    let mut sources: Vec<&str> = event.records.iter().filter_map(queue_of).collect();
    sources.dedup();
    let single = sources
        .first()
        .filter(|_| sources.iter().all(|s| s == &sources[0]));
    match single {
        Some(queue) => {
            d.destination.name = Some((*queue).into());
            d.span_name = Some(format!("{queue} process").into());
        }
        None => d.span_name = Some(mqtrace::Text::from_static("multiple_sources process")),
    }
    d.extra.push(KeyValue::new(FAAS_TRIGGER, "pubsub"));
    d
}

/// One record of the event, for the core, with the string attributes of its SNS
/// envelope when those are read.
struct Record<'a> {
    message: &'a SqsMessage,
    envelope: HashMap<String, String>,
    /// Not handed to the handler (its FIFO group blocked, or the deadline near).
    held: AtomicBool,
}

/// The `String` message attributes of an SNS notification in a record's body;
/// empty when the body is not one.
fn sns_attributes(record: &SqsMessage) -> HashMap<String, String> {
    #[derive(serde::Deserialize)]
    struct Envelope {
        #[serde(rename = "Type")]
        kind: String,
        #[serde(rename = "MessageAttributes", default)]
        attributes: HashMap<String, EnvelopeAttribute>,
    }
    #[derive(serde::Deserialize)]
    struct EnvelopeAttribute {
        #[serde(rename = "Type")]
        kind: String,
        #[serde(rename = "Value")]
        value: String,
    }
    let Some(body) = record.body.as_deref() else {
        return HashMap::new();
    };
    match serde_json::from_str::<Envelope>(body) {
        Ok(e) if e.kind == "Notification" => e
            .attributes
            .into_iter()
            .filter(|(_, a)| a.kind.starts_with("String"))
            .map(|(k, a)| (k, a.value))
            .collect(),
        _ => HashMap::new(),
    }
}

impl Record<'_> {
    fn attribute(&self, name: &str) -> Option<&str> {
        self.message.attributes.get(name).map(String::as_str)
    }
}

impl Inbound for Record<'_> {
    fn description(&self) -> MessageDescription {
        let r = self.message;
        let mut d = MessageDescription::new(MessagingSystem::AwsSqs, OperationType::Process)
            .body_size(r.body.as_deref().map_or(0, str::len));
        if let Some(queue) = queue_of(r) {
            d.destination.name = Some(queue.into());
        }
        d.message_id = r.message_id.as_deref().map(mqtrace::Text::from);
        d.extra.push(KeyValue::new(FAAS_TRIGGER, "pubsub"));
        d
    }

    fn headers(&self) -> impl Extractor + '_ {
        WithTraceHeader {
            inner: WithEnvelope {
                record: Attributes(&self.message.message_attributes),
                envelope: &self.envelope,
            },
            trace_header: self.attribute("AWSTraceHeader"),
        }
    }

    fn body(&self) -> &[u8] {
        self.message.body.as_deref().unwrap_or_default().as_bytes()
    }

    fn broker_timestamp(&self) -> Option<SystemTime> {
        let ms: u64 = self.attribute("SentTimestamp")?.parse().ok()?;
        UNIX_EPOCH.checked_add(Duration::from_millis(ms))
    }

    fn delivery_count(&self) -> Option<u32> {
        self.attribute("ApproximateReceiveCount")?.parse().ok()
    }
}

/// A record's own attributes, then its SNS envelope's, key by key.
struct WithEnvelope<'a> {
    record: Attributes<'a>,
    envelope: &'a HashMap<String, String>,
}

impl Extractor for WithEnvelope<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.record.get(key).or_else(|| {
            let entries = self.envelope.iter().map(|(k, v)| (k.as_str(), v.as_str()));
            lookup(entries, key)
        })
    }

    fn keys(&self) -> Vec<&str> {
        let mut keys = self.record.keys();
        keys.extend(self.envelope.keys().map(String::as_str));
        keys
    }
}

/// A record's `messageAttributes`: string types only, keys without regard to case.
#[derive(Clone, Copy)]
struct Attributes<'a>(&'a HashMap<String, SqsMessageAttribute>);

impl Extractor for Attributes<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let entries = self.0.iter().map(|(k, v)| {
            let is_string = v
                .data_type
                .as_deref()
                .is_some_and(|t| t.starts_with("String"));
            (k.as_str(), v.string_value.as_deref().filter(|_| is_string))
        });
        lookup(entries, key).flatten()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// `tracing` targets of lambda_runtime itself, whose spans a `tracing` to
/// OpenTelemetry bridge should leave out: give them to
/// `mqtrace_telemetry::TelemetryBuilder::quiet_targets`.
pub const CLIENT_TARGETS: &[&str] = &["lambda_runtime"];

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn handler() -> TracedSqsHandler {
        TracedSqsHandler::new(&Instrumenter::default(), || {})
    }

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    /// The cutoff of an invocation with deadline `deadline_ms`, begun at `now_ms`.
    fn cut(h: &TracedSqsHandler, deadline_ms: u64, now_ms: u64) -> Option<SystemTime> {
        h.cutoff(
            TracedSqsHandler::deadline(deadline_ms, at(now_ms)),
            at(now_ms),
        )
    }

    #[test]
    fn no_deadline_starts_every_record() {
        let none = TracedSqsHandler::deadline(0, at(1_000));
        assert_eq!(none, None);
        assert_eq!(handler().cutoff(none, at(1_000)), None);
    }

    #[test]
    fn records_stop_a_margin_before_the_deadline() {
        // 10 s left: the default margin, 1 s.
        assert_eq!(cut(&handler(), 20_000, 10_000), Some(at(19_000)));
        let custom = handler().deadline_margin(Duration::from_secs(3));
        assert_eq!(cut(&custom, 30_000, 10_000), Some(at(27_000)));
        // Never more than a quarter of the time left, set or not.
        assert_eq!(cut(&custom, 20_000, 10_000), Some(at(17_500)));
    }

    #[test]
    fn a_short_invocation_keeps_three_quarters_of_its_time() {
        // 2 s left: a quarter, 500 ms, rather than 1 s.
        assert_eq!(cut(&handler(), 12_000, 10_000), Some(at(11_500)));
        // Already past when the invocation starts: not a deadline it can keep,
        // for the records or the flush.
        assert_eq!(TracedSqsHandler::deadline(5_000, at(10_000)), None);
        assert_eq!(cut(&handler(), 5_000, 10_000), None);
    }
}
