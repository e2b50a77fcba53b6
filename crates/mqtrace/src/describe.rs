//! The neutral description of a messaging operation.
//!
//! An adapter turns a broker's message into a [`MessageDescription`]; the core turns
//! that description into spans. Nothing here knows which conventions are in force.

use std::borrow::{Borrow, Cow};
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use opentelemetry::trace::SpanKind;
use opentelemetry::{KeyValue, StringValue, Value};

/// A description's text (a destination, a group, a message id...), shared: a
/// clone counts a reference instead of copying, so the same text goes on the
/// span, on the metric stream and into the next message's description without
/// an allocation. An adapter makes the texts that repeat (the destination, the
/// consumer group, the client id and broker address) once and clones them per
/// message.
#[derive(Clone)]
pub struct Text(Repr);

#[derive(Clone)]
enum Repr {
    Static(&'static str),
    Shared(Arc<str>),
}

impl Text {
    /// A text that lives as long as the program: nothing is allocated.
    pub const fn from_static(text: &'static str) -> Self {
        Self(Repr::Static(text))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Static(s) => s,
            Repr::Shared(s) => s,
        }
    }
}

impl Default for Text {
    /// The empty text.
    fn default() -> Self {
        Self::from_static("")
    }
}

impl Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Text {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for Text {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        // The same shared text (an adapter's destination, group or partition
        // against a metric stream's key) is equal without reading it.
        match (&self.0, &other.0) {
            (Repr::Shared(a), Repr::Shared(b)) if Arc::ptr_eq(a, b) => true,
            (Repr::Static(a), Repr::Static(b)) if std::ptr::eq(*a, *b) => true,
            _ => self.as_str() == other.as_str(),
        }
    }
}

impl Eq for Text {}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Text {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl PartialOrd for Text {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Text {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl std::hash::Hash for Text {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl From<&str> for Text {
    fn from(text: &str) -> Self {
        Self(Repr::Shared(Arc::from(text)))
    }
}

impl From<&String> for Text {
    fn from(text: &String) -> Self {
        Self::from(text.as_str())
    }
}

impl From<String> for Text {
    fn from(text: String) -> Self {
        Self(Repr::Shared(Arc::from(text)))
    }
}

impl From<Arc<str>> for Text {
    fn from(text: Arc<str>) -> Self {
        Self(Repr::Shared(text))
    }
}

impl From<Cow<'static, str>> for Text {
    fn from(text: Cow<'static, str>) -> Self {
        match text {
            Cow::Borrowed(s) => Self::from_static(s),
            Cow::Owned(s) => Self::from(s),
        }
    }
}

impl From<Text> for StringValue {
    fn from(text: Text) -> Self {
        match text.0 {
            Repr::Static(s) => StringValue::from(s),
            Repr::Shared(s) => StringValue::from(s),
        }
    }
}

impl From<Text> for Value {
    fn from(text: Text) -> Self {
        Value::String(text.into())
    }
}

/// What an adapter made last from a string (a topic, a queue URL) and hands out
/// again while the string stays the same: a loop's messages nearly all share
/// their destination, so its texts are made once per run, not per message. Kept
/// per thread (`thread_local!`), where no lock is needed.
///
/// ```
/// use mqtrace::{LastMade, Text};
///
/// thread_local! {
///     static TOPIC: LastMade<Text> = const { LastMade::new() };
/// }
/// let a = TOPIC.with(|last| last.get("orders", Text::clone));
/// let b = TOPIC.with(|last| last.get("orders", |_| unreachable!("made once")));
/// assert_eq!(a, b);
/// ```
pub struct LastMade<T>(std::cell::RefCell<Option<(Text, T)>>);

impl<T: Clone> LastMade<T> {
    /// Nothing made yet.
    pub const fn new() -> Self {
        Self(std::cell::RefCell::new(None))
    }

