//! Which attribute, span and metric names mqtrace emits.
//!
//! Names come from one table per version of the messaging conventions; one switch
//! picks the tables in force:
//!
//! | setting | span name | system | operation | Kafka position and group | RabbitMQ | Lambda |
//! |---|---|---|---|---|---|---|
//! | [`Conventions::V1_45`] (default) | `{operation} {destination}` | `messaging.system.name` (`aws.sqs`) | `messaging.operation.name` + `.type` | `messaging.destination.partition.id` (string), `kafka.offset`, `kafka.message.key`, `messaging.consumer.group.name` | `rabbitmq.destination.routing_key`, `rabbitmq.message.delivery_tag` | `faas.invocation.id` |
//! | [`Conventions::V1_44`] | `{operation} {destination}` | `messaging.system` (`aws_sqs`) | `messaging.operation.name` + `.type` | `messaging.destination.partition.id`, `messaging.kafka.offset`, `messaging.kafka.message.key`, `messaging.consumer.group.name` | `messaging.rabbitmq.destination.routing_key`, `messaging.rabbitmq.message.delivery_tag` | `faas.invocation_id` |
//! | [`Conventions::Legacy`] (v1.24) | `{destination} {operation}` | `messaging.system` (`aws_sqs`) | `messaging.operation` = `publish`/`create`/`receive`/`deliver` | `messaging.kafka.destination.partition` (int), `messaging.kafka.message.offset`, `messaging.kafka.message.key`, `messaging.kafka.consumer.group` | `messaging.rabbitmq.destination.routing_key` | `faas.invocation_id` |
//! | [`Conventions::Dup`] | as v1.45 | both | both | both | both | both |
//!
//! - Span kinds follow the current conventions under every setting.
//! - A system's own attributes (`kafka.*`, `rabbitmq.*`) go only on that system's
//!   spans.
//! - `messaging.message.body.size` is opt-in in every version:
//!   [`InstrumenterBuilder::body_size`](crate::InstrumenterBuilder::body_size).
//! - Metrics: v1.44 and v1.45 name them alike (`messaging.client.operation.duration`,
//!   `messaging.process.duration`, `messaging.client.sent.messages`,
//!   `messaging.client.consumed.messages`); v1.24 had `messaging.publish.duration`,
//!   `messaging.receive.duration`, `messaging.process.duration`,
//!   `messaging.publish.messages`, `messaging.receive.messages` and
//!   `messaging.process.messages`. See [`MetricNames`].
//!
//! Names the `opentelemetry-semantic-conventions` crate has are taken from it (it is
//! generated from v1.42); [`attr`] defines the rest.

use std::borrow::Cow;

use opentelemetry::{KeyValue, Value};

use crate::describe::{MessageDescription, MessagingSystem, OperationType, Text};

/// Attribute names: those of the semantic conventions (re-exported from
/// `opentelemetry-semantic-conventions` where it has them) and mqtrace's own.
pub mod attr {
    pub use opentelemetry_semantic_conventions::attribute::{
        ERROR_TYPE, EXCEPTION_MESSAGE, EXCEPTION_TYPE, MESSAGING_BATCH_MESSAGE_COUNT,
        MESSAGING_CLIENT_ID, MESSAGING_CONSUMER_GROUP_NAME, MESSAGING_DESTINATION_ANONYMOUS,
        MESSAGING_DESTINATION_NAME, MESSAGING_DESTINATION_PARTITION_ID,
        MESSAGING_DESTINATION_TEMPLATE, MESSAGING_DESTINATION_TEMPORARY,
        MESSAGING_KAFKA_MESSAGE_KEY, MESSAGING_KAFKA_MESSAGE_TOMBSTONE, MESSAGING_KAFKA_OFFSET,
        MESSAGING_MESSAGE_BODY_SIZE, MESSAGING_MESSAGE_CONVERSATION_ID, MESSAGING_MESSAGE_ID,
        MESSAGING_OPERATION_NAME, MESSAGING_OPERATION_TYPE,
        MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY, MESSAGING_RABBITMQ_MESSAGE_DELIVERY_TAG,
        MESSAGING_SYSTEM, SERVER_ADDRESS, SERVER_PORT,
    };

