//! OpenTelemetry traces for AWS SQS through [aws-sdk-sqs]: a message sent by one
//! service and received, retried or dead-lettered by others is one connected trace.
//!
//! - [`MessageTracer`] instruments a receive loop of your own (the front door): it
//!   runs your handler for the SDK's `Message` inside the full `process` span and
//!   settles it (delete, leave for the visibility timeout, dead-letter queue) the
//!   same way the full consumer does; [`SendMessageExt::send_traced`] sends through
//!   the plain client's `send_message()` inside a `send` span.
//! - [`TracedSqs`] sends single messages (`send`) and batches (`send_batch`,
//!   split into requests of 10) with the context in message attributes and in the
//!   `AWSTraceHeader` system attribute ([`SqsPropagation`]).
//! - [`TracedConsumer`] polls a queue with long polling, emits `receive` spans,
//!   processes each message inside a `process` span and settles it by outcome: a
//!   receive loop over [`MessageTracer`].
//! - [`MessageAttributesInjector`] and [`MessageAttributesExtractor`] are the
//!   carriers; SQS's limit of [`MAX_MESSAGE_ATTRIBUTES`] is never exceeded and a
//!   context is written whole or not at all.
//! - The trace context never makes a message too big: when its attributes would
//!   take a message that fits over the size limit ([`DEFAULT_MAX_MESSAGE_BYTES`],
//!   or [`TracedSqs::max_message_bytes`]), they are left out and the span carries
//!   [`CONTEXT_OMITTED`]; `AWSTraceHeader`, which SQS does not count, still goes.
//!
//! # Span model
//!
//! | operation | span name | kind | parent | links | attributes |
//! |---|---|---|---|---|---|
//! | send | `send {queue}` | PRODUCER | current span | — | `messaging.system.name = aws.sqs` (`messaging.system = aws_sqs` before v1.45), `messaging.destination.name` (queue name), [`QUEUE_URL`], `messaging.message.body.size` (opt-in), `server.address`, `server.port`; from the response `messaging.message.id`, [`SEQUENCE_NUMBER`]; [`MESSAGE_GROUP_ID`] for FIFO queues; [`CONTEXT_OMITTED`] when the context attributes did not fit |
//! | batch entry | `create {queue}` | PRODUCER | current span | — | as send, per entry; refused entries are errors with SQS's code |
//! | batch request | `send {queue}` | CLIENT | current span | every entry's `create` span | `messaging.batch.message_count` |
//! | receive | `receive {queue}` | CLIENT | current span | each message's producer, with its message id | `messaging.batch.message_count` |
//! | process | `process {queue}` | CONSUMER | producer (by [`mqtrace::ProcessParenting`]) | producer | message id, [`RECEIVE_COUNT`], `mqtrace.message.queue_time` (`SentTimestamp`), attempt, disposition |
//! | dead letter | `send {dead-letter queue}` | PRODUCER | process span | original message, processing attempt | as send |
//! | delete (opt-in) | `delete {queue}` | CLIENT | process span | — | as process |
//!
//! Extraction tries the instrumenter's formats on message attributes first, then
//! X-Ray on `AWSTraceHeader`.
//!
//! # Settlement
//!
//! | handler outcome | what happens |
//! |---|---|
//! | success | deleted |
//! | transient error | left for the visibility timeout and the queue's redrive policy; with a dead-letter queue set and the retry budget spent (by receive count), forwarded there and deleted |
//! | permanent error | forwarded to the dead-letter queue with `mqtrace-error-type`, `mqtrace-attempt`, `mqtrace-error-message`, `mqtrace-failed-at`, `mqtrace-original-traceparent` (as many as fit in the 10 attributes and the size limit, in that order) and the original body, then deleted; without one, deleted (`dropped` on the span) |
//!
//! "Deleted" is batched in the full consumer (unless settle spans are on): a
//! receive's deletes go together in `DeleteMessageBatch` calls, made when the
//! oldest has waited [`TracedConsumer::max_delete_delay`] (1 s, at most an eighth
//! of the visibility timeout), when ten wait, when a FIFO group of the receive is
//! done and when the receive is; a message whose delete fails is received again.
//! Messages not yet settled (waiting for their turn, or in their handler) are
//! kept invisible with `ChangeMessageVisibilityBatch` each time half of the
//! visibility timeout has passed. An own loop does the same with
//! [`MessageTracer::settle_batched`] into a [`DeleteBatch`], then
//! [`MessageTracer::delete_pending`] as [`DeleteBatch::oldest_age`] grows and
//! [`MessageTracer::delete_batch`] at the end, and
//! [`MessageTracer::keep_visible`] for handlers that may outlast the timeout.
//!
//! FIFO queues: the full consumer handles a receive's messages of one message
//! group in order, and once one fails, the group's later messages of that
//! receive are neither handled nor deleted (spans with
//! [`FIFO_GROUP_BLOCKED_ERROR`], never dead-lettered): SQS hands the group out
//! again from the failed message.
//!
//! # Customisation
//!
//! Spans (conventions, parenting, formats, header capture, hooks, retry budget) are
//! set on the [`mqtrace::Instrumenter`]. The producer chooses where the context
//! goes; the consumer sets the dead-letter queue, long polling, batch size,
//! visibility timeout, receive and delete spans.
//!
//! # Cargo features
//!
//! None. aws-sdk-sqs is used with its default HTTPS client on tokio.
//!
//! # Examples
//!
//! Your own loop: [`MessageTracer`]'s docs, and `examples/sqs-own-loop`. The full
//! consumer:
//!
//! ```no_run
//! use mqtrace::{HandlerResult, Instrumenter};
//! use mqtrace_aws_sqs::{TracedConsumer, TracedSqs};
//!
//! # async fn run(client: aws_sdk_sqs::Client, url: String) -> Result<(), mqtrace_aws_sqs::ConsumeError> {
//! let instrumenter = Instrumenter::default();
//! let sqs = TracedSqs::new(client.clone(), instrumenter.clone());
//! let sent = sqs
//!     .send(client.send_message().queue_url(&url).message_body(r#"{"order":7}"#))
//!     .await;
//! # let _ = sent;
//! let stats = TracedConsumer::new(client, &url, &instrumenter)
//!     .run_until(
//!         |message| async move {
//!             let order: serde_json::Value = message.json()?;
//!             tracing::info!(%order, "billing");
//!             HandlerResult::Ok(())
//!         },
//!         tokio::time::sleep(std::time::Duration::from_secs(3600)),
//!     )
//!     .await?;
//! println!("{stats:?}");
//! # Ok(()) }
//! ```
//!
//! [aws-sdk-sqs]: https://docs.rs/aws-sdk-sqs

