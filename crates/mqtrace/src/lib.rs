//! OpenTelemetry traces across message queues.
//!
//! A message published by one service and consumed, retried or dead-lettered by
//! others shows up as one connected trace, with spans that follow the messaging
//! semantic conventions (v1.45 by default; v1.44, v1.24's legacy names, or v1.45 and
//! legacy side by side). This crate is the core
//! that every broker adapter (`mqtrace-rdkafka`, `mqtrace-lapin`, `mqtrace-aws-sqs`,
//! `mqtrace-aws-lambda`) builds on, and it has no broker client dependency and no
//! OpenTelemetry SDK dependency. It also carries an embedded in-memory broker
//! (`mqtrace::embedded`, the `embedded` feature) with the same traced surface.
//!
//! Adapters *describe* (a [`MessageDescription`], a header carrier, a
//! [`Settler`] for the broker's settlement calls); the [`Instrumenter`] *decides*:
//! span name, kind, parent, links, attributes, status, and what happens to a
//! message after its handler ([`Instrumenter::settle`], one lifecycle for every
//! broker: see [`settle`]).
//!
//! # Span model
//!
//! | operation | span name (current) | kind | parent | links |
//! |---|---|---|---|---|
//! | send one message | `send {destination}` | PRODUCER | current context | — |
//! | create (batch send, per message) | `create {destination}` | PRODUCER | current context | — |
//! | send a batch | `send {destination}` | CLIENT | current context | each `create` span |
//! | receive (poll) | `receive {destination}` (`poll` for Kafka) | CLIENT | current context | each message's creation context, with its message id |
//! | process one message | `process {destination}` | CONSUMER | by [`ProcessParenting`]: producer (default), ambient, or producer | producer (default and link-only), ambient span when it is not the parent |
//! | process a batch | `process {destination}` | CONSUMER | current context | each message's creation context, with its message id |
//! | process one message of a batch | `process {destination}` | CONSUMER | the batch span | the message's creation context |
//! | settle | `ack {destination}`, `commit ...`, `delete ...` | CLIENT | the process span | — |
//! | forward to retry / dead letter | `send {retry or DLQ}` | PRODUCER | the failed process span | original creation (`mqtrace.link.relationship=original_message`), processing attempt (`mqtrace.link.relationship=processing_attempt`) |
//!
//! Attributes are set when the span starts (samplers see them), named by the
//! [`Conventions`] in force; `docs/span-model.md` lists them for each setting.
//! mqtrace's own attributes: `mqtrace.message.attempt`, `mqtrace.message.queue_time`
//! (seconds, from the broker's timestamp), `mqtrace.message.disposition`
//! (`settled`/`retried`/`dead_lettered`/`dropped`), `mqtrace.error.retryable`,
//! `mqtrace.batch.succeeded_count` / `failed_count`, and captured headers as
//! `messaging.header.<name>`. A failure sets status Error and `error.type`; the
//! exception goes to a log record or a span event as the conventions say
//! ([`exceptions`]).
//!
//! # Metrics
//!
//! The messaging metrics of the conventions, and mqtrace's queue time and
//! dispositions, are recorded once in the lifecycle ([`metrics`]), to
//! [`InstrumenterBuilder::meter_provider`] or the global provider.
//!
//! # Customisation
//!
//! - [`Conventions`]: v1.45 (default), v1.44, legacy (v1.24) or dup
//!   (`OTEL_SEMCONV_STABILITY_OPT_IN=messaging/dup`, or
//!   `MQTRACE_MESSAGING_CONVENTIONS=v1.45|v1.44|legacy|dup`).
//! - [`InstrumenterBuilder::body_size`]: the opt-in `messaging.message.body.size`.
//! - [`InstrumenterBuilder::meter_provider`], [`InstrumenterBuilder::metrics`]: where
//!   the metrics go, or none; [`InstrumenterBuilder::logger_provider`]: exception log
//!   records.
//! - [`ProcessParenting`]: producer as parent and link (default), link only, parent only.
//! - [`Propagation`]: W3C trace context and baggage (default), AWS X-Ray, underscore
//!   keys, any order; extraction takes the first valid format.
//! - [`OnStart`]: a hook (closure) adding attributes from the message at span start.
//! - [`InstrumenterBuilder::capture_header`]: allow-listed headers as attributes.
//! - [`Classify`] and [`HandlerError`]: permanent or transient failures;
//!   [`RetryPolicy`]: attempts before dead-lettering (default 3).
//!
//! # Cargo features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `embedded` | yes | the in-memory broker, [`embedded`] |
//! | `xray` | no | `PropagationBuilder::xray` through `opentelemetry-aws` (which brings the OpenTelemetry SDK along; the SQS and Lambda adapters turn it on) |
//!
//! The core depends on the OpenTelemetry API only. The SDK provider, the OTLP
//! exporters, batch settings and the `tracing` layer are the application's choice;
//! `mqtrace-telemetry` sets them up in one call.
//!
//! # Examples
//!
//! Processing with the core directly, as an adapter does:
//!
//! ```
//! use mqtrace::embedded::{Broker, Message, QueueOptions};
//! use mqtrace::{Disposition, Instrumenter};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = Broker::new();
//! broker.declare_queue("orders", QueueOptions::default());
//! broker.publish("orders", Message::new("hello").header("traceparent",
//!     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"))?;
//!
//! let instrumenter = Instrumenter::default();
//! let delivery = broker.try_receive("orders")?.ok_or("empty")?;
//! let processed = instrumenter
//!     .process_with(&delivery, |attempt| async move {
//!         assert_eq!(attempt.number(), 1);
//!         Ok(())
//!     })
//!     .await;
//! assert_eq!(processed.creation_context().trace_id().to_string(),
//!            "4bf92f3577b34da6a3ce929d0e0e4736");
//! // Settling by hand; adapters hand the core a `Settler` instead.
//! let disposition = processed.disposition(instrumenter.retry_policy(), false);
//! assert_eq!(disposition, Disposition::Settle);
//! delivery.ack();
//! assert!(processed.finish(disposition).is_ok());
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod conventions;
pub mod describe;
#[cfg(feature = "embedded")]
pub mod embedded;
pub mod exceptions;
pub mod forward;
mod instrument;
pub mod metrics;
pub mod outcome;
pub mod propagation;
pub mod settle;
mod w3c;

pub use conventions::Conventions;
pub use describe::{
    Destination, LastMade, MessageDescription, MessagingSystem, OperationType, Text,
};
pub use forward::{Disposition, ForwardKind, RetryPolicy};
pub use instrument::{
    instrumentation_scope, Attempt, BatchProcessed, Inbound, Instrumenter, InstrumenterBuilder,
    MessageView, MessagingSpan, OnStart, ProcessParenting, Processed, MAX_CAPTURED_HEADER_LEN,
};
pub use outcome::{Classify, HandlerError, HandlerResult, ResultExt, Retryable};
pub use propagation::{Propagation, PropagationBuilder, UnderscorePropagator};
pub use settle::{ConsumerCounters, ConsumerStats, Routes, Settled, Settlement, Settler};