    // v1.45 names, which the semconv crate (generated from v1.42) does not have yet.
    /// v1.45: `messaging.system.name` (was `messaging.system`).
    pub const MESSAGING_SYSTEM_NAME: &str = "messaging.system.name";
    /// v1.45: `kafka.message.key`.
    pub const KAFKA_MESSAGE_KEY: &str = "kafka.message.key";
    /// v1.45: `kafka.offset`.
    pub const KAFKA_OFFSET: &str = "kafka.offset";
    /// v1.45: `kafka.message.tombstone`.
    pub const KAFKA_MESSAGE_TOMBSTONE: &str = "kafka.message.tombstone";
    /// v1.45: `rabbitmq.destination.routing_key`.
    pub const RABBITMQ_DESTINATION_ROUTING_KEY: &str = "rabbitmq.destination.routing_key";
    /// v1.45: `rabbitmq.message.delivery_tag`.
    pub const RABBITMQ_MESSAGE_DELIVERY_TAG: &str = "rabbitmq.message.delivery_tag";
    /// v1.45: `faas.invocation.id` (was `faas.invocation_id`).
    pub const FAAS_INVOCATION_ID: &str = "faas.invocation.id";
    /// v1.44 and older: `faas.invocation_id`.
    pub const LEGACY_FAAS_INVOCATION_ID: &str = "faas.invocation_id";

    // v1.24 names that later versions renamed.
    /// v1.24: `messaging.operation` (`publish`, `create`, `receive`, `deliver`).
    pub const LEGACY_OPERATION: &str = "messaging.operation";
    /// v1.24: `messaging.kafka.consumer.group`.
    pub const LEGACY_KAFKA_CONSUMER_GROUP: &str = "messaging.kafka.consumer.group";
    /// v1.24: `messaging.kafka.message.offset`.
    pub const LEGACY_KAFKA_OFFSET: &str = "messaging.kafka.message.offset";
    /// v1.24: `messaging.kafka.destination.partition` (an int).
    pub const LEGACY_KAFKA_PARTITION: &str = "messaging.kafka.destination.partition";
    /// v1.24: `messaging.client_id`.
    pub const LEGACY_CLIENT_ID: &str = "messaging.client_id";

    // mqtrace's own names, for what the conventions do not cover
    // (docs/span-model.md has them all, with types and examples).
    /// How long the message waited between publish and the start of processing, in
    /// seconds (double), from the broker's timestamp.
    pub const QUEUE_TIME: &str = "mqtrace.message.queue_time";
    /// Which delivery attempt this is, starting at 1.
    pub const ATTEMPT: &str = "mqtrace.message.attempt";
    /// What happened to the message after processing: `settled`, `retried`,
    /// `dead_lettered`, `dropped` (permanent failure and no dead-letter destination).
    pub const DISPOSITION: &str = "mqtrace.message.disposition";
    /// Whether the handler's error is worth retrying.
    pub const ERROR_RETRYABLE: &str = "mqtrace.error.retryable";
    /// Messages of a batch whose handler succeeded.
    pub const BATCH_SUCCEEDED: &str = "mqtrace.batch.succeeded_count";
    /// Messages of a batch whose handler failed.
    pub const BATCH_FAILED: &str = "mqtrace.batch.failed_count";
    /// Link attribute that says what a forwarding span's link points to:
    /// `original_message` or `processing_attempt`.
    pub const RELATIONSHIP: &str = "mqtrace.link.relationship";
    /// Prefix of captured (allow-listed) headers.
    pub const HEADER_PREFIX: &str = "messaging.header.";
}

/// The environment variable that selects the conventions: `v1.45`, `v1.44`,
/// `legacy` (v1.24) or `dup`. `OTEL_SEMCONV_STABILITY_OPT_IN` takes precedence when
/// it names `messaging/dup` (dup) or `messaging` (v1.45).
pub const CONVENTIONS_ENV: &str = "MQTRACE_MESSAGING_CONVENTIONS";

