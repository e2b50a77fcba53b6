//! Instrumenting a consumer loop of one's own: process spans and settlement for
//! lapin's own [`Delivery`].

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Acker;
use lapin::{BasicProperties, Channel, Confirmation};
use mqtrace::settle::{Forward, Routes, Settled, Settlement, Settler};
use mqtrace::{
    Attempt, ForwardKind, HandlerResult, Inbound, Instrumenter, MessageDescription, Processed,
};
use opentelemetry::propagation::Extractor;
use opentelemetry::KeyValue;

use crate::acks::{AckBatch, AckCoalescer};
use crate::carrier::{FieldTableExtractor, FieldTableInjector};
use crate::describe::{delivery_description, error_type, publish_description, Server};
use crate::publisher::record_confirmation;
use crate::topology::{short, DeadLetter, QueueSpec};

/// `mqtrace.rabbitmq.redelivered`: the delivery's `redelivered` flag. The
/// conventions have no name for it.
pub const REDELIVERED: &str = "mqtrace.rabbitmq.redelivered";

/// Traces deliveries of one queue for a consumer loop of your own: runs the
/// handler inside the `process` span and settles each delivery the way
/// [`crate::TracedConsumer`] does (it is built on this), with the same spans,
/// decisions and counts.
///
/// ```no_run
/// # async fn run(channel: lapin::Channel) -> Result<(), lapin::Error> {
/// use futures_util::StreamExt as _;
/// use lapin::options::BasicConsumeOptions;
/// use lapin::types::FieldTable;
/// use mqtrace::{HandlerError, Instrumenter};
/// use mqtrace_lapin::{DeliveryTracer, QueueSpec};
///
/// let queue = QueueSpec::new("billing").dead_letter("billing.dlx", "billing.dead");
/// queue.declare(&channel).await?;
/// let tracer = DeliveryTracer::new(Instrumenter::default(), &queue);
/// let mut deliveries = channel
///     .basic_consume("billing".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
///     .await?;
/// while let Some(delivery) = deliveries.next().await {
///     let delivery = delivery?;
///     let body = &delivery.data;
///     let processed = tracer
///         .process(&delivery, |attempt| async move {
///             let order: serde_json::Value =
///                 serde_json::from_slice(body).map_err(HandlerError::permanent)?;
///             tracing::info!(%order, attempt = attempt.number(), "billing");
///             Ok(())
///         })
///         .await;
///     // Ack, retry or dead-letter by the outcome, inside the process span.
///     let settled = tracer.settle(processed, delivery, &channel).await;
///     tracing::debug!(?settled.disposition);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct DeliveryTracer {
    instrumenter: Instrumenter,
    queue: String,
    dead_letter: Option<DeadLetter>,
    retry_via: Option<(String, String)>,
    server: Option<Server>,
    unconfirmed_forwards: bool,
    /// One forward in flight at a time, across the tracer's clones: lapin hands
    /// a publish's confirm the oldest return it holds, not necessarily that
    /// publish's own, so two forwards in flight on a channel could swap a
    /// return and ack the original of the one that was not routed.
    forwarding: std::sync::Arc<tokio::sync::Mutex<()>>,
}

// === impl DeliveryTracer ===

impl DeliveryTracer {
    /// Traces deliveries from `queue`, whose dead-letter exchange (if any) takes
    /// permanent failures and spent retry budgets.
    pub fn new(instrumenter: Instrumenter, queue: &QueueSpec) -> Self {
        Self {
            instrumenter,
            queue: queue.name().to_owned(),
            dead_letter: queue.dead_letter_of().cloned(),
            retry_via: None,
            server: None,
            unconfirmed_forwards: false,
            forwarding: std::sync::Arc::default(),
        }
    }

