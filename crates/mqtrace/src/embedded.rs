//! An in-process broker: named queues with headers, ack, nack, redelivery counts and
//! dead-letter queues, plus the traced producer and consumer that the broker adapters
//! also offer. It runs the `mqtrace demo`, documentation examples, and users' own
//! tests of their handlers, with no broker to install.
//!
//! Deliveries that are dropped without being settled go back to their queue (with
//! their delivery count raised), so a consumer that stops mid-message loses nothing.
//!
//! ```
//! use mqtrace::embedded::{Broker, Message, QueueOptions, TracedConsumer, TracedProducer};
//! use mqtrace::{HandlerError, Instrumenter};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = Broker::new();
//! broker.declare_queue("orders", QueueOptions::default().dead_letter("orders.dlq"));
//! broker.declare_queue("orders.dlq", QueueOptions::default());
//!
//! let instrumenter = Instrumenter::default();
//! let producer = TracedProducer::new(broker.clone(), instrumenter.clone());
//! producer.send("orders", Message::new(r#"{"id":1}"#)).await?;
//!
//! let consumer = TracedConsumer::new(broker.clone(), "orders", instrumenter);
//! let stats = consumer
//!     .run_until_idle(|message| async move {
//!         serde_json::from_slice::<serde_json::Value>(&message.body)
//!             .map_err(HandlerError::permanent)?;
//!         Ok(())
//!     })
//!     .await?;
//! assert_eq!(stats.settled, 1);
//! # Ok(()) }
//! ```

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use bytes::Bytes;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::KeyValue;
use tokio::sync::Notify;

use crate::conventions::attr;
use crate::describe::{MessageDescription, MessagingSystem, OperationType, Text};
use crate::forward::{Disposition, ForwardKind};
use crate::instrument::{Inbound, Instrumenter};
use crate::outcome::HandlerResult;
use crate::settle::{ConsumerCounters, Forward, Routes, Settled, Settlement, Settler};

/// Message headers: an ordered list of byte values under string keys, which may
/// repeat (as Kafka's do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, Bytes)>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a header, replacing every entry with the same key.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Bytes>) {
        let key = key.into();
        self.0.retain(|(k, _)| !k.eq_ignore_ascii_case(&key));
        self.0.push((key, value.into()));
    }

    /// Adds an entry, keeping any with the same key.
    pub fn append(&mut self, key: impl Into<String>, value: impl Into<Bytes>) {
        self.0.push((key.into(), value.into()));
    }

    /// The value of a key that occurs exactly once (keys compare case-insensitively).
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        let mut found = self.0.iter().filter(|(k, _)| k.eq_ignore_ascii_case(key));
        let first = found.next()?;
        if found.next().is_some() {
            return None;
        }
        Some(&first.1)
    }

    /// The entries, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_ref()))
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

/// Reads trace context from [`Headers`]. A key that repeats, or whose value is not
/// UTF-8, reads as absent.
#[derive(Debug, Clone, Copy)]
pub struct HeaderExtractor<'a>(pub &'a Headers);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let matches = self
            .0
             .0
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(key))
            .count();
        if matches > 1 {
            tracing::debug!(target: "mqtrace", key, matches, "header repeated: ignored");
            return None;
        }
        let value = self.0.get(key)?;
        match std::str::from_utf8(value) {
            Ok(s) => Some(s),
            Err(_) => {
                tracing::debug!(target: "mqtrace", key, "header is not UTF-8: ignored");
                None
            }
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0 .0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// Writes trace context into [`Headers`].
#[derive(Debug)]
pub struct HeaderInjector<'a>(pub &'a mut Headers);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

/// A message to publish.
#[derive(Debug, Clone, Default)]
pub struct Message {
    /// Headers.
    pub headers: Headers,
    /// Body bytes.
    pub body: Bytes,
}

impl Message {
    /// A message with this body and no headers.
    pub fn new(body: impl Into<Bytes>) -> Self {
        Self {
            headers: Headers::new(),
            body: body.into(),
        }
    }

    /// Adds a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.insert(key, value);
        self
    }
}

