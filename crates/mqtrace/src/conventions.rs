//! Which attribute and span names mqtrace emits.
//!
//! Three settings, one switch:
//!
//! | setting | span name | operation attribute | Kafka partition / group | RabbitMQ routing key |
//! |---|---|---|---|---|
//! | [`Conventions::Current`] (default) | `{operation} {destination}` | `messaging.operation.name` + `.type` | `messaging.destination.partition.id` (string), `messaging.consumer.group.name` | `messaging.rabbitmq.destination.routing_key` |
//! | [`Conventions::Legacy`] | `{destination} {operation}` | `messaging.operation` = `publish`/`receive`/`process` | `messaging.kafka.partition` (int), `messaging.kafka.consumer.group` | `messaging.rabbitmq.routing_key` |
//! | [`Conventions::Both`] | current | both sets | both sets | both sets |
//!
//! Span kinds follow the current conventions under every setting. Names that the
//! `opentelemetry-semantic-conventions` crate has are taken from it; [`attr`] defines
//! the rest.

use opentelemetry::{KeyValue, Value};

use crate::describe::{MessageDescription, MessagingSystem};

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

    // The legacy names. The semconv crate still carries some of them as deprecated
    // constants; the others left the model long ago (see docs/span-model.md).
    /// Legacy: `messaging.operation` (`publish`, `receive`, `process`).
    #[allow(deprecated)]
    pub const LEGACY_OPERATION: &str =
        opentelemetry_semantic_conventions::attribute::MESSAGING_OPERATION;
    /// Legacy: `messaging.kafka.consumer.group`.
    #[allow(deprecated)]
    pub const LEGACY_KAFKA_CONSUMER_GROUP: &str =
        opentelemetry_semantic_conventions::attribute::MESSAGING_KAFKA_CONSUMER_GROUP;
    /// Legacy: `messaging.kafka.message.offset`.
    #[allow(deprecated)]
    pub const LEGACY_KAFKA_OFFSET: &str =
        opentelemetry_semantic_conventions::attribute::MESSAGING_KAFKA_MESSAGE_OFFSET;
    /// Legacy: `messaging.kafka.partition` (an int).
    pub const LEGACY_KAFKA_PARTITION: &str = "messaging.kafka.partition";
    /// Legacy: `messaging.rabbitmq.routing_key`.
    pub const LEGACY_RABBITMQ_ROUTING_KEY: &str = "messaging.rabbitmq.routing_key";

    // mqtrace's own names, for what the conventions do not cover.
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

/// The environment variable that selects the conventions: `current`, `legacy` or
/// `both`. `OTEL_SEMCONV_STABILITY_OPT_IN` takes precedence when it names
/// `messaging/dup` (both) or `messaging` (current).
pub const CONVENTIONS_ENV: &str = "MQTRACE_MESSAGING_CONVENTIONS";

