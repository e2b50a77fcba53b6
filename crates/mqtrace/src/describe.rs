//! The neutral description of a messaging operation.
//!
//! An adapter turns a broker's message into a [`MessageDescription`]; the core turns
//! that description into spans. Nothing here knows which conventions are in force.

use std::borrow::Cow;

use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;

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
    pub name: Option<String>,
    /// `messaging.destination.template`, when the name is built from one.
    pub template: Option<String>,
    /// The destination only lives as long as its client (e.g. an exclusive queue).
    pub temporary: bool,
    /// The destination has a broker-generated name.
    pub anonymous: bool,
    /// The name under [`Conventions::Legacy`](crate::Conventions::Legacy), where it
    /// differs (RabbitMQ: the exchange rather than `{exchange}:{routing key}`).
    pub legacy_name: Option<String>,
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
    pub partition: Option<String>,
    /// Kafka offset.
    pub offset: Option<i64>,
    /// Kafka message key, when it is a string.
    pub key: Option<String>,
    /// Kafka tombstone (null body).
    pub tombstone: bool,
    /// Broker-assigned or application message id.
    pub message_id: Option<String>,
    /// Conversation id (AMQP correlation id).
    pub conversation_id: Option<String>,
    /// Body size in bytes.
    pub body_size: Option<u64>,
    /// Consumer group.
    pub consumer_group: Option<String>,
    /// RabbitMQ routing key.
    pub routing_key: Option<String>,
    /// RabbitMQ delivery tag.
    pub delivery_tag: Option<u64>,
    /// Client id of the producer or consumer.
    pub client_id: Option<String>,
    /// Broker host name or address, without user information.
    pub server_address: Option<String>,
    /// Broker port.
    pub server_port: Option<u16>,
    /// Number of messages, for operations on a batch.
    pub batch_message_count: Option<u64>,
    /// A span name of the system's own, used as it is under every conventions
    /// setting (Lambda's `{event source} process`). `None`: the conventions' name.
    pub span_name: Option<String>,
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
    pub fn destination(mut self, name: impl Into<String>) -> Self {
        self.destination.name = Some(name.into());
        self
    }

    /// Sets the system-specific operation name.
    pub fn operation_named(mut self, name: &'static str) -> Self {
        self.operation_name = Some(Cow::Borrowed(name));
        self
    }

    /// Sets the message id.
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// Sets the body size.
    pub fn body_size(mut self, size: usize) -> Self {
        self.body_size = Some(size as u64);
        self
    }

    /// Sets the broker address and port.
    pub fn server(mut self, address: impl Into<String>, port: Option<u16>) -> Self {
        self.server_address = Some(address.into());
        self.server_port = port;
        self
    }
}