    /// The broker's address, recorded as `server.address` / `server.port` (see
    /// [`Server::from_uri`]).
    pub fn server(mut self, server: Option<Server>) -> Self {
        self.server = server;
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

    /// Whether a retry or dead-letter copy published on a channel that is not in
    /// confirm mode counts as stored (default: no).
    ///
    /// A forward is published with `mandatory` and counts as stored only once the
    /// broker has confirmed it and routed it to a queue; only then is the
    /// original acked. Without confirm mode ([`Channel::confirm_select`]) the
    /// broker says neither, so by default such a forward is not published at
    /// all: the original is requeued, an error on the forward span says why, and
    /// nothing is lost. Turn this on only if losing a forward the broker dropped
    /// (an exchange with no binding, a dead-letter queue deleted) is acceptable.
    pub fn unconfirmed_forwards(mut self, on: bool) -> Self {
        self.unconfirmed_forwards = on;
        self
    }

    /// Emit an `ack` / `nack` span (CLIENT) per settlement (default: the
    /// instrumenter's setting).
    pub fn settle_spans(mut self, on: bool) -> Self {
        self.instrumenter = self.instrumenter.with_settle_spans(on);
        self
    }

    /// The instrumenter.
    pub fn instrumenter(&self) -> &Instrumenter {
        &self.instrumenter
    }

    /// The queue's name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Runs `handler` inside the delivery's `process` span (CONSUMER; every
    /// attribute, the queue time from the `timestamp` property, the attempt, the
    /// error status). The handler is told the [`Attempt`]. The span stays open in
    /// the [`Processed`] until [`DeliveryTracer::settle`] (or
    /// [`Processed::finish`], for those who settle by hand).
    pub async fn process<F, Fut>(&self, delivery: &Delivery, handler: F) -> Processed
    where
        F: FnOnce(Attempt) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        let incoming = self.incoming(Parts::of(delivery));
        self.instrumenter.process_with(&incoming, handler).await
    }

    /// Settles a processed delivery by its outcome: ack; a retry republished
    /// through `channel` (confirmed when the channel is in confirm mode) and then
    /// acked; a permanent failure rejected to the queue's dead-letter exchange; a
    /// spent budget republished there with mqtrace's failure metadata and acked.
    /// Ends the process span with the disposition.
    pub async fn settle(
        &self,
        processed: Processed,
        delivery: Delivery,
        channel: &Channel,
    ) -> Settled {
        let Delivery {
            exchange,
            routing_key,
            redelivered,
            delivery_tag,
            properties,
            data,
            acker,
            ..
        } = delivery;
        let parts = Parts {
            exchange: exchange.as_str(),
            routing_key: routing_key.as_str(),
            redelivered,
            delivery_tag,
            properties: &properties,
            body: &data,
        };
        self.settle_parts(processed, parts, acker, channel, None)
            .await
    }

    /// [`DeliveryTracer::settle`] with the ack coalesced: a delivery settled by
    /// an ack joins `acks`'s pending run, sent as one `basic.ack` with
    /// `multiple` within 5 ms, on `acks`'s channel; nacks and forwards go at once.
    /// With settle spans on, each ack is sent on its own (a settle span describes
    /// one call).
    pub async fn settle_coalesced(
        &self,
        processed: Processed,
        delivery: Delivery,
        acks: &AckCoalescer,
    ) -> Settled {
        if self.instrumenter.settle_spans_on() {
            return self.settle(processed, delivery, acks.channel()).await;
        }
        let acker = delivery.acker.clone();
        self.settle_parts_coalesced(processed, Parts::of(&delivery), acker, acks)
            .await
    }

    /// Settles with the ack joining `acks`'s run (what the full consumer and
    /// [`DeliveryTracer::settle_coalesced`] share).
    pub(crate) async fn settle_parts_coalesced(
        &self,
        processed: Processed,
        parts: Parts<'_>,
        acker: Acker,
        acks: &AckCoalescer,
    ) -> Settled {
        let settled = self
            .settle_parts(processed, parts, acker, acks.channel(), Some(acks.batch()))
            .await;
        acks.batch().finished(parts.delivery_tag);
        // A run that cannot be sent is logged; the broker delivers it again.
        acks.settled().await;
        settled
    }

    pub(crate) fn incoming<'a>(&'a self, parts: Parts<'a>) -> Incoming<'a> {
        Incoming {
            parts,
            queue: &self.queue,
            server: self.server.as_ref(),
        }
    }