/// Which attribute names are emitted. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Conventions {
    /// Semantic conventions v1.44 (the default).
    #[default]
    Current,
    /// The names older instrumentations use (around v1.24).
    Legacy,
    /// Both sets of attributes; current span name.
    Both,
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
    /// Unknown values fall back to [`Conventions::Current`].
    pub fn from_values(mqtrace: Option<&str>, opt_in: Option<&str>) -> Self {
        let opt_in: Vec<&str> = opt_in
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .collect();
        if opt_in.contains(&"messaging/dup") {
            return Self::Both;
        }
        if opt_in.contains(&"messaging") {
            return Self::Current;
        }
        match mqtrace.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            Some("legacy") => Self::Legacy,
            Some("both") | Some("dup") => Self::Both,
            _ => Self::Current,
        }
    }

    fn current(self) -> bool {
        matches!(self, Self::Current | Self::Both)
    }

    fn legacy(self) -> bool {
        matches!(self, Self::Legacy | Self::Both)
    }

    /// The span name for a description.
    pub fn span_name(self, d: &MessageDescription) -> String {
        if let Some(name) = &d.span_name {
            return name.clone();
        }
        if self.current() {
            // Template first; a name only when it is neither temporary nor anonymous.
            let dest = d.destination.template.as_deref().or_else(|| {
                (!d.destination.temporary && !d.destination.anonymous)
                    .then_some(d.destination.name.as_deref())
                    .flatten()
            });
            match dest {
                Some(dest) => format!("{} {dest}", d.operation_name()),
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
            match dest {
                Some(dest) => format!("{dest} {}", d.operation.legacy_name()),
                None => d.operation.legacy_name().to_owned(),
            }
        }
    }

    /// Appends the attributes of a description under this setting. All of them are
    /// known at span start, so samplers see them.
    pub fn attributes(self, d: &MessageDescription, out: &mut Vec<KeyValue>) {
        out.push(KeyValue::new(attr::MESSAGING_SYSTEM, d.system.as_str()));
        if self.current() {
            out.push(KeyValue::new(
                attr::MESSAGING_OPERATION_NAME,
                d.operation_name().to_owned(),
            ));
            out.push(KeyValue::new(
                attr::MESSAGING_OPERATION_TYPE,
                d.operation.as_str(),
            ));
        }
        if self.legacy() {
            out.push(KeyValue::new(
                attr::LEGACY_OPERATION,
                d.operation.legacy_name(),
            ));
        }
        let dest = &d.destination;
        // One value per key: under `Both` the current name wins.
        let name = if self == Self::Legacy && dest.legacy_name.is_some() {
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

        let kafka = d.system == MessagingSystem::Kafka;
        self.position_attributes(d.system, d.partition.as_deref(), d.offset, out);
        push_str(out, attr::MESSAGING_KAFKA_MESSAGE_KEY, &d.key);
        if d.tombstone {
            out.push(KeyValue::new(attr::MESSAGING_KAFKA_MESSAGE_TOMBSTONE, true));
        }
        if let Some(group) = &d.consumer_group {
            if self.current() {
                out.push(KeyValue::new(
                    attr::MESSAGING_CONSUMER_GROUP_NAME,
                    group.clone(),
                ));
            }
            if self.legacy() && kafka {
                out.push(KeyValue::new(
                    attr::LEGACY_KAFKA_CONSUMER_GROUP,
                    group.clone(),
                ));
            }
        }
        if let Some(key) = d.routing_key.as_ref().filter(|k| !k.is_empty()) {
            if self.current() {
                out.push(KeyValue::new(
                    attr::MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY,
                    key.clone(),
                ));
            }
            if self.legacy() {
                out.push(KeyValue::new(
                    attr::LEGACY_RABBITMQ_ROUTING_KEY,
                    key.clone(),
                ));
            }
        }
        if let Some(tag) = d.delivery_tag {
            out.push(KeyValue::new(
                attr::MESSAGING_RABBITMQ_MESSAGE_DELIVERY_TAG,
                i64::try_from(tag).unwrap_or(i64::MAX),
            ));
        }
        push_str(out, attr::MESSAGING_MESSAGE_ID, &d.message_id);
        push_str(
            out,
            attr::MESSAGING_MESSAGE_CONVERSATION_ID,
            &d.conversation_id,
        );
        if let Some(size) = d.body_size {
            out.push(KeyValue::new(
                attr::MESSAGING_MESSAGE_BODY_SIZE,
                i64::try_from(size).unwrap_or(i64::MAX),
            ));
        }
        push_str(out, attr::MESSAGING_CLIENT_ID, &d.client_id);
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
        out.extend(d.extra.iter().cloned());
    }
}

impl Conventions {
    /// The partition and offset attributes under this setting: what a producer
    /// learns only from the broker's acknowledgement (Kafka's delivery report), to
    /// add to a span that has started.
    pub fn position_attributes(
        self,
        system: MessagingSystem,
        partition: Option<&str>,
        offset: Option<i64>,
        out: &mut Vec<KeyValue>,
    ) {
        let kafka = system == MessagingSystem::Kafka;
        if let Some(partition) = partition {
            if self.current() {
                out.push(KeyValue::new(
                    attr::MESSAGING_DESTINATION_PARTITION_ID,
                    partition.to_owned(),
                ));
            }
            if self.legacy() && kafka {
                if let Ok(p) = partition.parse::<i64>() {
                    out.push(KeyValue::new(attr::LEGACY_KAFKA_PARTITION, p));
                }
            }
        }
        if let Some(offset) = offset {
            if self.current() {
                out.push(KeyValue::new(attr::MESSAGING_KAFKA_OFFSET, offset));
            }
            if self.legacy() {
                out.push(KeyValue::new(attr::LEGACY_KAFKA_OFFSET, offset));
            }
        }
    }
}

fn push_str(out: &mut Vec<KeyValue>, key: &'static str, value: &Option<String>) {
    if let Some(v) = value {
        out.push(KeyValue::new(key, Value::from(v.clone())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::describe::OperationType;

    fn kafka_process() -> MessageDescription {
        let mut d = MessageDescription::new(MessagingSystem::Kafka, OperationType::Process)
            .destination("orders");
        d.partition = Some("2".into());
        d.offset = Some(41);
        d.consumer_group = Some("billing".into());
        d
    }

    fn names(c: Conventions, d: &MessageDescription) -> Vec<String> {
        let mut out = Vec::new();
        c.attributes(d, &mut out);
        out.into_iter().map(|kv| kv.key.to_string()).collect()
    }

    #[test]
    fn env_selection_gives_dup_precedence() {
        assert_eq!(Conventions::from_values(None, None), Conventions::Current);
        assert_eq!(
            Conventions::from_values(Some("legacy"), None),
            Conventions::Legacy
        );
        assert_eq!(
            Conventions::from_values(Some("legacy"), Some("http, messaging/dup")),
            Conventions::Both
        );
        assert_eq!(
            Conventions::from_values(Some("legacy"), Some("messaging")),
            Conventions::Current
        );
        assert_eq!(
            Conventions::from_values(Some("nonsense"), None),
            Conventions::Current
        );
    }

    #[test]
    fn span_names_per_setting() {
        let d = kafka_process();
        assert_eq!(Conventions::Current.span_name(&d), "process orders");
        assert_eq!(Conventions::Legacy.span_name(&d), "orders process");
        assert_eq!(Conventions::Both.span_name(&d), "process orders");
        let mut temp = d.clone();
        temp.destination.temporary = true;
        assert_eq!(Conventions::Current.span_name(&temp), "process");
        assert_eq!(Conventions::Legacy.span_name(&temp), "(temporary) process");
        let mut rabbit = d.clone();
        rabbit.destination.name = Some("shop:order.created".into());
        rabbit.destination.legacy_name = Some("shop".into());
        assert_eq!(
            Conventions::Current.span_name(&rabbit),
            "process shop:order.created"
        );
        assert_eq!(Conventions::Legacy.span_name(&rabbit), "shop process");
        assert_eq!(
            Conventions::Both.span_name(&rabbit),
            "process shop:order.created"
        );
        let mut templated = d;
        templated.destination.template = Some("orders.{region}".into());
        assert_eq!(
            Conventions::Current.span_name(&templated),
            "process orders.{region}"
        );
    }

    #[test]
    fn attribute_sets_per_setting() {
        let d = kafka_process();
        let current = names(Conventions::Current, &d);
        assert!(current.contains(&"messaging.destination.partition.id".into()));
        assert!(current.contains(&"messaging.consumer.group.name".into()));
        assert!(!current.contains(&"messaging.kafka.partition".into()));
        let legacy = names(Conventions::Legacy, &d);
        assert!(legacy.contains(&"messaging.kafka.partition".into()));
        assert!(legacy.contains(&"messaging.kafka.consumer.group".into()));
        assert!(legacy.contains(&"messaging.operation".into()));
        assert!(!legacy.contains(&"messaging.operation.name".into()));
        let both = names(Conventions::Both, &d);
        for name in current.iter().chain(legacy.iter()) {
            assert!(both.contains(name), "{name} missing from dup");
        }
    }
}