    /// What `make` makes of `key` (given as a text), made again only when `key`
    /// differs from the last one.
    pub fn get(&self, key: &str, make: impl FnOnce(&Text) -> T) -> T {
        if let Some((last, made)) = &*self.0.borrow() {
            if last.as_str() == key {
                return made.clone();
            }
        }
        let text = Text::from(key);
        let made = make(&text);
        *self.0.borrow_mut() = Some((text, made.clone()));
        made
    }
}

impl<T: Clone> Default for LastMade<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for LastMade<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LastMade").finish_non_exhaustive()
    }
}

/// The kind of messaging operation, as `messaging.operation.type` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OperationType {
    /// A message is created (one `create` span per message of a batch send).
    Create,
    /// One or more messages are handed to the broker.
    Send,
    /// The application pulls messages.
    Receive,
    /// The application processes a message (the handler).
    Process,
    /// A message is acknowledged, rejected or committed.
    Settle,
}

impl OperationType {
    /// The `messaging.operation.type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Send => "send",
            Self::Receive => "receive",
            Self::Process => "process",
            Self::Settle => "settle",
        }
    }

    /// The span kind the current conventions give this operation. `Send` is PRODUCER
    /// when its context is the creation context; a batch send that links to `create`
    /// spans is CLIENT, which [`crate::Instrumenter::start_batch_send`] decides.
    pub fn span_kind(self) -> SpanKind {
        match self {
            Self::Create | Self::Send => SpanKind::Producer,
            Self::Receive | Self::Settle => SpanKind::Client,
            Self::Process => SpanKind::Consumer,
        }
    }

    /// The `messaging.operation` value of the legacy conventions.
    pub fn legacy_name(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Send => "publish",
            Self::Receive => "receive",
            Self::Process => "process",
            Self::Settle => "settle",
        }
    }
}

/// The messaging system, as `messaging.system` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MessagingSystem {
    /// Apache Kafka.
    Kafka,
    /// RabbitMQ.
    RabbitMq,
    /// Amazon SQS.
    AwsSqs,
    /// mqtrace's embedded in-memory broker.
    Embedded,
    /// Another system; the value must be low-cardinality.
    Other(&'static str),
}

impl MessagingSystem {
    /// The `messaging.system` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kafka => "kafka",
            Self::RabbitMq => "rabbitmq",
            Self::AwsSqs => "aws_sqs",
            Self::Embedded => "mqtrace",
            Self::Other(name) => name,
        }
    }
}

/// Where a message goes or comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Destination {
    /// `messaging.destination.name`: topic, queue, or RabbitMQ's composed name.
    pub name: Option<Text>,
    /// `messaging.destination.template`, when the name is built from one.
    pub template: Option<Text>,
    /// The destination only lives as long as its client (e.g. an exclusive queue).
    pub temporary: bool,
    /// The destination has a broker-generated name.
    pub anonymous: bool,
    /// The name under [`Conventions::Legacy`](crate::Conventions::Legacy), where it
    /// differs (RabbitMQ: the exchange rather than `{exchange}:{routing key}`).
    pub legacy_name: Option<Text>,
}

/// Everything an adapter knows about one messaging operation: the system, the
/// operation, and the message (or batch) it concerns. Fields that are `None` are
/// left off the span.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct MessageDescription {
    /// The messaging system.
    pub system: MessagingSystem,
    /// The operation type.
    pub operation: OperationType,
    /// The system-specific operation name (`poll`, `publish`, `ack`...). Defaults to
    /// the operation type's name.
    pub operation_name: Option<Cow<'static, str>>,
    /// The destination.
    pub destination: Destination,
    /// The partition, as a string (`messaging.destination.partition.id`).
    pub partition: Option<Text>,
    /// Kafka offset.
    pub offset: Option<i64>,
    /// Kafka message key, when it is a string.
    pub key: Option<Text>,
    /// Kafka tombstone (null body).
    pub tombstone: bool,
    /// Broker-assigned or application message id.
    pub message_id: Option<Text>,
    /// Conversation id (AMQP correlation id).
    pub conversation_id: Option<Text>,
    /// Body size in bytes.
    pub body_size: Option<u64>,
    /// Consumer group.
    pub consumer_group: Option<Text>,
    /// RabbitMQ routing key.
    pub routing_key: Option<Text>,
    /// RabbitMQ delivery tag.
    pub delivery_tag: Option<u64>,
    /// Client id of the producer or consumer.
    pub client_id: Option<Text>,
    /// Broker host name or address, without user information.
    pub server_address: Option<Text>,
    /// Broker port.
    pub server_port: Option<u16>,
    /// Number of messages, for operations on a batch.
    pub batch_message_count: Option<u64>,
    /// A span name of the system's own, used as it is under every conventions
    /// setting (Lambda's `{event source} process`). `None`: the conventions' name.
    pub span_name: Option<Text>,
    /// System-specific attributes the conventions have no name for (documented by
    /// each adapter). Emitted as they are under every conventions setting.
    pub extra: Vec<KeyValue>,
}