/// A message as stored by the broker.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StoredMessage {
    /// Broker-assigned id, unique per broker.
    pub id: u64,
    /// Headers.
    pub headers: Headers,
    /// Body bytes.
    pub body: Bytes,
    /// When the broker accepted it.
    pub published_at: SystemTime,
    /// Deliveries so far, this one included.
    pub delivery_count: u32,
    /// The attempt as mqtrace counts it (forwarded retries included), on the
    /// message handed to a [`TracedConsumer`]'s handler; 0 in the queue.
    pub attempt: u32,
}

/// Options of a queue.
#[derive(Debug, Clone, Default)]
pub struct QueueOptions {
    dead_letter: Option<String>,
}

impl QueueOptions {
    /// Messages rejected without requeue, or dead-lettered by a consumer, go here.
    pub fn dead_letter(mut self, queue: impl Into<String>) -> Self {
        self.dead_letter = Some(queue.into());
        self
    }
}

/// Errors of the embedded broker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The queue was never declared.
    #[error("unknown queue {0:?}")]
    UnknownQueue(String),
}

/// How many messages a queue holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct QueueDepth {
    /// Waiting for a consumer.
    pub ready: usize,
    /// Delivered and not yet settled.
    pub unacked: usize,
}

#[derive(Debug, Default)]
struct Queue {
    /// Its name, shared with every delivery's description.
    name: Text,
    ready: VecDeque<StoredMessage>,
    unacked: HashMap<u64, StoredMessage>,
    options: QueueOptions,
}

#[derive(Debug, Default)]
struct State {
    queues: HashMap<String, Queue>,
    next_id: u64,
    next_tag: u64,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    notify: Notify,
}

/// The in-memory broker. Cheap to clone; clones share the queues.
#[derive(Debug, Clone, Default)]
pub struct Broker {
    shared: Arc<Shared>,
}

// === impl Broker ===

impl Broker {
    /// An empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock; if one ever did, the queues
        // are still consistent (every mutation is a single move).
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates a queue, or updates its options.
    pub fn declare_queue(&self, name: impl Into<String>, options: QueueOptions) {
        let name = name.into();
        let text = Text::from(name.as_str());
        let mut state = self.state();
        let queue = state.queues.entry(name).or_default();
        queue.name = text;
        queue.options = options;
    }

    /// Stores a message at the tail of a queue; returns its id.
    pub fn publish(&self, queue: &str, message: Message) -> Result<u64, BrokerError> {
        let mut state = self.state();
        state.next_id += 1;
        let id = state.next_id;
        let q = state
            .queues
            .get_mut(queue)
            .ok_or_else(|| BrokerError::UnknownQueue(queue.to_owned()))?;
        q.ready.push_back(StoredMessage {
            id,
            headers: message.headers,
            body: message.body,
            published_at: SystemTime::now(),
            delivery_count: 0,
            attempt: 0,
        });
        drop(state);
        self.shared.notify.notify_waiters();
        Ok(id)
    }

    /// Takes the next ready message, if any.
    pub fn try_receive(&self, queue: &str) -> Result<Option<Delivery>, BrokerError> {
        let mut state = self.state();
        state.next_tag += 1;
        let tag = state.next_tag;
        let q = state
            .queues
            .get_mut(queue)
            .ok_or_else(|| BrokerError::UnknownQueue(queue.to_owned()))?;
        let Some(mut message) = q.ready.pop_front() else {
            return Ok(None);
        };
        message.delivery_count += 1;
        q.unacked.insert(tag, message.clone());
        Ok(Some(Delivery {
            broker: self.clone(),
            queue: q.name.clone(),
            tag,
            message,
            settled: false,
        }))
    }

    /// Waits for the next message.
    pub async fn receive(&self, queue: &str) -> Result<Delivery, BrokerError> {
        loop {
            let notified = self.shared.notify.notified();
            if let Some(delivery) = self.try_receive(queue)? {
                return Ok(delivery);
            }
            notified.await;
        }
    }

