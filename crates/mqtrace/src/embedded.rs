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
use crate::describe::{MessageDescription, MessagingSystem, OperationType};
use crate::forward::{Disposition, ForwardKind};
use crate::instrument::{Inbound, Instrumenter, Processed};
use crate::outcome::HandlerResult;

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
pub struct QueueDepth {
    /// Waiting for a consumer.
    pub ready: usize,
    /// Delivered and not yet settled.
    pub unacked: usize,
}

#[derive(Debug, Default)]
struct Queue {
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
        self.state().queues.entry(name.into()).or_default().options = options;
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
            queue: queue.to_owned(),
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

    fn settle(&self, queue: &str, tag: u64, action: Settlement) {
        let mut state = self.state();
        let Some(q) = state.queues.get_mut(queue) else {
            return;
        };
        let Some(message) = q.unacked.remove(&tag) else {
            return;
        };
        let dead_letter = q.options.dead_letter.clone();
        match action {
            Settlement::Ack => {}
            Settlement::Requeue => q.ready.push_back(message),
            Settlement::Reject => {
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
enum Settlement {
    Ack,
    Requeue,
    Reject,
}

/// A message handed to a consumer. Settle it with [`Delivery::ack`] or
/// [`Delivery::nack`]; dropped unsettled, it goes back to its queue.
#[derive(Debug)]
pub struct Delivery {
    broker: Broker,
    queue: String,
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
        self.broker.settle(&self.queue, self.tag, Settlement::Ack);
    }

    /// Rejects it: back to the queue when `requeue`, otherwise to the queue's
    /// dead-letter queue (or gone, when it has none).
    pub fn nack(mut self, requeue: bool) {
        self.settled = true;
        let action = if requeue {
            Settlement::Requeue
        } else {
            Settlement::Reject
        };
        self.broker.settle(&self.queue, self.tag, action);
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if !self.settled {
            self.broker
                .settle(&self.queue, self.tag, Settlement::Requeue);
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

/// What a consumer did with the messages it processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConsumerStats {
    /// Handled successfully and acknowledged.
    pub settled: u64,
    /// Forwarded for another attempt.
    pub retried: u64,
    /// Forwarded to the dead-letter queue.
    pub dead_lettered: u64,
    /// Permanent failures removed because the queue has no dead-letter queue.
    pub dropped: u64,
}

impl ConsumerStats {
    fn count(&mut self, disposition: Disposition) {
        match disposition {
            Disposition::Settle => self.settled += 1,
            Disposition::Retry => self.retried += 1,
            Disposition::DeadLetter => self.dead_lettered += 1,
            Disposition::Drop => self.dropped += 1,
        }
    }
}

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
    settle_spans: bool,
}

impl TracedConsumer {
    /// A consumer of `queue`.
    pub fn new(broker: Broker, queue: impl Into<String>, instrumenter: Instrumenter) -> Self {
        Self {
            broker,
            queue: queue.into(),
            retry_queue: None,
            instrumenter,
            settle_spans: false,
        }
    }

    /// Where retries go (default: back to the source queue).
    pub fn retry_queue(mut self, queue: impl Into<String>) -> Self {
        self.retry_queue = Some(queue.into());
        self
    }

    /// Emit an `ack`/`nack` span (CLIENT) per settlement (default: off).
    pub fn settle_spans(mut self, on: bool) -> Self {
        self.settle_spans = on;
        self
    }

    /// Waits for one message and processes it.
    pub async fn process_next<H, Fut>(&self, handler: H) -> Result<Disposition, BrokerError>
    where
        H: FnOnce(StoredMessage) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        let delivery = self.broker.receive(&self.queue).await?;
        Ok(self.handle(delivery, handler).await)
    }

    /// Processes messages one at a time until the queue is empty (retries included).
    pub async fn run_until_idle<H, Fut>(&self, handler: H) -> Result<ConsumerStats, BrokerError>
    where
        H: Fn(StoredMessage) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        let mut stats = ConsumerStats::default();
        while let Some(delivery) = self.broker.try_receive(&self.queue)? {
            stats.count(self.handle(delivery, &handler).await);
        }
        Ok(stats)
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
        let mut stats = ConsumerStats::default();
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
                Some(Ok(disposition)) => stats.count(disposition),
                // A task can only fail by panicking outside the handler (the handler's
                // own panics are caught); its delivery went back to the queue on drop.
                Some(Err(e)) => {
                    tracing::warn!(target: "mqtrace", error = %e, "consumer task failed")
                }
                None => break,
            }
        }
        Ok(stats)
    }

    async fn handle<H, Fut>(&self, delivery: Delivery, handler: H) -> Disposition
    where
        H: FnOnce(StoredMessage) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        let instrumenter = &self.instrumenter;
        let processed = instrumenter
            .process(&delivery, handler(delivery.message().clone()))
            .await;
        let dead_letter = self.broker.dead_letter_of(&self.queue);
        let mut disposition =
            processed.disposition(instrumenter.retry_policy(), dead_letter.is_some());
        let target = match disposition {
            Disposition::Retry => Some((
                ForwardKind::Retry,
                self.retry_queue
                    .clone()
                    .unwrap_or_else(|| self.queue.clone()),
            )),
            Disposition::DeadLetter => dead_letter.map(|q| (ForwardKind::DeadLetter, q)),
            Disposition::Settle | Disposition::Drop => None,
        };
        let settle_name = match disposition {
            Disposition::Drop => "nack",
            _ => "ack",
        };
        let forwarded = match target {
            Some((kind, queue)) => self.forward(&processed, &delivery, kind, &queue),
            None => true,
        };
        let settle_span = self.settle_spans.then(|| {
            let d = delivery.description().for_operation(
                OperationType::Settle,
                Some(if forwarded { settle_name } else { "nack" }),
            );
            instrumenter.start_settle(&d, processed.span())
        });
        if !forwarded {
            // The forward failed: keep the message where it is for another try.
            disposition = Disposition::Retry;
            delivery.nack(true);
        } else if disposition == Disposition::Drop {
            delivery.nack(false);
        } else {
            delivery.ack();
        }
        if let Some(span) = settle_span {
            span.end();
        }
        // The handler's error is already on the span.
        let _ = processed.finish(disposition);
        disposition
    }

    fn forward(
        &self,
        processed: &Processed,
        delivery: &Delivery,
        kind: ForwardKind,
        queue: &str,
    ) -> bool {
        let original = delivery.message();
        let mut headers = Headers::new();
        for (k, v) in original.headers.iter() {
            if !self.instrumenter.is_managed_header(k) {
                headers.append(k, Bytes::copy_from_slice(v));
            }
        }
        let d = send_description(queue, original.body.len());
        let span =
            self.instrumenter
                .start_forward(processed, kind, &d, &mut HeaderInjector(&mut headers));
        let result = self.broker.publish(
            queue,
            Message {
                headers,
                body: original.body.clone(),
            },
        );
        match &result {
            Ok(id) => span.set_attribute(KeyValue::new(attr::MESSAGING_MESSAGE_ID, id.to_string())),
            Err(e) => span.record_failure("unknown_queue", e),
        }
        span.end();
        result.is_ok()
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