    pub(crate) async fn settle_parts(
        &self,
        processed: Processed,
        parts: Parts<'_>,
        acker: Acker,
        channel: &Channel,
        acks: Option<&AckBatch>,
    ) -> Settled {
        let (retry_exchange, retry_key) = match &self.retry_via {
            Some((e, k)) => (e.as_str(), k.as_str()),
            None => ("", self.queue.as_str()),
        };
        let settler = LapinSettler {
            parts,
            acker,
            acks,
            channel,
            tracer: self,
            retry_exchange,
            retry_key,
        };
        self.instrumenter.settle(processed, settler).await
    }
}

/// The fields of a delivery that tracing and settlement read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Parts<'a> {
    pub(crate) exchange: &'a str,
    pub(crate) routing_key: &'a str,
    pub(crate) redelivered: bool,
    pub(crate) delivery_tag: u64,
    pub(crate) properties: &'a BasicProperties,
    pub(crate) body: &'a [u8],
}

impl<'a> Parts<'a> {
    fn of(delivery: &'a Delivery) -> Self {
        Self {
            exchange: delivery.exchange.as_str(),
            routing_key: delivery.routing_key.as_str(),
            redelivered: delivery.redelivered,
            delivery_tag: delivery.delivery_tag,
            properties: &delivery.properties,
            body: &delivery.data,
        }
    }
}

/// A delivery with where it was consumed, for the core.
pub(crate) struct Incoming<'a> {
    parts: Parts<'a>,
    queue: &'a str,
    server: Option<&'a Server>,
}

impl Inbound for Incoming<'_> {
    fn description(&self) -> MessageDescription {
        let p = &self.parts;
        let mut d = delivery_description(
            p.exchange,
            p.routing_key,
            self.queue,
            p.properties,
            p.body.len(),
            self.server,
        );
        d.delivery_tag = Some(p.delivery_tag);
        d.extra.push(KeyValue::new(REDELIVERED, p.redelivered));
        d
    }

    fn headers(&self) -> impl Extractor + '_ {
        HeadersOf(self.parts.properties.headers().as_ref())
    }

    fn body(&self) -> &[u8] {
        self.parts.body
    }

    fn broker_timestamp(&self) -> Option<SystemTime> {
        let secs = (*self.parts.properties.timestamp())?;
        UNIX_EPOCH.checked_add(Duration::from_secs(secs))
    }

    fn delivery_count(&self) -> Option<u32> {
        // Quorum queues count earlier deliveries; classic queues only flag them.
        let counted = self
            .parts
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
            None if self.parts.redelivered => 2,
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

/// Why an ack or nack did not reach the broker.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// The broker or the connection answered with an error.
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    /// lapin did not send it: the delivery's channel has closed (or the delivery
    /// was settled already). The broker hands the message out again.
    #[error("not sent: the delivery's channel is closed or the delivery was already settled")]
    NotSent,
}

/// RabbitMQ's operations on one delivery, for the core's lifecycle.
struct LapinSettler<'a> {
    parts: Parts<'a>,
    acker: Acker,
    /// The full consumer's coalesced acks; `None` acks each delivery at once.
    acks: Option<&'a AckBatch>,
    channel: &'a Channel,
    tracer: &'a DeliveryTracer,
    retry_exchange: &'a str,
    retry_key: &'a str,
}

impl LapinSettler<'_> {
    /// Exchange and routing key of a forward.
    fn route(&self, kind: ForwardKind, exchange: &str) -> (String, String) {
        match kind {
            ForwardKind::Retry => (self.retry_exchange.to_owned(), self.retry_key.to_owned()),
            // The dead-letter exchange is a fanout: the original key goes along.
            ForwardKind::DeadLetter => (exchange.to_owned(), self.parts.routing_key.to_owned()),
        }
    }
}