    /// How many messages a queue holds.
    pub fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        let state = self.state();
        let q = state
            .queues
            .get(queue)
            .ok_or_else(|| BrokerError::UnknownQueue(queue.to_owned()))?;
        Ok(QueueDepth {
            ready: q.ready.len(),
            unacked: q.unacked.len(),
        })
    }

    /// Removes and returns every ready message of a queue (e.g. to inspect a
    /// dead-letter queue).
    pub fn drain(&self, queue: &str) -> Result<Vec<StoredMessage>, BrokerError> {
        let mut state = self.state();
        let q = state
            .queues
            .get_mut(queue)
            .ok_or_else(|| BrokerError::UnknownQueue(queue.to_owned()))?;
        Ok(q.ready.drain(..).collect())
    }

    /// The dead-letter queue of a queue.
    pub fn dead_letter_of(&self, queue: &str) -> Option<String> {
        self.state()
            .queues
            .get(queue)
            .and_then(|q| q.options.dead_letter.clone())
    }

    fn settle(&self, queue: &str, tag: u64, action: Action) {
        let mut state = self.state();
        let Some(q) = state.queues.get_mut(queue) else {
            return;
        };
        let Some(message) = q.unacked.remove(&tag) else {
            return;
        };
        let dead_letter = q.options.dead_letter.clone();
        match action {
            Action::Ack => {}
            Action::Requeue => q.ready.push_back(message),
            Action::Reject => {
                if let Some(dlq) = dead_letter.and_then(|d| state.queues.get_mut(&d)) {
                    dlq.ready.push_back(message);
                }
            }
        }
        drop(state);
        self.shared.notify.notify_waiters();
    }
}

#[derive(Clone, Copy)]
enum Action {
    Ack,
    Requeue,
    Reject,
}

/// A message handed to a consumer. Settle it with [`Delivery::ack`] or
/// [`Delivery::nack`]; dropped unsettled, it goes back to its queue.
#[derive(Debug)]
pub struct Delivery {
    broker: Broker,
    queue: Text,
    tag: u64,
    message: StoredMessage,
    settled: bool,
}

// === impl Delivery ===

impl Delivery {
    /// The message.
    pub fn message(&self) -> &StoredMessage {
        &self.message
    }

    /// The queue it came from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Done with it: removes it from the queue.
    pub fn ack(mut self) {
        self.settled = true;
        self.broker.settle(&self.queue, self.tag, Action::Ack);
    }

    /// Rejects it: back to the queue when `requeue`, otherwise to the queue's
    /// dead-letter queue (or gone, when it has none).
    pub fn nack(mut self, requeue: bool) {
        self.settled = true;
        let action = if requeue {
            Action::Requeue
        } else {
            Action::Reject
        };
        self.broker.settle(&self.queue, self.tag, action);
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if !self.settled {
            self.broker.settle(&self.queue, self.tag, Action::Requeue);
        }
    }
}

impl Inbound for Delivery {
    fn description(&self) -> MessageDescription {
        MessageDescription::new(MessagingSystem::Embedded, OperationType::Process)
            .destination(self.queue.clone())
            .message_id(self.message.id.to_string())
            .body_size(self.message.body.len())
    }

    fn headers(&self) -> impl Extractor + '_ {
        HeaderExtractor(&self.message.headers)
    }

    fn body(&self) -> &[u8] {
        &self.message.body
    }

    fn broker_timestamp(&self) -> Option<SystemTime> {
        Some(self.message.published_at)
    }

    fn delivery_count(&self) -> Option<u32> {
        Some(self.message.delivery_count)
    }
}

fn send_description(queue: &str, body_len: usize) -> MessageDescription {
    MessageDescription::new(MessagingSystem::Embedded, OperationType::Send)
        .destination(queue)
        .body_size(body_len)
}

/// Publishes with a `send` span (PRODUCER) whose context travels in the headers.
#[derive(Debug, Clone)]
pub struct TracedProducer {
    broker: Broker,
    instrumenter: Instrumenter,
}

impl TracedProducer {
    /// Wraps a broker.
    pub fn new(broker: Broker, instrumenter: Instrumenter) -> Self {
        Self {
            broker,
            instrumenter,
        }
    }

    /// The broker.
    pub fn inner(&self) -> &Broker {
        &self.broker
    }