#![forbid(unsafe_code)]

mod carrier;
mod consumer;
mod describe;
mod process;
mod producer;

pub use carrier::{
    MessageAttributes, MessageAttributesExtractor, MessageAttributesInjector,
    MAX_MESSAGE_ATTRIBUTES,
};
pub use consumer::{
    trace_context, ConsumeError, Received, TracedConsumer, DEFAULT_MAX_DELETE_DELAY,
    FIFO_GROUP_BLOCKED_ERROR, QUEUE_MESSAGES, QUEUE_STATE,
};
pub use describe::{
    error_type, queue_name, MESSAGE_GROUP_ID, QUEUE_URL, RECEIVE_COUNT, SEQUENCE_NUMBER,
};
pub use mqtrace::settle::ConsumerStats;
pub use process::{DeleteBatch, MessageTracer};
pub use producer::{
    message_size, SendMessageExt, SqsPropagation, TracedSqs, CONTEXT_OMITTED,
    DEFAULT_MAX_MESSAGE_BYTES, MAX_BATCH_ENTRIES,
};

/// `tracing` targets of aws-sdk-sqs itself, whose spans a `tracing` to OpenTelemetry
/// bridge should leave out (they would bury the application's): give them to
/// `mqtrace_telemetry::TelemetryBuilder::quiet_targets`.
pub const CLIENT_TARGETS: &[&str] = &["aws_smithy_runtime", "aws_sdk_sqs"];