/// Which names are emitted. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[non_exhaustive]
pub enum Conventions {
    /// Semantic conventions v1.45 (the default).
    #[default]
    V1_45,
    /// Semantic conventions v1.44: v1.45 without its renames.
    V1_44,
    /// Exactly the names and operation values of v1.24, what older
    /// instrumentations emit.
    Legacy,
    /// v1.45 and v1.24 side by side (`OTEL_SEMCONV_STABILITY_OPT_IN=messaging/dup`):
    /// both sets of attributes and metrics; v1.45's span name.
    Dup,
}

/// One version's names.
#[derive(Debug)]
struct Names {
    system: &'static str,
    system_value: fn(MessagingSystem) -> &'static str,
    /// `messaging.operation.name` and `.type` (v1.25 on).
    operation_attributes: bool,
    /// v1.24's `messaging.operation`.
    legacy_operation: bool,
    /// v1.24 names the destination first in span names.
    destination_first: bool,
    /// The partition as a string id (v1.25 on) or v1.24's Kafka int.
    partition: Partition,
    consumer_group: ConsumerGroup,
    client_id: &'static str,
    kafka_key: &'static str,
    kafka_offset: &'static str,
    kafka_tombstone: &'static str,
    rabbitmq_routing_key: &'static str,
    rabbitmq_delivery_tag: Option<&'static str>,
    invocation_id: &'static str,
    metrics: MetricNames,
}

