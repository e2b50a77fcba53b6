//! Kafka operations described for the core.

use std::sync::OnceLock;

use mqtrace::{LastMade, MessageDescription, MessagingSystem, OperationType, Text};
use rdkafka::error::KafkaError;

/// Where a client connects, as recorded in `server.address` / `server.port`: the
/// first entry of `bootstrap.servers`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Server {
    /// Host name or address (shared by every description that names it).
    pub address: Text,
    /// Port (9092 when the entry has none).
    pub port: u16,
}

impl Server {
    /// The first `host:port` of a `bootstrap.servers` list; a scheme prefix
    /// (`PLAINTEXT://`) is skipped.
    pub fn from_bootstrap(servers: &str) -> Option<Self> {
        let first = servers.split(',').next()?.trim();
        let first = first.split_once("://").map_or(first, |(_, r)| r);
        if first.is_empty() {
            return None;
        }
        match first.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() => Some(Self {
                address: host.trim_matches(|c| c == '[' || c == ']').into(),
                port: port.parse().ok()?,
            }),
            _ => Some(Self {
                address: first.into(),
                port: 9092,
            }),
        }
    }
}

/// What the client knows about itself, for every span.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClientInfo {
    pub(crate) client_id: Option<Text>,
    pub(crate) server: Option<Server>,
    pub(crate) group: Option<Text>,
}

impl ClientInfo {
    pub(crate) fn from_config(config: &rdkafka::ClientConfig) -> Self {
        Self {
            client_id: config.get("client.id").map(Text::from),
            server: config
                .get("bootstrap.servers")
                .and_then(Server::from_bootstrap),
            group: config.get("group.id").map(Text::from),
        }
    }

    pub(crate) fn describe(&self, operation: OperationType, topic: &str) -> MessageDescription {
        let mut d = MessageDescription::new(MessagingSystem::Kafka, operation)
            .destination(topic_text(topic));
        d.client_id.clone_from(&self.client_id);
        if let Some(s) = &self.server {
            d.server_address = Some(s.address.clone());
            d.server_port = Some(s.port);
        }
        d
    }
}

/// A key as recorded: only when it is UTF-8 (the conventions leave other keys out).
pub(crate) fn key_attribute(key: Option<&[u8]>) -> Option<Text> {
    key.and_then(|k| std::str::from_utf8(k).ok())
        .map(Text::from)
}

thread_local! {
    /// The topic this thread described last: a loop's records nearly all share it.
    static LAST_TOPIC: LastMade<Text> = const { LastMade::new() };
}

/// A topic's name as a shared text, made once for a run of records from it.
pub(crate) fn topic_text(topic: &str) -> Text {
    LAST_TOPIC.with(|last| last.get(topic, Text::clone))
}

/// Partitions below this have their number's text made once, shared.
const SHARED_PARTITIONS: i32 = 256;

/// A partition's number as text (`messaging.destination.partition.id`).
pub(crate) fn partition_text(partition: i32) -> Text {
    static SHARED: OnceLock<Vec<Text>> = OnceLock::new();
    let shared = SHARED.get_or_init(|| {
        (0..SHARED_PARTITIONS)
            .map(|p| Text::from(p.to_string()))
            .collect()
    });
    usize::try_from(partition)
        .ok()
        .and_then(|i| shared.get(i))
        .cloned()
        .unwrap_or_else(|| Text::from(partition.to_string()))
}

/// `error.type` for a Kafka failure: the broker or client error code's name
/// (`MessageTimedOut`, `UnknownTopicOrPartition`), else the kind of failure.
pub fn error_type(error: &KafkaError) -> String {
    match error.rdkafka_error_code() {
        Some(code) => format!("{code:?}"),
        None => match error {
            KafkaError::Canceled => "Canceled".to_owned(),
            KafkaError::NoMessageReceived => "NoMessageReceived".to_owned(),
            _ => "_OTHER".to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaErrorCode;

    #[test]
    fn bootstrap_servers_parse() {
        let s = Server::from_bootstrap("PLAINTEXT://k1:9093,k2:9094");
        assert_eq!(
            s,
            Some(Server {
                address: "k1".into(),
                port: 9093
            })
        );
        assert_eq!(Server::from_bootstrap("broker").map(|s| s.port), Some(9092));
        assert_eq!(Server::from_bootstrap(""), None);
    }

    #[test]
    fn partitions_read_as_their_numbers() {
        for p in [0, 7, 255, 256, 100_000, -1] {
            assert_eq!(partition_text(p), p.to_string().as_str());
        }
    }

    #[test]
    fn error_types_name_the_code() {
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert_eq!(error_type(&e), "MessageTimedOut");
        assert_eq!(error_type(&KafkaError::Canceled), "Canceled");
    }
}
