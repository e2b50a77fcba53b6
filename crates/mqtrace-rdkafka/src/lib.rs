//! OpenTelemetry traces for Kafka through [rdkafka]: a record produced by one
//! service and consumed, retried or dead-lettered by others is one connected trace.
//!
//! - [`RecordTracer`] instruments a consumer loop of your own (the front door): it
//!   runs your handler for an rdkafka `BorrowedMessage` or `OwnedMessage` inside the
//!   full `process` span and settles it (commit, retry and dead-letter topics) the
//!   same way the full consumer does; [`FutureProducerExt::send_traced`] sends
//!   through a plain `FutureProducer` inside a `send` span.
//! - [`TracedProducer`] sends inside a `send` span whose context travels in the
//!   record headers; the span ends on the delivery report with partition and offset.
//! - [`TracedConsumer`] consumes topics, runs an async handler inside a `process`
//!   span per record, and settles by outcome: commit after success, forward to a
//!   retry or dead-letter topic and then commit after failure: a receive loop over
//!   [`RecordTracer`].
//! - [`FutureRecordExt`] and [`MessageExt`] inject and extract for code that keeps
//!   its own clients; [`OwnedHeadersInjector`] and [`HeadersExtractor`] are the
//!   carriers under all of them.
//!
//! The spans and the settlement decisions are [`mqtrace::Instrumenter`]'s (see
//! [`mqtrace::settle`]); this crate describes Kafka's operations and carries out the
//! settlements.
//!
//! # Span model
//!
//! | operation | span name | kind | parent | links | attributes |
//! |---|---|---|---|---|---|
//! | send | `send {topic}` | PRODUCER | current span | — | `messaging.system.name = kafka`, `messaging.destination.name`, `kafka.message.key` (UTF-8 keys), `kafka.message.tombstone`, `messaging.message.body.size` (opt-in), `messaging.client.id`, `server.address`, `server.port`; from the delivery report `messaging.destination.partition.id`, `kafka.offset` (v1.45 names; see `mqtrace::conventions` for the others) |
//! | poll (opt-in, `receive_spans`) | `poll {topic}` | CLIENT | current span | the record's producer | as process (partition, offset, key, group, lag), without handler outcome; covers the poll from when it began (`RecordTracer::process_polled`) |
//! | process | `process {topic}` | CONSUMER | producer (by [`mqtrace::ProcessParenting`]) | producer | partition, offset, key, tombstone, `messaging.consumer.group.name`, `mqtrace.message.queue_time` (record timestamp), [`CONSUMER_LAG`], attempt, disposition |
//! | retry / dead letter | `send {target topic}` | PRODUCER | process span | original message, processing attempt | as send, plus attempt and disposition |
//! | commit (opt-in, `settle_spans`) | `commit {topic}` | CLIENT | process span | — | as process |
//!
//! Under legacy conventions partition, offset and consumer group are
//! `messaging.kafka.destination.partition` (int), `messaging.kafka.message.offset`
//! and `messaging.kafka.consumer.group`.
//!
//! # Settlement
//!
//! | handler outcome | what happens |
//! |---|---|
//! | success | offset committed |
//! | transient error, attempts left | forwarded to the retry topic (default: the same topic) with `mqtrace-attempt`, then committed |
//! | permanent error, or budget spent | forwarded to the dead-letter topic with `mqtrace-error-type`, `mqtrace-error-message`, `mqtrace-failed-at`, `mqtrace-original-traceparent`, same key and bytes, then committed |
//! | forward failed | not committed; the consumer seeks back (asynchronously, never blocking) and handles the record again |
//! | forward failed and the seek back failed | the partition is paused and held at the record: no later record of it is stored or committed ([`SettleRefused::Held`]) until the record is handled again (after a rebalance or restart, from the committed offset) |
//!
//! "Committed" is coalesced in the full consumer: settling stores the record's
//! offset ([`RecordTracer::store_offsets`]) and librdkafka commits what is stored
//! (the consumer sets `enable.auto.commit=true` with
//! `enable.auto.offset.store=false`): every `auto.commit.interval.ms` (200 ms
//! unless the configuration sets it), when partitions are revoked, and as the
//! consumer gives its partitions up at stop. One commit request per interval
//! rather than one per record, never past a record not yet settled: records are
//! handled one at a time, per-partition order holds, and no offset passes a
//! record whose handler has not finished. Every commit's answer comes back
//! through the consumer's events ([`StatsContext`]): a refused commit is counted
//! (`ConsumerStats::settle_failures`, [`StatsContext::failed_commits`], for the
//! answers that arrive while `run_until` runs) and made again on the next tick
//! while the partition is held, since its offsets stay stored (a session lost
//! in an outage drops them with the partition: those records are read again).
//! When the consumer stops it waits, for up to five seconds, until the cluster
//! has confirmed the commit of every settled record of the partitions it still
//! holds, then unsubscribes (half a second more at most); nothing blocks a
//! thread, and dropping the consumer closes it on a thread of its own, so a
//! coordinator that is away holds neither the caller nor the process's exit
//! ([`TracedConsumer::close`] waits for the close, within a bound). A partition revoked in a rebalance leaves the
//! consumer's positions, so a partition that moves away and comes back is never
//! committed back to an older position.
//!
//! An own loop commits each record with an asynchronous commit unless it turns
//! [`RecordTracer::store_offsets`] on; librdkafka drops the answers to those
//! commits (rdkafka 0.39 gives them no reply queue, rust-rdkafka#856), and a
//! later commit covers a failed one. An own loop that wants the answers stores
//! offsets and lets librdkafka commit them, as the full consumer does:
//! `enable.auto.commit=true`, `enable.auto.offset.store=false`, its consumer
//! made with [`StatsContext`], which counts them.
//!
//! The consumer's settings: librdkafka's defaults (`enable.auto.commit=true`,
//! `enable.auto.offset.store=true`) commit every record's offset as it is handed
//! out, past records still in their handler. [`TracedConsumer`] turns the store
//! off; an own loop needs `enable.auto.offset.store=false` with
//! [`RecordTracer::store_offsets`], and `enable.auto.commit=false` or
//! `enable.auto.offset.store=false` without it, and [`RecordTracer`] refuses to
//! settle otherwise ([`SettleRefused`]; [`RecordTracer::check`] tells at
//! start-up).
//!
//! # Customisation
//!
//! Spans (conventions, parenting, propagation, header capture, start hooks, retry
//! budget) are set on the [`mqtrace::Instrumenter`]. The consumer (and
//! [`RecordTracer`]) sets the retry and dead-letter topics, receive (`poll`) and
//! settle (`commit`) spans, and the forward timeout.
//!
//! # Cargo features
//!
//! None of its own. rdkafka is built with its bundled librdkafka (needs a C
//! compiler, `make` and zlib).
//!
//! # Examples
//!
//! Your own loop: [`RecordTracer`]'s docs, and `examples/kafka-own-loop`. The full
//! consumer:
//!
//! ```no_run
//! use mqtrace::{HandlerResult, Instrumenter};
//! use mqtrace_rdkafka::{TracedConsumer, TracedProducer};
//! use rdkafka::ClientConfig;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = ClientConfig::new();
//! config.set("bootstrap.servers", "127.0.0.1:9092");
//! let instrumenter = Instrumenter::default();
//! let producer = TracedProducer::from_config(&config, instrumenter.clone())?;
//! config.set("group.id", "billing");
//! let consumer = TracedConsumer::from_config(&config, &["orders"], producer, instrumenter)?
//!     .dead_letter_topic("orders.dlq");
//! let stats = consumer
//!     .run_until(
//!         |record| async move {
//!             let order: serde_json::Value = record.json()?;
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
//! [rdkafka]: https://docs.rs/rdkafka

#![forbid(unsafe_code)]

mod carrier;
mod consumer;
mod describe;
mod ext;
mod process;
mod producer;

pub use carrier::{HeadersExtractor, OwnedHeadersInjector};
pub use consumer::{
    ConsumeError, Record, StatsContext, TracedConsumer, BROKER, BROKER_RTT_AVERAGE, BROKER_RTT_P99,
    CLIENT_QUEUE, FETCH_QUEUE,
};
pub use describe::{error_type, Server};
pub use ext::{FutureProducerExt, FutureRecordExt, MessageExt};
pub use mqtrace::settle::ConsumerStats;
pub use process::{RecordTracer, SettleRefused, CONSUMER_LAG};
pub use producer::TracedProducer;

/// `tracing` targets of rdkafka itself, whose spans a `tracing` to OpenTelemetry
/// bridge should leave out (they would bury the application's): give them to
/// `mqtrace_telemetry::TelemetryBuilder::quiet_targets`.
pub const CLIENT_TARGETS: &[&str] = &["rdkafka"];