impl MessageDescription {
    /// A description with only the system and the operation filled in.
    pub fn new(system: MessagingSystem, operation: OperationType) -> Self {
        Self {
            system,
            operation,
            operation_name: None,
            destination: Destination::default(),
            partition: None,
            offset: None,
            key: None,
            tombstone: false,
            message_id: None,
            conversation_id: None,
            body_size: None,
            consumer_group: None,
            routing_key: None,
            delivery_tag: None,
            client_id: None,
            server_address: None,
            server_port: None,
            batch_message_count: None,
            span_name: None,
            extra: Vec::new(),
        }
    }

    /// The operation name that goes on the span (`messaging.operation.name`).
    pub fn operation_name(&self) -> &str {
        self.operation_name
            .as_deref()
            .unwrap_or_else(|| self.operation.as_str())
    }

    /// The same description for another operation (e.g. the `settle` of a processed
    /// message), keeping the message's fields.
    pub fn for_operation(&self, operation: OperationType, name: Option<&'static str>) -> Self {
        let mut other = self.clone();
        other.operation = operation;
        other.operation_name = name.map(Cow::Borrowed);
        other
    }

    /// Sets the destination name.
    pub fn destination(mut self, name: impl Into<Text>) -> Self {
        self.destination.name = Some(name.into());
        self
    }

    /// Sets the system-specific operation name.
    pub fn operation_named(mut self, name: &'static str) -> Self {
        self.operation_name = Some(Cow::Borrowed(name));
        self
    }

    /// Sets the message id.
    pub fn message_id(mut self, id: impl Into<Text>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// Sets the body size.
    pub fn body_size(mut self, size: usize) -> Self {
        self.body_size = Some(size as u64);
        self
    }

    /// Sets the broker address and port.
    pub fn server(mut self, address: impl Into<Text>, port: Option<u16>) -> Self {
        self.server_address = Some(address.into());
        self.server_port = port;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(text: &Text) -> Option<&Arc<str>> {
        match &text.0 {
            Repr::Shared(s) => Some(s),
            Repr::Static(_) => None,
        }
    }

    #[test]
    fn texts_are_shared_not_copied() {
        let text = Text::from(String::from("orders"));
        let copy = text.clone();
        let (a, b) = (shared(&text), shared(&copy));
        assert!(a.zip(b).is_some_and(|(a, b)| Arc::ptr_eq(a, b)));
        // On a span, the same text.
        match Value::from(copy) {
            Value::String(s) => assert_eq!(s.as_str(), "orders"),
            other => panic!("not a string: {other:?}"),
        }
        assert_eq!(text, "orders");
        assert_eq!(text, String::from("orders"));
        let mut sorted = vec![Text::from("b"), Text::from_static("a")];
        sorted.sort();
        assert_eq!(sorted, ["a", "b"]);
        assert_eq!(format!("{text} {text:?}"), "orders \"orders\"");
        assert!(shared(&Text::from_static("orders")).is_none());
        assert_ne!(text, Text::from("orderz"));
        assert_ne!(text, Text::from("order"));
        assert_eq!(Text::from_static("orders"), text);
    }

    #[test]
    fn the_last_made_is_made_again_only_for_another_key() {
        let last: LastMade<(Text, usize)> = LastMade::new();
        let mut made = 0;
        let mut get = |key: &str| {
            last.get(key, |text| {
                made += 1;
                (text.clone(), made)
            })
        };
        assert_eq!(get("a").1, 1);
        assert_eq!(get("a").1, 1);
        assert_eq!(get("b"), (Text::from("b"), 2));
        assert_eq!(get("a").1, 3);
    }
}