#[derive(Debug)]
enum Partition {
    Id(&'static str),
    KafkaInt(&'static str),
}

#[derive(Debug)]
enum ConsumerGroup {
    /// One name for every system.
    Generic(&'static str),
    /// v1.24: only Kafka had one.
    KafkaOnly(&'static str),
}

/// The metric names of one version of the conventions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricNames {
    /// Duration of a send (v1.24: `messaging.publish.duration`).
    pub send_duration: &'static str,
    /// Duration of a receive, settle or other client operation (v1.24:
    /// `messaging.receive.duration`; v1.24 had no settle).
    pub client_duration: &'static str,
    /// Duration of processing.
    pub process_duration: &'static str,
    /// Messages sent.
    pub sent_messages: &'static str,
    /// Messages consumed when they are counted at receive.
    pub received_messages: &'static str,
    /// Messages consumed when they are counted at processing.
    pub processed_messages: &'static str,
}

const CURRENT_METRICS: MetricNames = MetricNames {
    send_duration: "messaging.client.operation.duration",
    client_duration: "messaging.client.operation.duration",
    process_duration: "messaging.process.duration",
    sent_messages: "messaging.client.sent.messages",
    received_messages: "messaging.client.consumed.messages",
    processed_messages: "messaging.client.consumed.messages",
};

fn system_value_v1_45(system: MessagingSystem) -> &'static str {
    match system {
        MessagingSystem::AwsSqs => "aws.sqs",
        other => other.as_str(),
    }
}

fn system_value_v1_44(system: MessagingSystem) -> &'static str {
    system.as_str()
}

const V1_45: Names = Names {
    system: attr::MESSAGING_SYSTEM_NAME,
    system_value: system_value_v1_45,
    operation_attributes: true,
    legacy_operation: false,
    destination_first: false,
    partition: Partition::Id(attr::MESSAGING_DESTINATION_PARTITION_ID),
    consumer_group: ConsumerGroup::Generic(attr::MESSAGING_CONSUMER_GROUP_NAME),
    client_id: attr::MESSAGING_CLIENT_ID,
    kafka_key: attr::KAFKA_MESSAGE_KEY,
    kafka_offset: attr::KAFKA_OFFSET,
    kafka_tombstone: attr::KAFKA_MESSAGE_TOMBSTONE,
    rabbitmq_routing_key: attr::RABBITMQ_DESTINATION_ROUTING_KEY,
    rabbitmq_delivery_tag: Some(attr::RABBITMQ_MESSAGE_DELIVERY_TAG),
    invocation_id: attr::FAAS_INVOCATION_ID,
    metrics: CURRENT_METRICS,
};

const V1_44: Names = Names {
    system: attr::MESSAGING_SYSTEM,
    system_value: system_value_v1_44,
    operation_attributes: true,
    legacy_operation: false,
    destination_first: false,
    partition: Partition::Id(attr::MESSAGING_DESTINATION_PARTITION_ID),
    consumer_group: ConsumerGroup::Generic(attr::MESSAGING_CONSUMER_GROUP_NAME),
    client_id: attr::MESSAGING_CLIENT_ID,
    kafka_key: attr::MESSAGING_KAFKA_MESSAGE_KEY,
    kafka_offset: attr::MESSAGING_KAFKA_OFFSET,
    kafka_tombstone: attr::MESSAGING_KAFKA_MESSAGE_TOMBSTONE,
    rabbitmq_routing_key: attr::MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY,
    rabbitmq_delivery_tag: Some(attr::MESSAGING_RABBITMQ_MESSAGE_DELIVERY_TAG),
    invocation_id: attr::LEGACY_FAAS_INVOCATION_ID,
    metrics: CURRENT_METRICS,
};

const V1_24: Names = Names {
    system: attr::MESSAGING_SYSTEM,
    system_value: system_value_v1_44,
    operation_attributes: false,
    legacy_operation: true,
    destination_first: true,
    partition: Partition::KafkaInt(attr::LEGACY_KAFKA_PARTITION),
    consumer_group: ConsumerGroup::KafkaOnly(attr::LEGACY_KAFKA_CONSUMER_GROUP),
    client_id: attr::LEGACY_CLIENT_ID,
    kafka_key: attr::MESSAGING_KAFKA_MESSAGE_KEY,
    kafka_offset: attr::LEGACY_KAFKA_OFFSET,
    kafka_tombstone: attr::MESSAGING_KAFKA_MESSAGE_TOMBSTONE,
    rabbitmq_routing_key: attr::MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY,
    rabbitmq_delivery_tag: None,
    invocation_id: attr::LEGACY_FAAS_INVOCATION_ID,
    metrics: MetricNames {
        send_duration: "messaging.publish.duration",
        client_duration: "messaging.receive.duration",
        process_duration: "messaging.process.duration",
        sent_messages: "messaging.publish.messages",
        received_messages: "messaging.receive.messages",
        processed_messages: "messaging.process.messages",
    },
};

/// v1.24's `messaging.operation` value (`deliver` for processing; it had none for
/// settlement).
fn legacy_operation(op: OperationType) -> Option<&'static str> {
    match op {
        OperationType::Create => Some("create"),
        OperationType::Send => Some("publish"),
        OperationType::Receive => Some("receive"),
        OperationType::Process => Some("deliver"),
        OperationType::Settle => None,
    }
}

impl Conventions {
    /// Reads [`CONVENTIONS_ENV`] and `OTEL_SEMCONV_STABILITY_OPT_IN`.
    pub fn from_env() -> Self {
        Self::from_values(
            std::env::var(CONVENTIONS_ENV).ok().as_deref(),
            std::env::var("OTEL_SEMCONV_STABILITY_OPT_IN")
                .ok()
                .as_deref(),
        )
    }

