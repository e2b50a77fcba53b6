//! Traced consuming: process spans, settlement by outcome, reconnection.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::protocol::AMQPErrorKind;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ErrorKind};
use mqtrace::settle::{ConsumerCounters, ConsumerStats, Settled};
#[cfg(feature = "json")]
use mqtrace::HandlerError;
use mqtrace::{HandlerResult, Instrumenter};
use tokio::task::JoinSet;

use crate::acks::AckCoalescer;
use crate::carrier::FieldTableExtractor;
use crate::describe::Server;
use crate::process::{DeliveryTracer, Parts};
use crate::topology::{short, QueueSpec};

/// A delivered message as the handler sees it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Message {
    inner: Arc<MessageInner>,
    attempt: u32,
}

#[derive(Debug)]
struct MessageInner {
    exchange: String,
    routing_key: String,
    redelivered: bool,
    delivery_tag: u64,
    properties: BasicProperties,
    body: Vec<u8>,
}

// === impl Message ===

impl Message {
    /// Which delivery attempt this is (1 = first), counting mqtrace's retries and
    /// the broker's redeliveries.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.inner.body
    }

    /// The exchange it was published to (empty for the default exchange).
    pub fn exchange(&self) -> &str {
        &self.inner.exchange
    }

    /// Its routing key.
    pub fn routing_key(&self) -> &str {
        &self.inner.routing_key
    }

    /// Whether the broker delivered it before.
    pub fn redelivered(&self) -> bool {
        self.inner.redelivered
    }

    /// The delivery tag on the consumer's channel.
    pub fn delivery_tag(&self) -> u64 {
        self.inner.delivery_tag
    }

    /// Its properties, headers included.
    pub fn properties(&self) -> &BasicProperties {
        &self.inner.properties
    }

    /// A header's value when it is a UTF-8 string (see [`FieldTableExtractor`]).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.inner
            .properties
            .headers()
            .as_ref()
            .and_then(|h| FieldTableExtractor(h).value(name))
    }

    /// The body decoded as JSON. Invalid JSON is a permanent failure
    /// (`error.type = invalid_json`): retrying cannot fix it, so the message is
    /// rejected to the dead-letter exchange instead of being redelivered.
    #[cfg(feature = "json")]
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(&self.inner.body)
            .map_err(|e| HandlerError::permanent(e).with_type("invalid_json"))
    }
}

/// Why [`TracedConsumer::run_until`] stopped before being asked to.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// The URI is not a valid AMQP URI.
    #[error("invalid AMQP URI: {0}")]
    Uri(String),
    /// The broker refused the set-up (access refused, queue declared with other
    /// arguments...): retrying would not help.
    #[error("the broker refused the consumer's set-up: {0}")]
    Refused(#[source] lapin::Error),
}

/// Consumes a queue of a RabbitMQ broker: each delivery is processed inside a
/// `process` span (CONSUMER) and settled by its outcome, after the handler has
/// finished:
///
/// - success: ack;
/// - transient failure within the retry budget: republished (to the queue itself
///   through the default exchange, unless [`TracedConsumer::retry_via`] says
///   otherwise) with a forward span and the attempt counter, confirmed, then acked.
///   Retries are bounded: the message never loops forever;
/// - transient failure with the budget spent: republished to the dead-letter
///   exchange with mqtrace's failure metadata and the original body, then acked;
/// - permanent failure (invalid JSON among them): nack without requeue, so the
///   queue's dead-letter exchange takes it (`dropped` when it has none).
///
/// Forwards are confirmed before the ack, so a crash in between duplicates a
/// message but never loses it. When the connection fails the consumer lets the
/// handlers in flight finish, reconnects with exponential back-off, declares its
/// queue again and continues; the broker redelivers what was not acknowledged.
#[derive(Debug, Clone)]
pub struct TracedConsumer {
    uri: String,
    queue: QueueSpec,
    tracer: DeliveryTracer,
    prefetch: u16,
    concurrency: usize,
    consumer_tag: String,
    backoff: (Duration, Duration),
    /// Ack frames sent, shared by the consumer's clones.
    ack_frames: Arc<AtomicU64>,
}

// === impl TracedConsumer ===