impl Settler for LapinSettler<'_> {
    type Error = SettleError;

    fn routes(&self) -> Routes<'_> {
        let dead_letter = self.tracer.dead_letter.as_ref();
        Routes::forward_retries(self.retry_exchange)
            .dead_letter(dead_letter.map(|d| d.exchange.as_str()))
            // A queue's dead-letter exchange takes what is rejected.
            .broker_dead_letter(dead_letter.is_some())
    }

    fn describe_forward(&self, kind: ForwardKind, target: &str) -> MessageDescription {
        let (exchange, routing_key) = self.route(kind, target);
        publish_description(
            &exchange,
            &routing_key,
            self.parts.properties,
            self.parts.body.len(),
            self.tracer.server.as_ref(),
        )
    }

    fn forward(&self, forward: Forward<'_>) -> impl Future<Output = bool> + Send {
        let (exchange, routing_key) = self.route(forward.kind, forward.target);
        let original = self.parts.properties;
        let mut headers = FieldTable::default();
        if let Some(h) = original.headers() {
            for (k, v) in h {
                if !forward.replaces(k.as_str()) {
                    headers.insert(k.clone(), v.clone());
                }
            }
        }
        let mut injector = FieldTableInjector(&mut headers);
        for (k, v) in forward.headers {
            opentelemetry::propagation::Injector::set(&mut injector, &k, v);
        }
        let properties = original.clone().with_headers(headers);
        let channel = self.channel;
        let body = self.parts.body;
        let span = forward.span;
        let unconfirmed = self.tracer.unconfirmed_forwards;
        let forwarding = &self.tracer.forwarding;
        async move {
            let confirms = channel.status().confirm();
            if !confirms && !unconfirmed {
                span.record_failure(
                    "unconfirmed",
                    &crate::publisher::Refused(
                        "not published: the channel is not in confirm mode, so the broker \
                         would not say whether the copy was stored (confirm_select, or \
                         DeliveryTracer::unconfirmed_forwards)"
                            .into(),
                    ),
                );
                tracing::error!(target: "mqtrace", exchange, routing_key, "a forward needs a channel in confirm mode; the message is requeued instead");
                return false;
            }
            // Held from the publish until its confirm (and any return) is in.
            let _one_at_a_time = forwarding.lock().await;
            let result = async {
                channel
                    .basic_publish(
                        short(&exchange)?,
                        short(&routing_key)?,
                        // An unroutable copy comes back (a return) instead of
                        // being dropped and confirmed.
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        body,
                        properties,
                    )
                    .await?
                    .await
            }
            .await;
            record_confirmation(span, &result);
            match result {
                // Confirmed and routed.
                Ok(Confirmation::Ack(None)) => true,
                // Opted into: the frame was written, the broker says nothing.
                Ok(Confirmation::NotRequested) => unconfirmed,
                // Returned (unroutable), refused, or not sent.
                Ok(Confirmation::Ack(Some(_)) | Confirmation::Nack(_)) | Err(_) => false,
            }
        }
    }

    fn settle_name(&self, settlement: Settlement) -> Option<&'static str> {
        match settlement {
            Settlement::Ack => Some("ack"),
            Settlement::Redeliver | Settlement::Reject => Some("nack"),
            Settlement::Leave => None,
        }
    }

    fn settle(
        self,
        settlement: Settlement,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let acker = self.acker;
        let coalesced = self
            .acks
            .filter(|_| settlement == Settlement::Ack)
            .map(|acks| acks.acked(self.parts.delivery_tag));
        async move {
            if coalesced.is_some() {
                return Ok(());
            }
            let done = match settlement {
                Settlement::Ack => acker.ack(BasicAckOptions::default()).await,
                Settlement::Redeliver | Settlement::Reject => {
                    acker
                        .nack(BasicNackOptions {
                            requeue: settlement == Settlement::Redeliver,
                            ..BasicNackOptions::default()
                        })
                        .await
                }
                Settlement::Leave => return Ok(()),
            };
            match done {
                Ok(true) => Ok(()),
                // lapin answers `false` when the channel has closed (or the
                // delivery was settled already): nothing reached the broker.
                Ok(false) => Err(SettleError::NotSent),
                Err(e) => Err(SettleError::Broker(e)),
            }
        }
    }

    fn error_type(error: &Self::Error) -> String {
        match error {
            SettleError::Broker(e) => error_type(e),
            SettleError::NotSent => "channel-closed".to_owned(),
        }
    }
}
