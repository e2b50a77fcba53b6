//! Traced consuming: process spans, settlement by outcome, reconnection.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::protocol::AMQPErrorKind;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ErrorKind};
use mqtrace::{
    Disposition, ForwardKind, HandlerError, HandlerResult, Inbound, Instrumenter,
    MessageDescription, OperationType, Processed, Retryable,
};
use opentelemetry::propagation::Extractor;
use opentelemetry::KeyValue;
use tokio::task::JoinSet;

use crate::carrier::{FieldTableExtractor, FieldTableInjector};
use crate::describe::{delivery_description, error_type, publish_description, Server};
use crate::publisher::record_confirmation;
use crate::topology::{short, QueueSpec};

/// `mqtrace.rabbitmq.redelivered`: the delivery's `redelivered` flag. The
/// conventions have no name for it.
pub const REDELIVERED: &str = "mqtrace.rabbitmq.redelivered";

/// A delivered message as the handler sees it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Message(Arc<MessageInner>);

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
    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.0.body
    }

    /// The exchange it was published to (empty for the default exchange).
    pub fn exchange(&self) -> &str {
        &self.0.exchange
    }

    /// Its routing key.
    pub fn routing_key(&self) -> &str {
        &self.0.routing_key
    }

    /// Whether the broker delivered it before.
    pub fn redelivered(&self) -> bool {
        self.0.redelivered
    }

    /// The delivery tag on the consumer's channel.
    pub fn delivery_tag(&self) -> u64 {
        self.0.delivery_tag
    }

    /// Its properties, headers included.
    pub fn properties(&self) -> &BasicProperties {
        &self.0.properties
    }

    /// A header's value when it is a UTF-8 string (see [`FieldTableExtractor`]).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.0
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
        serde_json::from_slice(&self.0.body)
            .map_err(|e| HandlerError::permanent(e).with_type("invalid_json"))
    }
}

/// A message together with where it was consumed, for the core.
struct Incoming<'a> {
    message: &'a Message,
    queue: &'a str,
    server: Option<&'a Server>,
}

impl Inbound for Incoming<'_> {
    fn description(&self) -> MessageDescription {
        let m = &self.message.0;
        let mut d = delivery_description(
            &m.exchange,
            &m.routing_key,
            self.queue,
            &m.properties,
            m.body.len(),
            self.server,
        );
        d.delivery_tag = Some(m.delivery_tag);
        d.extra.push(KeyValue::new(REDELIVERED, m.redelivered));
        d
    }

    fn headers(&self) -> impl Extractor + '_ {
        HeadersOf(self.message.0.properties.headers().as_ref())
    }

    fn body(&self) -> &[u8] {
        &self.message.0.body
    }

    fn broker_timestamp(&self) -> Option<SystemTime> {
        let secs = (*self.message.0.properties.timestamp())?;
        UNIX_EPOCH.checked_add(Duration::from_secs(secs))
    }

    fn delivery_count(&self) -> Option<u32> {
        // Quorum queues count earlier deliveries; classic queues only flag them.
        let counted = self
            .message
            .0
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count"))
            .and_then(|v| match v {
                AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
                AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
                AMQPValue::LongUInt(n) => Some(*n),
                _ => None,
            });
        Some(match counted {
            Some(n) => n.saturating_add(1),
            None if self.message.0.redelivered => 2,
            None => 1,
        })
    }
}

/// Headers that may be absent.
struct HeadersOf<'a>(Option<&'a FieldTable>);

impl Extractor for HeadersOf<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.and_then(|h| FieldTableExtractor(h).value(key))
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .map(|h| FieldTableExtractor(h).names())
            .unwrap_or_default()
    }
}

/// What a consumer did, counted over its whole run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConsumerStats {
    /// Handled successfully and acknowledged.
    pub settled: u64,
    /// Republished for another attempt, then acknowledged.
    pub retried: u64,
    /// Sent to the dead-letter exchange: rejected (permanent failures) or
    /// republished with failure metadata (retry budget spent).
    pub dead_lettered: u64,
    /// Permanent failures rejected from a queue without a dead-letter exchange.
    pub dropped: u64,
    /// Returned to the queue because forwarding failed.
    pub requeued: u64,
    /// Acks or nacks that did not reach the broker (the connection was gone); the
    /// broker redelivers those messages.
    pub settle_failures: u64,
    /// Connections established (1 plus reconnections).
    pub connections: u64,
}

#[derive(Debug, Default)]
struct Counters([AtomicU64; 7]);

impl Counters {
    fn add(&self, i: usize) {
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }
    fn count(&self, d: Disposition, requeued: bool) {
        self.add(match (d, requeued) {
            (_, true) => 4,
            (Disposition::Settle, _) => 0,
            (Disposition::Retry, _) => 1,
            (Disposition::DeadLetter, _) => 2,
            (Disposition::Drop, _) => 3,
        });
    }
    fn snapshot(&self) -> ConsumerStats {
        let n = |i: usize| self.0[i].load(Ordering::Relaxed);
        ConsumerStats {
            settled: n(0),
            retried: n(1),
            dead_lettered: n(2),
            dropped: n(3),
            requeued: n(4),
            settle_failures: n(5),
            connections: n(6),
        }
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
    instrumenter: Instrumenter,
    prefetch: u16,
    concurrency: usize,
    consumer_tag: String,
    retry_via: Option<(String, String)>,
    settle_spans: bool,
    backoff: (Duration, Duration),
    server: Option<Server>,
}

// === impl TracedConsumer ===

impl TracedConsumer {
    /// A consumer of `queue` on the broker at `uri` (`amqp://user:pass@host:port/vhost`).
    /// The queue is declared, with its bindings and dead-letter exchange, on
    /// every connection.
    pub fn new(uri: impl Into<String>, queue: QueueSpec, instrumenter: Instrumenter) -> Self {
        let uri = uri.into();
        Self {
            server: Server::from_uri(&uri),
            uri,
            queue,
            instrumenter,
            prefetch: 10,
            concurrency: 1,
            consumer_tag: String::new(),
            retry_via: None,
            settle_spans: false,
            backoff: (Duration::from_millis(100), Duration::from_secs(5)),
        }
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
        self.retry_via = Some((exchange.into(), routing_key.into()));
        self
    }