    /// Publishes a message; the span ends when the broker has stored it and records
    /// the message id.
    pub async fn send(&self, queue: &str, mut message: Message) -> Result<u64, BrokerError> {
        let d = send_description(queue, message.body.len());
        let span = self.instrumenter.start_send(&d, Some(&message.body));
        self.instrumenter
            .inject(&span, &mut HeaderInjector(&mut message.headers));
        let result = self.broker.publish(queue, message);
        match &result {
            Ok(id) => span.set_attribute(KeyValue::new(attr::MESSAGING_MESSAGE_ID, id.to_string())),
            Err(e) => span.record_failure("unknown_queue", e),
        }
        span.end();
        result
    }
}

pub use crate::settle::ConsumerStats;

/// Consumes a queue: each message is processed inside a `process` span and settled
/// by its outcome (behaviour of every mqtrace consumer):
///
/// - success: ack;
/// - transient failure within the retry budget: forwarded to the retry queue (the
///   source queue unless set) with a forward span, then acked;
/// - permanent failure or budget spent: forwarded to the dead-letter queue with its
///   metadata, then acked; with no dead-letter queue, rejected (`dropped` on the span).
///
/// The forward is published before the ack, so a crash in between duplicates a
/// message but never loses it.
#[derive(Debug, Clone)]
pub struct TracedConsumer {
    broker: Broker,
    queue: String,
    retry_queue: Option<String>,
    instrumenter: Instrumenter,
}

impl TracedConsumer {
    /// A consumer of `queue`.
    pub fn new(broker: Broker, queue: impl Into<String>, instrumenter: Instrumenter) -> Self {
        Self {
            broker,
            queue: queue.into(),
            retry_queue: None,
            instrumenter,
        }
    }

    /// Where retries go (default: back to the source queue).
    pub fn retry_queue(mut self, queue: impl Into<String>) -> Self {
        self.retry_queue = Some(queue.into());
        self
    }

    /// Emit an `ack`/`nack` span (CLIENT) per settlement (default: the
    /// instrumenter's setting, off unless set).
    pub fn settle_spans(mut self, on: bool) -> Self {
        self.instrumenter = self.instrumenter.with_settle_spans(on);
        self
    }

    /// Waits for one message and processes it.
    pub async fn process_next<H, Fut>(&self, handler: H) -> Result<Disposition, BrokerError>
    where
        H: FnOnce(StoredMessage) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        let delivery = self.broker.receive(&self.queue).await?;
        Ok(self.handle(delivery, handler).await.disposition)
    }

    /// Processes messages one at a time until the queue is empty (retries included).
    pub async fn run_until_idle<H, Fut>(&self, handler: H) -> Result<ConsumerStats, BrokerError>
    where
        H: Fn(StoredMessage) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        let counters = ConsumerCounters::new();
        while let Some(delivery) = self.broker.try_receive(&self.queue)? {
            counters.record(&self.handle(delivery, &handler).await);
        }
        Ok(counters.snapshot())
    }

    /// Processes up to `concurrency` messages at once on tokio tasks until the queue
    /// is empty and nothing is in flight. Each task keeps its message's context.
    pub async fn run_concurrent<H, Fut>(
        &self,
        concurrency: usize,
        handler: H,
    ) -> Result<ConsumerStats, BrokerError>
    where
        H: Fn(StoredMessage) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let counters = ConsumerCounters::new();
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            while tasks.len() < concurrency.max(1) {
                let Some(delivery) = self.broker.try_receive(&self.queue)? else {
                    break;
                };
                let this = self.clone();
                let handler = handler.clone();
                tasks.spawn(async move { this.handle(delivery, handler).await });
            }
            match tasks.join_next().await {
                Some(Ok(settled)) => counters.record(&settled),
                // A task can only fail by panicking outside the handler (the handler's
                // own panics are caught); its delivery went back to the queue on drop.
                Some(Err(e)) => {
                    tracing::warn!(target: "mqtrace", error = %e, "consumer task failed")
                }
                None => break,
            }
        }
        Ok(counters.snapshot())
    }

    async fn handle<H, Fut>(&self, delivery: Delivery, handler: H) -> Settled
    where
        H: FnOnce(StoredMessage) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        let instrumenter = &self.instrumenter;
        let processed = instrumenter
            .process_with(&delivery, |attempt| {
                let mut message = delivery.message().clone();
                message.attempt = attempt.number();
                handler(message)
            })
            .await;
        let settler = EmbeddedSettler {
            dead_letter: self.broker.dead_letter_of(&self.queue),
            retry: self.retry_queue.as_deref().unwrap_or(&self.queue),
            delivery,
        };
        instrumenter.settle(processed, settler).await
    }
}