    /// The decision of [`Conventions::from_env`], from the two variables' values.
    /// Unknown values fall back to [`Conventions::V1_45`].
    pub fn from_values(mqtrace: Option<&str>, opt_in: Option<&str>) -> Self {
        let opt_in: Vec<&str> = opt_in
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .collect();
        if opt_in.contains(&"messaging/dup") {
            return Self::Dup;
        }
        if opt_in.contains(&"messaging") {
            return Self::V1_45;
        }
        match mqtrace.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            Some("legacy") | Some("v1.24") => Self::Legacy,
            Some("v1.44") => Self::V1_44,
            Some("dup") | Some("both") => Self::Dup,
            _ => Self::V1_45,
        }
    }

    /// The tables in force, the newest first.
    fn tables(self) -> &'static [&'static Names] {
        match self {
            Self::V1_45 => &[&V1_45],
            Self::V1_44 => &[&V1_44],
            Self::Legacy => &[&V1_24],
            Self::Dup => &[&V1_45, &V1_24],
        }
    }

    fn primary(self) -> &'static Names {
        self.tables()[0]
    }

    /// The metric names in force: one set, or two under [`Conventions::Dup`].
    pub fn metric_names(self) -> impl Iterator<Item = &'static MetricNames> {
        self.tables().iter().map(|t| &t.metrics)
    }

    /// The span name for a description.
    pub fn span_name(self, d: &MessageDescription) -> String {
        // `a b` by concatenation, one allocation: `format!` cost about 900
        // instructions per span (callgrind), most of it the formatting machinery.
        fn joined(a: &str, b: &str) -> String {
            let mut name = String::with_capacity(a.len() + 1 + b.len());
            name.push_str(a);
            name.push(' ');
            name.push_str(b);
            name
        }
        if let Some(name) = &d.span_name {
            return name.as_str().to_owned();
        }
        if !self.primary().destination_first {
            // Template first; a name only when it is neither temporary nor anonymous.
            let dest = d.destination.template.as_deref().or_else(|| {
                (!d.destination.temporary && !d.destination.anonymous)
                    .then_some(d.destination.name.as_deref())
                    .flatten()
            });
            match dest {
                Some(dest) => joined(d.operation_name(), dest),
                None => d.operation_name().to_owned(),
            }
        } else {
            let dest = if d.destination.temporary {
                Some("(temporary)")
            } else if d.destination.anonymous {
                Some("(anonymous)")
            } else {
                d.destination
                    .legacy_name
                    .as_deref()
                    .or(d.destination.name.as_deref())
            };
            let op = legacy_operation(d.operation).unwrap_or_else(|| d.operation_name());
            match dest {
                Some(dest) => joined(dest, op),
                None => op.to_owned(),
            }
        }
    }

    /// Appends the attributes of a description under this setting. All of them are
    /// known at span start, so samplers see them. `body_size`: whether the opt-in
    /// `messaging.message.body.size` is wanted.
    pub fn attributes(self, d: &MessageDescription, body_size: bool, out: &mut Vec<KeyValue>) {
        let tables = self.tables();
        for t in tables {
            out.push(KeyValue::new(t.system, (t.system_value)(d.system)));
            if t.operation_attributes {
                out.push(KeyValue::new(
                    attr::MESSAGING_OPERATION_NAME,
                    operation_name_value(d),
                ));
                out.push(KeyValue::new(
                    attr::MESSAGING_OPERATION_TYPE,
                    d.operation.as_str(),
                ));
            }
            if t.legacy_operation {
                if let Some(op) = legacy_operation(d.operation) {
                    out.push(KeyValue::new(attr::LEGACY_OPERATION, op));
                }
            }
        }
        // Names every version shares: one value per key, the newest table's.
        let dest = &d.destination;
        let name = if tables[0].destination_first && dest.legacy_name.is_some() {
            &dest.legacy_name
        } else {
            &dest.name
        };
        push_str(out, attr::MESSAGING_DESTINATION_NAME, name);
        push_str(out, attr::MESSAGING_DESTINATION_TEMPLATE, &dest.template);
        if dest.temporary {
            out.push(KeyValue::new(attr::MESSAGING_DESTINATION_TEMPORARY, true));
        }
        if dest.anonymous {
            out.push(KeyValue::new(attr::MESSAGING_DESTINATION_ANONYMOUS, true));
        }
        push_str(out, attr::MESSAGING_MESSAGE_ID, &d.message_id);
        push_str(
            out,
            attr::MESSAGING_MESSAGE_CONVERSATION_ID,
            &d.conversation_id,
        );
        if let (true, Some(size)) = (body_size, d.body_size) {
            out.push(KeyValue::new(
                attr::MESSAGING_MESSAGE_BODY_SIZE,
                i64::try_from(size).unwrap_or(i64::MAX),
            ));
        }
        if let Some(count) = d.batch_message_count {
            out.push(KeyValue::new(
                attr::MESSAGING_BATCH_MESSAGE_COUNT,
                i64::try_from(count).unwrap_or(i64::MAX),
            ));
        }
        push_str(out, attr::SERVER_ADDRESS, &d.server_address);
        if let Some(port) = d.server_port {
            out.push(KeyValue::new(attr::SERVER_PORT, i64::from(port)));
        }

        // Names that moved between versions, each table's own.
        for t in tables {
            t.position(d.system, d.partition.as_ref(), d.offset, out);
            if let Some(group) = &d.consumer_group {
                match t.consumer_group {
                    ConsumerGroup::Generic(key) => out.push(KeyValue::new(key, group.clone())),
                    ConsumerGroup::KafkaOnly(key) if d.system == MessagingSystem::Kafka => {
                        out.push(KeyValue::new(key, group.clone()))
                    }
                    ConsumerGroup::KafkaOnly(_) => {}
                }
            }
            push_str(out, t.client_id, &d.client_id);
            match d.system {
                MessagingSystem::Kafka => {
                    push_str(out, t.kafka_key, &d.key);
                    if d.tombstone {
                        out.push(KeyValue::new(t.kafka_tombstone, true));
                    }
                }
                MessagingSystem::RabbitMq => {
                    if let Some(key) = d.routing_key.as_ref().filter(|k| !k.is_empty()) {
                        out.push(KeyValue::new(t.rabbitmq_routing_key, key.clone()));
                    }
                    if let (Some(key), Some(tag)) = (t.rabbitmq_delivery_tag, d.delivery_tag) {
                        out.push(KeyValue::new(key, i64::try_from(tag).unwrap_or(i64::MAX)));
                    }
                }
                _ => {}
            }
        }
        out.extend(d.extra.iter().cloned());
    }

    /// The partition and offset attributes under this setting: what a producer
    /// learns only from the broker's acknowledgement (Kafka's delivery report), to
    /// add to a span that has started. Offsets are Kafka's and go only on Kafka
    /// spans.
    pub fn position_attributes(
        self,
        system: MessagingSystem,
        partition: Option<&Text>,
        offset: Option<i64>,
        out: &mut Vec<KeyValue>,
    ) {
        for t in self.tables() {
            t.position(system, partition, offset, out);
        }
    }

    /// The Lambda invocation id attribute(s) for a request id.
    pub fn invocation_id(self, request_id: &str, out: &mut Vec<KeyValue>) {
        for t in self.tables() {
            out.push(KeyValue::new(t.invocation_id, request_id.to_owned()));
        }
    }

    /// The `messaging.system` / `messaging.system.name` attributes alone, for spans
    /// of an adapter's own making.
    pub fn system_attributes(self, system: MessagingSystem, out: &mut Vec<KeyValue>) {
        for t in self.tables() {
            out.push(KeyValue::new(t.system, (t.system_value)(system)));
        }
    }
}

