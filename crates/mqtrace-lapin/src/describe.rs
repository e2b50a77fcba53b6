//! RabbitMQ operations described for the core.

use std::str::FromStr;

use lapin::protocol::{AMQPError, AMQPErrorKind};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, ErrorKind};
use mqtrace::{LastMade, MessageDescription, MessagingSystem, OperationType, Text};

/// Where a client is connected, as recorded in `server.address` / `server.port`.
/// Credentials and vhost are never part of it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Server {
    /// Host name or address (shared by every description that names it).
    pub address: Text,
    /// Port.
    pub port: u16,
}

impl Server {
    /// The host and port of an `amqp://` or `amqps://` URI (default ports applied);
    /// `None` when the URI does not parse.
    pub fn from_uri(uri: &str) -> Option<Self> {
        let uri = AMQPUri::from_str(uri).ok()?;
        Some(Self {
            address: uri.authority.host.into(),
            port: uri.authority.port,
        })
    }
}

/// The name of the default exchange in destination names.
const DEFAULT_EXCHANGE: &str = "amq.default";

/// `{exchange}:{routing key}`, or whichever is non-empty, or `amq.default`.
pub(crate) fn publish_destination(exchange: &str, routing_key: &str) -> String {
    match (exchange.is_empty(), routing_key.is_empty()) {
        (false, false) => format!("{exchange}:{routing_key}"),
        (false, true) => exchange.to_owned(),
        (true, false) => routing_key.to_owned(),
        (true, true) => DEFAULT_EXCHANGE.to_owned(),
    }
}

/// `{exchange}:{routing key}:{queue}` without empty parts; a routing key equal to
/// the queue name appears once.
pub(crate) fn consume_destination(exchange: &str, routing_key: &str, queue: &str) -> String {
    let routing_key = if routing_key == queue {
        ""
    } else {
        routing_key
    };
    [exchange, routing_key, queue]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(":")
}

thread_local! {
    /// The exchange and routing key this thread described last, as texts: a
    /// consumer's deliveries and a producer's publishes mostly repeat them.
    static LAST_EXCHANGE: LastMade<Text> = const { LastMade::new() };
    static LAST_ROUTING_KEY: LastMade<Text> = const { LastMade::new() };
}

/// The destination's name under v1.24: the exchange, or `amq.default`.
fn legacy_destination(exchange: &str) -> Text {
    if exchange.is_empty() {
        Text::from_static(DEFAULT_EXCHANGE)
    } else {
        LAST_EXCHANGE.with(|last| last.get(exchange, Text::clone))
    }
}

fn base(
    operation: OperationType,
    name: String,
    exchange: &str,
    routing_key: &str,
    properties: &BasicProperties,
    body_len: usize,
    server: Option<&Server>,
) -> MessageDescription {
    let mut d = MessageDescription::new(MessagingSystem::RabbitMq, operation)
        .destination(name)
        .body_size(body_len);
    d.destination.legacy_name = Some(legacy_destination(exchange));
    d.routing_key = (!routing_key.is_empty())
        .then(|| LAST_ROUTING_KEY.with(|last| last.get(routing_key, Text::clone)));
    d.conversation_id = properties
        .correlation_id()
        .as_ref()
        .map(|c| c.as_str().into());
    d.message_id = properties.message_id().as_ref().map(|c| c.as_str().into());
    if let Some(s) = server {
        d.server_address = Some(s.address.clone());
        d.server_port = Some(s.port);
    }
    d
}

/// A publish to `exchange` with `routing_key`.
pub(crate) fn publish_description(
    exchange: &str,
    routing_key: &str,
    properties: &BasicProperties,
    body_len: usize,
    server: Option<&Server>,
) -> MessageDescription {
    base(
        OperationType::Send,
        publish_destination(exchange, routing_key),
        exchange,
        routing_key,
        properties,
        body_len,
        server,
    )
}

/// A delivery from `queue`.
pub(crate) fn delivery_description(
    exchange: &str,
    routing_key: &str,
    queue: &str,
    properties: &BasicProperties,
    body_len: usize,
    server: Option<&Server>,
) -> MessageDescription {
    let mut d = base(
        OperationType::Process,
        consume_destination(exchange, routing_key, queue),
        exchange,
        routing_key,
        properties,
        body_len,
        server,
    );
    // Server-named queues: the name is not fit for a span name.
    d.destination.anonymous = queue.starts_with("amq.gen-");
    d
}

/// An AMQP reply as `error.type`: its name in lower case.
pub(crate) fn amqp_error_type(error: &AMQPError) -> String {
    match error.kind() {
        AMQPErrorKind::Soft(s) => s.to_string().to_ascii_lowercase(),
        AMQPErrorKind::Hard(h) => h.to_string().to_ascii_lowercase(),
    }
}

/// `error.type` for a broker error: the AMQP reply name in lower case
/// (`not-found`, `connection-forced`), else a short name for the failure.
pub fn error_type(error: &lapin::Error) -> String {
    match error.kind() {
        ErrorKind::ProtocolError(e) => amqp_error_type(e),
        ErrorKind::IOError(_) => "io".to_owned(),
        ErrorKind::InvalidChannelState(..) => "channel-closed".to_owned(),
        ErrorKind::InvalidConnectionState(_) => "connection-closed".to_owned(),
        ErrorKind::MissingHeartbeatError => "missing-heartbeat".to_owned(),
        _ => "_OTHER".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_names_follow_the_conventions() {
        assert_eq!(
            publish_destination("shop", "order.created"),
            "shop:order.created"
        );
        assert_eq!(publish_destination("logs", ""), "logs");
        assert_eq!(publish_destination("", "orders"), "orders");
        assert_eq!(publish_destination("", ""), "amq.default");
        assert_eq!(
            consume_destination("shop", "order.created", "billing"),
            "shop:order.created:billing"
        );
        assert_eq!(consume_destination("", "orders", "orders"), "orders");
        assert_eq!(consume_destination("logs", "", "q"), "logs:q");
    }

    #[test]
    fn server_leaves_credentials_out() {
        let s = Server::from_uri("amqp://user:secret@rabbit.internal:5673/%2f");
        assert_eq!(
            s,
            Some(Server {
                address: "rabbit.internal".into(),
                port: 5673
            })
        );
        assert_eq!(
            Server::from_uri("amqp://localhost").map(|s| s.port),
            Some(5672)
        );
    }
}
