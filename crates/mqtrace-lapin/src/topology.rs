//! Declaration helpers: durable exchanges, and queues bound to routing keys with an
//! optional dead-letter exchange.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

/// Declares a durable exchange (idempotent when it exists with the same settings).
pub async fn declare_exchange(
    channel: &Channel,
    name: &str,
    kind: ExchangeKind,
) -> lapin::Result<()> {
    channel
        .exchange_declare(
            short(name)?,
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Where a queue's rejected and exhausted messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The dead-letter exchange (declared durable, `fanout`).
    pub exchange: String,
    /// The queue bound to it.
    pub queue: String,
}

/// A durable queue, its bindings and its dead-letter exchange. The traced consumer
/// declares it on every (re)connection and learns its dead-letter exchange from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    name: String,
    bindings: Vec<(String, String)>,
    dead_letter: Option<DeadLetter>,
}

impl QueueSpec {
    /// A durable queue named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            bindings: Vec::new(),
            dead_letter: None,
        }
    }

    /// Binds the queue to `exchange` with `routing_key` (a pattern for topic
    /// exchanges). The exchange must exist.
    pub fn bind(mut self, exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        self.bindings.push((exchange.into(), routing_key.into()));
        self
    }

    /// Rejected messages go to `exchange` (declared `fanout`, durable), which feeds
    /// `queue` (declared durable).
    pub fn dead_letter(mut self, exchange: impl Into<String>, queue: impl Into<String>) -> Self {
        self.dead_letter = Some(DeadLetter {
            exchange: exchange.into(),
            queue: queue.into(),
        });
        self
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its dead-letter set-up, if any.
    pub fn dead_letter_of(&self) -> Option<&DeadLetter> {
        self.dead_letter.as_ref()
    }

    /// Declares the dead-letter exchange and queue, the queue, and its bindings.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let mut arguments = FieldTable::default();
        if let Some(dl) = &self.dead_letter {
            declare_exchange(channel, &dl.exchange, ExchangeKind::Fanout).await?;
            channel
                .queue_declare(short(&dl.queue)?, durable, FieldTable::default())
                .await?;
            channel
                .queue_bind(
                    short(&dl.queue)?,
                    short(&dl.exchange)?,
                    ShortString::from(""),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            arguments.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(LongString::from(dl.exchange.as_str())),
            );
        }
        channel
            .queue_declare(short(&self.name)?, durable, arguments)
            .await?;
        for (exchange, routing_key) in &self.bindings {
            channel
                .queue_bind(
                    short(&self.name)?,
                    short(exchange)?,
                    short(routing_key)?,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }
}

/// A name as AMQP's short string; over 255 bytes is an error, not a panic.
pub(crate) fn short(name: &str) -> lapin::Result<ShortString> {
    ShortString::try_new(name)
        .map_err(|e| lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))
}