    /// Emit an `ack` / `nack` span (CLIENT) per settlement (default: off).
    pub fn settle_spans(mut self, on: bool) -> Self {
        self.settle_spans = on;
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
        let counters = Arc::new(Counters::default());
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
        counters: &Arc<Counters>,
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
        counters.add(6);
        let mut consumed = false;
        let mut tasks = JoinSet::new();
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
                        let counters = Arc::clone(counters);
                        tasks.spawn(async move {
                            this.handle(&channel, delivery, handler, &counters).await
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
        counters: &Counters,
    ) -> Disposition
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
        let message = Message(Arc::new(MessageInner {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            redelivered,
            delivery_tag,
            properties,
            body: data,
        }));
        let incoming = Incoming {
            message: &message,
            queue: self.queue.name(),
            server: self.server.as_ref(),
        };
        let instrumenter = &self.instrumenter;
        let processed = instrumenter
            .process(&incoming, handler(message.clone()))
            .await;
        let dead_letter = self.queue.dead_letter_of();
        let mut disposition =
            processed.disposition(instrumenter.retry_policy(), dead_letter.is_some());
        let permanent =
            matches!(processed.outcome(), Err(e) if e.retryable() == Retryable::Permanent);
        let mut requeued = false;
        let settlement = match (disposition, dead_letter) {
            (Disposition::Settle, _) => Settlement::Ack,
            (Disposition::Retry, _) => {
                let (exchange, routing_key) = match &self.retry_via {
                    Some((e, k)) => (e.as_str(), k.as_str()),
                    None => ("", self.queue.name()),
                };
                let forwarded = self
                    .forward(
                        channel,
                        &processed,
                        &message,
                        ForwardKind::Retry,
                        exchange,
                        routing_key,
                    )
                    .await;
                if forwarded {
                    Settlement::Ack
                } else {
                    requeued = true;
                    Settlement::Requeue
                }
            }
            // The broker's dead-lettering moves it; no copy needed.
            (Disposition::DeadLetter, _) if permanent => Settlement::Reject,
            (Disposition::DeadLetter, Some(dl)) => {
                let forwarded = self
                    .forward(
                        channel,
                        &processed,
                        &message,
                        ForwardKind::DeadLetter,
                        &dl.exchange,
                        message.routing_key(),
                    )
                    .await;
                // Should the republish fail, rejecting still dead-letters it
                // (without mqtrace's metadata).
                if forwarded {
                    Settlement::Ack
                } else {
                    Settlement::Reject
                }
            }
            (Disposition::DeadLetter | Disposition::Drop, _) => Settlement::Reject,
        };
        if requeued {
            disposition = Disposition::Retry;
        }
        let settle_span = self.settle_spans.then(|| {
            let d = incoming
                .description()
                .for_operation(OperationType::Settle, Some(settlement.name()));
            instrumenter.start_settle(&d, processed.span())
        });
        let result = match settlement {
            Settlement::Ack => acker.ack(BasicAckOptions::default()).await,
            Settlement::Reject | Settlement::Requeue => {
                acker
                    .nack(BasicNackOptions {
                        requeue: settlement == Settlement::Requeue,
                        ..BasicNackOptions::default()
                    })
                    .await
            }
        };
        if let Err(e) = &result {
            counters.add(5);
            tracing::warn!(target: "mqtrace", error = %e, delivery_tag, "settlement failed; the broker will redeliver");
            if let Some(span) = &settle_span {
                span.record_failure(&error_type(e), e);
            }
        }
        if let Some(span) = settle_span {
            span.end();
        }
        counters.count(disposition, requeued);
        let _ = processed.finish(disposition);
        disposition
    }

    /// Republishes the message's original bytes with the forward span's headers;
    /// true once the broker has confirmed it.
    async fn forward(
        &self,
        channel: &Channel,
        processed: &Processed,
        message: &Message,
        kind: ForwardKind,
        exchange: &str,
        routing_key: &str,
    ) -> bool {
        let original = message.properties();
        let mut headers = FieldTable::default();
        if let Some(h) = original.headers() {
            for (k, v) in h {
                if !self.instrumenter.is_managed_header(k.as_str()) {
                    headers.insert(k.clone(), v.clone());
                }
            }
        }
        let d = publish_description(
            exchange,
            routing_key,
            original,
            message.body().len(),
            self.server.as_ref(),
        );
        let span = self.instrumenter.start_forward(
            processed,
            kind,
            &d,
            &mut FieldTableInjector(&mut headers),
        );
        let properties = original.clone().with_headers(headers);
        let result = async {
            channel
                .basic_publish(
                    short(exchange)?,
                    short(routing_key)?,
                    BasicPublishOptions::default(),
                    message.body(),
                    properties,
                )
                .await?
                .await
        }
        .await;
        record_confirmation(&span, &result);
        span.end();
        matches!(result, Ok(lapin::Confirmation::Ack(None)))
    }
}

enum SessionEnd {
    Shutdown,
    Lost { consumed: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settlement {
    Ack,
    Reject,
    Requeue,
}

impl Settlement {
    fn name(self) -> &'static str {
        match self {
            Self::Ack => "ack",
            Self::Reject | Self::Requeue => "nack",
        }
    }
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