impl Names {
    fn position(
        &self,
        system: MessagingSystem,
        partition: Option<&Text>,
        offset: Option<i64>,
        out: &mut Vec<KeyValue>,
    ) {
        let kafka = system == MessagingSystem::Kafka;
        if let Some(partition) = partition {
            match self.partition {
                Partition::Id(key) => out.push(KeyValue::new(key, partition.clone())),
                Partition::KafkaInt(key) if kafka => {
                    if let Ok(p) = partition.parse::<i64>() {
                        out.push(KeyValue::new(key, p));
                    }
                }
                Partition::KafkaInt(_) => {}
            }
        }
        if let (true, Some(offset)) = (kafka, offset) {
            out.push(KeyValue::new(self.kafka_offset, offset));
        }
    }
}

/// The operation's name as a value: a static name (the operation type's, or
/// one an adapter set with [`MessageDescription::operation_named`]) is shared,
/// not copied for each message.
fn operation_name_value(d: &MessageDescription) -> Value {
    match &d.operation_name {
        None => Value::from(d.operation.as_str()),
        Some(Cow::Borrowed(name)) => Value::from(*name),
        Some(Cow::Owned(name)) => Value::from(name.clone()),
    }
}

/// A text attribute, when there is one: the text is shared, not copied.
fn push_str(out: &mut Vec<KeyValue>, key: &'static str, value: &Option<Text>) {
    if let Some(v) = value {
        out.push(KeyValue::new(key, Value::from(v.clone())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka_process() -> MessageDescription {
        let mut d = MessageDescription::new(MessagingSystem::Kafka, OperationType::Process)
            .destination("orders");
        d.partition = Some("2".into());
        d.offset = Some(41);
        d.key = Some("order-7".into());
        d.consumer_group = Some("billing".into());
        d.client_id = Some("billing-1".into());
        d.body_size = Some(11);
        d
    }

    fn rendered(c: Conventions, d: &MessageDescription, body_size: bool) -> Vec<String> {
        let mut out = Vec::new();
        c.attributes(d, body_size, &mut out);
        let mut names: Vec<String> = out
            .into_iter()
            .map(|kv| format!("{}={}", kv.key, kv.value))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn env_selection_gives_dup_precedence() {
        assert_eq!(Conventions::from_values(None, None), Conventions::V1_45);
        assert_eq!(
            Conventions::from_values(Some("legacy"), None),
            Conventions::Legacy
        );
        assert_eq!(
            Conventions::from_values(Some("v1.44"), None),
            Conventions::V1_44
        );
        assert_eq!(
            Conventions::from_values(Some("legacy"), Some("http, messaging/dup")),
            Conventions::Dup
        );
        assert_eq!(
            Conventions::from_values(Some("legacy"), Some("messaging,messaging/dup")),
            Conventions::Dup
        );
        assert_eq!(
            Conventions::from_values(Some("legacy"), Some("messaging")),
            Conventions::V1_45
        );
        assert_eq!(
            Conventions::from_values(Some("nonsense"), None),
            Conventions::V1_45
        );
    }

    #[test]
    fn span_names_per_setting() {
        let d = kafka_process();
        assert_eq!(Conventions::V1_45.span_name(&d), "process orders");
        assert_eq!(Conventions::V1_44.span_name(&d), "process orders");
        assert_eq!(Conventions::Legacy.span_name(&d), "orders deliver");
        assert_eq!(Conventions::Dup.span_name(&d), "process orders");
        let send = d.for_operation(OperationType::Send, None);
        assert_eq!(Conventions::Legacy.span_name(&send), "orders publish");
        let mut temp = d.clone();
        temp.destination.temporary = true;
        assert_eq!(Conventions::V1_45.span_name(&temp), "process");
        assert_eq!(Conventions::Legacy.span_name(&temp), "(temporary) deliver");
        let mut rabbit = d.clone();
        rabbit.destination.name = Some("shop:order.created".into());
        rabbit.destination.legacy_name = Some("shop".into());
        assert_eq!(
            Conventions::V1_45.span_name(&rabbit),
            "process shop:order.created"
        );
        assert_eq!(Conventions::Legacy.span_name(&rabbit), "shop deliver");
        assert_eq!(
            Conventions::Dup.span_name(&rabbit),
            "process shop:order.created"
        );
        let mut templated = d;
        templated.destination.template = Some("orders.{region}".into());
        assert_eq!(
            Conventions::V1_45.span_name(&templated),
            "process orders.{region}"
        );
    }

    #[test]
    fn kafka_attributes_per_version() {
        let d = kafka_process();
        assert_eq!(
            rendered(Conventions::V1_45, &d, false),
            [
                "kafka.message.key=order-7",
                "kafka.offset=41",
                "messaging.client.id=billing-1",
                "messaging.consumer.group.name=billing",
                "messaging.destination.name=orders",
                "messaging.destination.partition.id=2",
                "messaging.operation.name=process",
                "messaging.operation.type=process",
                "messaging.system.name=kafka",
            ]
        );
        assert_eq!(
            rendered(Conventions::V1_44, &d, true),
            [
                "messaging.client.id=billing-1",
                "messaging.consumer.group.name=billing",
                "messaging.destination.name=orders",
                "messaging.destination.partition.id=2",
                "messaging.kafka.message.key=order-7",
                "messaging.kafka.offset=41",
                "messaging.message.body.size=11",
                "messaging.operation.name=process",
                "messaging.operation.type=process",
                "messaging.system=kafka",
            ]
        );
        assert_eq!(
            rendered(Conventions::Legacy, &d, false),
            [
                "messaging.client_id=billing-1",
                "messaging.destination.name=orders",
                "messaging.kafka.consumer.group=billing",
                "messaging.kafka.destination.partition=2",
                "messaging.kafka.message.key=order-7",
                "messaging.kafka.message.offset=41",
                "messaging.operation=deliver",
                "messaging.system=kafka",
            ]
        );
        let dup = rendered(Conventions::Dup, &d, false);
        let mut both: Vec<String> = rendered(Conventions::V1_45, &d, false)
            .into_iter()
            .chain(rendered(Conventions::Legacy, &d, false))
            .collect();
        both.sort();
        both.dedup();
        assert_eq!(dup, both);
    }

    #[test]
    fn system_attributes_go_only_on_their_system() {
        let mut sqs = kafka_process();
        sqs.system = MessagingSystem::AwsSqs;
        sqs.routing_key = Some("orders".into());
        sqs.delivery_tag = Some(3);
        let names = rendered(Conventions::Dup, &sqs, false);
        assert!(
            names
                .iter()
                .all(|n| !n.starts_with("kafka.") && !n.starts_with("messaging.kafka.")),
            "{names:?}"
        );
        assert!(names.iter().all(|n| !n.contains("rabbitmq")), "{names:?}");
        assert!(names.contains(&"messaging.system.name=aws.sqs".to_owned()));
        assert!(names.contains(&"messaging.system=aws_sqs".to_owned()));

        let mut rabbit = MessageDescription::new(MessagingSystem::RabbitMq, OperationType::Process)
            .destination("shop:order.created");
        rabbit.routing_key = Some("order.created".into());
        rabbit.delivery_tag = Some(3);
        rabbit.offset = Some(9);
        let names = rendered(Conventions::V1_45, &rabbit, false);
        assert!(names.contains(&"rabbitmq.destination.routing_key=order.created".to_owned()));
        assert!(names.contains(&"rabbitmq.message.delivery_tag=3".to_owned()));
        assert!(names.iter().all(|n| !n.contains("offset")), "{names:?}");
        let legacy = rendered(Conventions::Legacy, &rabbit, false);
        assert!(
            legacy.contains(&"messaging.rabbitmq.destination.routing_key=order.created".to_owned())
        );
        assert!(
            legacy.iter().all(|n| !n.contains("delivery_tag")),
            "{legacy:?}"
        );
    }

    #[test]
    fn settle_has_no_legacy_operation() {
        let d = kafka_process().for_operation(OperationType::Settle, Some("commit"));
        let names = rendered(Conventions::Legacy, &d, false);
        assert!(names.iter().all(|n| !n.starts_with("messaging.operation")));
        assert_eq!(Conventions::Legacy.span_name(&d), "orders commit");
    }

    #[test]
    fn invocation_id_per_version() {
        let mut out = Vec::new();
        Conventions::Dup.invocation_id("req-1", &mut out);
        let keys: Vec<_> = out.iter().map(|kv| kv.key.as_str().to_owned()).collect();
        assert_eq!(keys, ["faas.invocation.id", "faas.invocation_id"]);
    }
}