/// The embedded broker's operations on one delivery, for the core's lifecycle.
struct EmbeddedSettler<'a> {
    delivery: Delivery,
    retry: &'a str,
    dead_letter: Option<String>,
}

impl Settler for EmbeddedSettler<'_> {
    type Error = std::convert::Infallible;

    fn routes(&self) -> Routes<'_> {
        Routes::forward_retries(self.retry).dead_letter(self.dead_letter.as_deref())
    }

    fn describe_forward(&self, _: ForwardKind, target: &str) -> MessageDescription {
        send_description(target, self.delivery.message.body.len())
    }

    fn forward(&self, forward: Forward<'_>) -> impl Future<Output = bool> + Send {
        let original = self.delivery.message();
        let mut headers = Headers::new();
        for (k, v) in original.headers.iter() {
            if !forward.replaces(k) {
                headers.append(k, Bytes::copy_from_slice(v));
            }
        }
        for (k, v) in forward.headers {
            headers.insert(k, v);
        }
        let result = self.delivery.broker.publish(
            forward.target,
            Message {
                headers,
                body: original.body.clone(),
            },
        );
        match &result {
            Ok(id) => forward
                .span
                .set_attribute(KeyValue::new(attr::MESSAGING_MESSAGE_ID, id.to_string())),
            Err(e) => forward.span.record_failure("unknown_queue", e),
        }
        std::future::ready(result.is_ok())
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
        match settlement {
            Settlement::Ack => self.delivery.ack(),
            Settlement::Redeliver => self.delivery.nack(true),
            Settlement::Reject => self.delivery.nack(false),
            // Dropped unsettled, a delivery goes back to its queue.
            Settlement::Leave => drop(self.delivery),
        }
        std::future::ready(Ok(()))
    }

    fn error_type(error: &Self::Error) -> String {
        match *error {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsettled_deliveries_return_to_the_queue() -> Result<(), BrokerError> {
        let broker = Broker::new();
        broker.declare_queue("q", QueueOptions::default());
        broker.publish("q", Message::new("a"))?;
        let delivery = broker.try_receive("q")?;
        assert_eq!(
            broker.depth("q")?,
            QueueDepth {
                ready: 0,
                unacked: 1
            }
        );
        drop(delivery);
        assert_eq!(
            broker.depth("q")?,
            QueueDepth {
                ready: 1,
                unacked: 0
            }
        );
        let again = broker.try_receive("q")?.map(|d| d.message().delivery_count);
        assert_eq!(again, Some(2));
        Ok(())
    }

    #[test]
    fn reject_goes_to_the_dead_letter_queue() -> Result<(), BrokerError> {
        let broker = Broker::new();
        broker.declare_queue("q", QueueOptions::default().dead_letter("dlq"));
        broker.declare_queue("dlq", QueueOptions::default());
        broker.publish("q", Message::new("a"))?;
        if let Some(d) = broker.try_receive("q")? {
            d.nack(false);
        }
        assert_eq!(broker.depth("q")?, QueueDepth::default());
        assert_eq!(broker.drain("dlq")?.len(), 1);
        assert_eq!(
            broker.publish("nope", Message::new("x")),
            Err(BrokerError::UnknownQueue("nope".into()))
        );
        Ok(())
    }

    #[test]
    fn repeated_and_non_utf8_headers_read_as_absent() {
        let mut h = Headers::new();
        h.append("traceparent", "a");
        h.append("TraceParent", "b");
        h.insert("x", vec![0xff, 0xfe]);
        h.insert("ok", "yes");
        let e = HeaderExtractor(&h);
        assert_eq!(e.get("traceparent"), None);
        assert_eq!(e.get("x"), None);
        assert_eq!(e.get("OK"), Some("yes"));
    }
}
