//! OpenTelemetry traces for RabbitMQ through [lapin]: a message published by one
//! service and consumed, retried or dead-lettered by others is one connected trace.
//!
//! - [`DeliveryTracer`] instruments a consumer loop of your own (the front door):
//!   it runs your handler for a lapin `Delivery` inside the full `process` span and
//!   settles it (ack, bounded retries, dead letters) the same way the full consumer
//!   does; [`ChannelExt::publish_traced`] publishes through a plain channel inside a
//!   `send` span.
//! - [`TracedPublisher`] publishes inside a `send` span whose context travels in the
//!   message headers; with publisher confirms the span ends on the confirm.
//! - [`TracedConsumer`] consumes a queue, runs an async handler inside a `process`
//!   span, settles each delivery by the handler's outcome and reconnects after a
//!   broker restart: a receive loop over [`DeliveryTracer`].
//! - [`BasicPropertiesExt`] and [`DeliveryExt`] inject and extract for code that
//!   keeps its own lapin calls; [`FieldTableInjector`] and [`FieldTableExtractor`]
//!   are the carriers under all of them.
//!
//! The spans and the settlement decisions are [`mqtrace::Instrumenter`]'s (see
//! [`mqtrace::settle`]): this crate only describes RabbitMQ's operations and carries
//! out the settlements.
//!
//! # Span model
//!
//! | operation | span name | kind | parent | links | attributes |
//! |---|---|---|---|---|---|
//! | publish | `send {exchange}:{routing key}` | PRODUCER | current span | — | `messaging.system.name = rabbitmq`, `messaging.destination.name`, `rabbitmq.destination.routing_key`, `messaging.message.conversation_id` (correlation id), `messaging.message.id`, `messaging.message.body.size` (opt-in), `server.address`, `server.port` (v1.45 names; see `mqtrace::conventions` for the others) |
//! | consume | `process {exchange}:{routing key}:{queue}` | CONSUMER | producer (by [`mqtrace::ProcessParenting`]) | producer | as above, plus `messaging.rabbitmq.message.delivery_tag`, [`REDELIVERED`], `mqtrace.message.attempt`, `mqtrace.message.queue_time` (from the `timestamp` property), `mqtrace.message.disposition` |
//! | retry / dead letter | `send {target}` | PRODUCER | process span | original message, processing attempt | as publish, plus attempt and disposition |
//! | settle (opt-in) | `ack …` / `nack …` | CLIENT | process span | — | as consume |
//!
//! Destination names follow the RabbitMQ conventions: `{exchange}:{routing key}` on
//! the producer side (whichever is non-empty, or `amq.default`), and
//! `{exchange}:{routing key}:{queue}` on the consumer side without empty parts and
//! with a routing key equal to the queue name written once. Under
//! [`mqtrace::Conventions::Legacy`] the destination is the exchange. Server-named
//! queues (`amq.gen-…`) are anonymous: their spans are named `process`.
//!
//! # Settlement
//!
//! | handler outcome | what happens |
//! |---|---|
//! | success | ack |
//! | transient error, attempts left | republished (back to the queue, or [`TracedConsumer::retry_via`]) with `mqtrace-attempt`, confirmed, then ack |
//! | transient error, budget spent | republished to the dead-letter exchange with `mqtrace-error-type`, `mqtrace-error-message`, `mqtrace-failed-at`, `mqtrace-original-traceparent` and the original bytes, then ack |
//! | permanent error (e.g. [`Message::json`] on invalid JSON) | nack without requeue: the queue's dead-letter exchange takes it (RabbitMQ adds `x-death`) |
//!
//! Nothing is acknowledged before the handler has finished, and a forward is
//! stored before the ack, so a crash duplicates at worst. A forward is published
//! with `mandatory` and counts as stored once the broker has confirmed it *and*
//! routed it to a queue: an unroutable copy (a retry exchange with no binding, a
//! dead-letter queue deleted) comes back as a return, and the original is
//! requeued instead of acked. That needs a channel in confirm mode (the full
//! consumer puts its own in it); an own loop on a channel without confirms
//! requeues instead of forwarding, unless [`DeliveryTracer::unconfirmed_forwards`]
//! accepts the risk. An ack or nack that lapin did not send (the channel had
//! closed) is a settle failure ([`SettleError::NotSent`]): counted, on the span,
//! and the broker delivers the message again. A tracer has one forward in flight
//! at a time (lapin gives a confirm the oldest return it holds, so concurrent
//! mandatory publishes on one channel could swap their returns): don't publish
//! `mandatory` messages of your own on a channel a tracer forwards on. A forward
//! that keeps failing (a dead-letter queue deleted) requeues its original each
//! time, so the handler runs again until the topology is fixed: loud (an error
//! on every forward span), never lost.
//!
//! "Ack" is coalesced in the full consumer (unless settle spans are on): a settled
//! delivery's ack waits up to 5 ms, or until half the prefetch window is settled,
//! and one `basic.ack` with `multiple` covers the run below the lowest delivery
//! still being handled; nacks go at once. An own loop does the same with an
//! [`AckCoalescer`] and [`DeliveryTracer::settle_coalesced`].
//!
//! **Rules for coalesced acks.** One coalescer per channel, made before the
//! channel's first delivery; one consumer per channel for the acks to coalesce.
//! A `multiple` never covers a delivery tag the coalescer has not seen arrive or
//! settle, so breaking a rule (a second `basic_consume` or a `basic_get` on the
//! channel, a concurrent loop that skips [`AckCoalescer::arrived`]) costs
//! coalescing, never a message: those acks go one by one. Don't coalesce on a
//! connection with lapin's `auto-recover`: a recovered channel counts its tags
//! from 1 again, and acks pending from before would name the new deliveries (the
//! full consumer reconnects with a new channel and a new coalescer instead).
//!
//! Permanent failures are rejected to the queue's dead-letter exchange: RabbitMQ's
//! own dead-lettering, which classic queues do at most once (a dead-letter queue
//! missing then drops the message). Where that matters, use a quorum queue with
//! `x-dead-letter-strategy: at-least-once`.
//!
//! # Customisation
//!
//! Everything about the spans (conventions, parenting, propagation formats, header
//! capture, start hooks, retry budget) is set on the [`mqtrace::Instrumenter`]
//! handed to the wrappers. The consumer sets prefetch, concurrency, the retry
//! route, settle spans and reconnection back-off.
//!
//! # Cargo features
//!
//! - `json` (default): [`TracedPublisher::publish_json`] and [`Message::json`].
//! - `rustls`: `amqps://` connections.
//!
//! # Examples
//!
//! Your own loop: [`DeliveryTracer`]'s docs, and `examples/rabbitmq-own-loop`. The
//! full consumer:
//!
//! ```no_run
//! use mqtrace::{HandlerResult, Instrumenter};
//! use mqtrace_lapin::{QueueSpec, TracedConsumer};
//!
//! # async fn run() -> Result<(), mqtrace_lapin::ConsumeError> {
//! let queue = QueueSpec::new("billing")
//!     .bind("shop", "order.*")
//!     .dead_letter("billing.dlx", "billing.dead");
//! let consumer = TracedConsumer::new(
//!     "amqp://guest:guest@127.0.0.1:5672/%2f",
//!     queue,
//!     Instrumenter::default(),
//! );
//! let stats = consumer
//!     .run_until(
//!         |message| async move {
//!             let order: serde_json::Value = message.json()?;
//!             tracing::info!(%order, "billing");
//!             HandlerResult::Ok(())
//!         },
//!         // Stop after an hour; a service would wait for its shutdown signal.
//!         tokio::time::sleep(std::time::Duration::from_secs(3600)),
//!     )
//!     .await?;
//! println!("{stats:?}");
//! # Ok(()) }
//! ```
//!
//! [lapin]: https://docs.rs/lapin

#![forbid(unsafe_code)]

mod acks;
mod carrier;
mod consumer;
mod describe;
mod ext;
mod process;
mod publisher;
mod topology;

pub use acks::AckCoalescer;
pub use carrier::{FieldTableExtractor, FieldTableInjector};
pub use consumer::{ConsumeError, Message, TracedConsumer};
pub use describe::{error_type, Server};
pub use ext::{BasicPropertiesExt, ChannelExt, DeliveryExt};
pub use mqtrace::settle::ConsumerStats;
pub use process::{DeliveryTracer, SettleError, REDELIVERED};
#[cfg(feature = "json")]
pub use publisher::PublishJsonError;
pub use publisher::TracedPublisher;
pub use topology::{declare_exchange, DeadLetter, QueueSpec};

/// `tracing` targets of lapin itself, whose spans a `tracing` to OpenTelemetry
/// bridge should leave out (they would bury the application's): give them to
/// `mqtrace_telemetry::TelemetryBuilder::quiet_targets`.
pub const CLIENT_TARGETS: &[&str] = &["lapin", "amq_protocol", "async_rs"];