impl TracedConsumer {
    /// A consumer of `queue` on the broker at `uri` (`amqp://user:pass@host:port/vhost`).
    /// The queue is declared, with its bindings and dead-letter exchange, on
    /// every connection.
    pub fn new(uri: impl Into<String>, queue: QueueSpec, instrumenter: Instrumenter) -> Self {
        let uri = uri.into();
        Self {
            tracer: DeliveryTracer::new(instrumenter, &queue).server(Server::from_uri(&uri)),
            uri,
            queue,
            prefetch: 10,
            concurrency: 1,
            consumer_tag: String::new(),
            backoff: (Duration::from_millis(100), Duration::from_secs(5)),
            ack_frames: Arc::default(),
        }
    }

    /// `basic.ack` frames sent so far. Acks are coalesced (unless settle spans
    /// are on, which describe one ack each): a delivery settled by an ack waits
    /// up to 5 ms, or until half the prefetch window is settled, and one ack
    /// with `multiple` covers every settled delivery below the lowest one still
    /// being handled. A crash in between means redelivery, never loss.
    pub fn ack_frames(&self) -> u64 {
        self.ack_frames.load(Ordering::Relaxed)
    }

    /// Unacknowledged deliveries the broker may push ahead (QoS; default 10).
    pub fn prefetch(mut self, count: u16) -> Self {
        self.prefetch = count.max(1);
        self
    }

    /// Handlers run at once, each on its own task (default 1: in order).
    pub fn concurrency(mut self, tasks: usize) -> Self {
        self.concurrency = tasks.max(1);
        self
    }

    /// The consumer tag (default: the broker picks one).
    pub fn consumer_tag(mut self, tag: impl Into<String>) -> Self {
        self.consumer_tag = tag.into();
        self
    }

    /// Retries are published to `exchange` with `routing_key` (e.g. a delay queue
    /// that dead-letters back), instead of straight back to the queue.
    pub fn retry_via(
        mut self,
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
    ) -> Self {
        self.tracer = self.tracer.retry_via(exchange, routing_key);
        self
    }

    /// Emit an `ack` / `nack` span (CLIENT) per settlement (default: the
    /// instrumenter's setting, off unless set).
    pub fn settle_spans(mut self, on: bool) -> Self {
        self.tracer = self.tracer.settle_spans(on);
        self
    }

    /// First and longest wait between reconnection attempts (default 100 ms, 5 s).
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = (initial, max.max(initial));
        self
    }

    /// Consumes until `shutdown` completes, then lets the handlers in flight finish
    /// and settle, and closes the connection. Connection failures are retried for
    /// as long as it runs; only a set-up the broker refuses ends it early.
    pub async fn run_until<H, Fut, S>(
        &self,
        handler: H,
        shutdown: S,
    ) -> Result<ConsumerStats, ConsumeError>
    where
        H: Fn(Message) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
        S: Future<Output = ()>,
    {
        if Server::from_uri(&self.uri).is_none() {
            return Err(ConsumeError::Uri(redact(&self.uri)));
        }
        let this = Arc::new(self.clone());
        let counters = ConsumerCounters::new();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut wait = self.backoff.0;
        loop {
            match this.session(&handler, &counters, shutdown.as_mut()).await {
                Ok(SessionEnd::Shutdown) => return Ok(counters.snapshot()),
                Ok(SessionEnd::Lost { consumed }) => {
                    if consumed {
                        wait = self.backoff.0;
                    }
                }
                Err(e) if refused(&e) => return Err(ConsumeError::Refused(e)),
                Err(e) => {
                    tracing::debug!(target: "mqtrace", error = %e, "cannot connect to RabbitMQ");
                }
            }
            tracing::info!(target: "mqtrace", queue = self.queue.name(), wait_ms = wait.as_millis() as u64, "RabbitMQ connection lost; reconnecting");
            tokio::select! {
                () = shutdown.as_mut() => return Ok(counters.snapshot()),
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(self.backoff.1);
        }
    }

    async fn session<H, Fut, S>(
        self: &Arc<Self>,
        handler: &H,
        counters: &ConsumerCounters,
        mut shutdown: std::pin::Pin<&mut S>,
    ) -> lapin::Result<SessionEnd>
    where
        H: Fn(Message) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
        S: Future<Output = ()>,
    {
        let connection = Connection::connect(&self.uri, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        self.queue.declare(&channel).await?;
        let mut deliveries = channel
            .basic_consume(
                short(self.queue.name())?,
                short(&self.consumer_tag)?,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        counters.connection();
        let mut consumed = false;
        let mut tasks = JoinSet::new();
        // Coalesced acks, unless each ack has a span of its own.
        let acks = (!self.tracer.instrumenter().settle_spans_on()).then(|| {
            AckCoalescer::counting(channel.clone(), Arc::clone(&self.ack_frames))
                .prefetch(self.prefetch)
        });
        let shutdown_asked = loop {
            tokio::select! {
                biased;
                () = shutdown.as_mut() => break true,
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = joined {
                        tracing::warn!(target: "mqtrace", error = %e, "consumer task failed");
                    }
                }
                next = deliveries.next(), if tasks.len() < self.concurrency => match next {
                    Some(Ok(delivery)) => {
                        consumed = true;
                        let this = Arc::clone(self);
                        let channel = channel.clone();
                        let handler = handler.clone();
                        let counters = counters.clone();
                        let acks = acks.clone();
                        if let Some(acks) = &acks {
                            // In the stream's order, before the task starts.
                            acks.arrived(delivery.delivery_tag);
                        }
                        tasks.spawn(async move {
                            let settled = this
                                .handle(&channel, delivery, handler, acks.as_ref())
                                .await;
                            counters.record(&settled);
                        });
                    }
                    Some(Err(e)) => {
                        tracing::warn!(target: "mqtrace", error = %e, "RabbitMQ consumer failed");
                        break false;
                    }
                    None => break false,
                },
            }
        };
        // Handlers in flight finish either way; after a lost connection their
        // settlement fails and the broker redelivers those messages.
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = joined {
                tracing::warn!(target: "mqtrace", error = %e, "consumer task failed");
            }
        }
        // After a lost connection these fail, and the broker delivers them again.
        if let Some(acks) = &acks {
            counters.settle_failures(acks.flush().await);
        }
        if shutdown_asked {
            let _ = channel.close(200, "consumer stopped".into()).await;
            let _ = connection.close(200, "consumer stopped".into()).await;
            return Ok(SessionEnd::Shutdown);
        }
        Ok(SessionEnd::Lost { consumed })
    }

    async fn handle<H, Fut>(
        &self,
        channel: &Channel,
        delivery: lapin::message::Delivery,
        handler: H,
        acks: Option<&AckCoalescer>,
    ) -> Settled
    where
        H: Fn(Message) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        let lapin::message::Delivery {
            delivery_tag,
            exchange,
            routing_key,
            redelivered,
            properties,
            data,
            acker,
            ..
        } = delivery;
        let inner = Arc::new(MessageInner {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            redelivered,
            delivery_tag,
            properties,
            body: data,
        });
        let parts = Parts {
            exchange: &inner.exchange,
            routing_key: &inner.routing_key,
            redelivered,
            delivery_tag,
            properties: &inner.properties,
            body: &inner.body,
        };
        let incoming = self.tracer.incoming(parts);
        let processed = self
            .tracer
            .instrumenter()
            .process_with(&incoming, |attempt| {
                handler(Message {
                    inner: Arc::clone(&inner),
                    attempt: attempt.number(),
                })
            })
            .await;
        match acks {
            Some(acks) => {
                self.tracer
                    .settle_parts_coalesced(processed, parts, acker, acks)
                    .await
            }
            None => {
                self.tracer
                    .settle_parts(processed, parts, acker, channel, None)
                    .await
            }
        }
    }
}

enum SessionEnd {
    Shutdown,
    Lost { consumed: bool },
}

/// A refusal no reconnection can cure: a soft AMQP error during set-up.
fn refused(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(p) if matches!(p.kind(), AMQPErrorKind::Soft(_)))
}

/// The URI without its user info, for error messages.
fn redact(uri: &str) -> String {
    match (uri.split_once("://"), uri.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, rest))) => format!("{scheme}://{rest}"),
        _ => uri.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_redaction_drops_credentials() {
        assert_eq!(redact("amqp://u:p@h:1/%2f"), "amqp://h:1/%2f");
        assert_eq!(redact("amqp://h"), "amqp://h");
    }
}
