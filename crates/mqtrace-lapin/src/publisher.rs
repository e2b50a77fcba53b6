//! Traced publishing.

use std::time::{SystemTime, UNIX_EPOCH};

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation};
use mqtrace::{Instrumenter, MessagingSpan};

use crate::carrier::FieldTableInjector;
use crate::describe::{amqp_error_type, error_type, publish_description, Server};

/// Publishes with a `send` span (PRODUCER) whose context travels in the message's
/// headers.
///
/// The span ends when the broker has answered: on the publisher confirm when the
/// channel is in confirm mode ([`Channel::confirm_select`]), else when the frame
/// was written. A nack, or a mandatory message returned as unroutable, marks the
/// span as an error; the caller still gets lapin's [`Confirmation`] and errors
/// unchanged.
#[derive(Debug, Clone)]
pub struct TracedPublisher {
    channel: Channel,
    instrumenter: Instrumenter,
    server: Option<Server>,
}

impl TracedPublisher {
    /// Wraps a channel.
    pub fn new(channel: Channel, instrumenter: Instrumenter) -> Self {
        Self {
            channel,
            instrumenter,
            server: None,
        }
    }

    /// The broker's address, recorded as `server.address` / `server.port` (see
    /// [`Server::from_uri`]).
    pub fn server(mut self, server: Option<Server>) -> Self {
        self.server = server;
        self
    }

    /// The channel.
    pub fn inner(&self) -> &Channel {
        &self.channel
    }

    /// The channel, unwrapped.
    pub fn into_inner(self) -> Channel {
        self.channel
    }

    /// Publishes `payload` to `exchange` with `routing_key`, inside a `send` span.
    ///
    /// The span's context is added to the properties' headers (existing headers are
    /// kept), and the `timestamp` property is set to now unless given, so consumers
    /// can record how long the message waited.
    pub async fn publish(
        &self,
        exchange: ShortString,
        routing_key: ShortString,
        options: BasicPublishOptions,
        payload: &[u8],
        properties: BasicProperties,
    ) -> lapin::Result<Confirmation> {
        publish_in_span(
            &self.channel,
            &self.instrumenter,
            self.server.as_ref(),
            (exchange, routing_key),
            options,
            payload,
            properties,
        )
        .await
    }

    /// Publishes a value as JSON: `content_type` is `application/json` and delivery
    /// is persistent (delivery mode 2). An encoding failure creates no span and
    /// sends nothing.
    #[cfg(feature = "json")]
    pub async fn publish_json<T: serde::Serialize + ?Sized>(
        &self,
        exchange: &str,
        routing_key: &str,
        value: &T,
        properties: BasicProperties,
    ) -> Result<Confirmation, PublishJsonError> {
        let body = serde_json::to_vec(value).map_err(PublishJsonError::Encode)?;
        let exchange = ShortString::try_new(exchange).map_err(PublishJsonError::Name)?;
        let routing_key = ShortString::try_new(routing_key).map_err(PublishJsonError::Name)?;
        let properties = properties
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        self.publish(
            exchange,
            routing_key,
            BasicPublishOptions::default(),
            &body,
            properties,
        )
        .await
        .map_err(PublishJsonError::Broker)
    }
}

/// Why [`TracedPublisher::publish_json`] failed.
#[cfg(feature = "json")]
#[derive(Debug, thiserror::Error)]
pub enum PublishJsonError {
    /// The value could not be encoded as JSON.
    #[error("cannot encode the message as JSON: {0}")]
    Encode(#[source] serde_json::Error),
    /// The exchange or routing key is longer than AMQP allows (255 bytes).
    #[error("invalid exchange or routing key: {0}")]
    Name(#[source] lapin::types::ShortStringError),
    /// The broker or the connection failed.
    #[error(transparent)]
    Broker(lapin::Error),
}

/// Publishes inside a `send` span that ends on the broker's answer: what
/// [`TracedPublisher`] and [`crate::ChannelExt`] share.
pub(crate) async fn publish_in_span(
    channel: &Channel,
    instrumenter: &Instrumenter,
    server: Option<&Server>,
    (exchange, routing_key): (ShortString, ShortString),
    options: BasicPublishOptions,
    payload: &[u8],
    properties: BasicProperties,
) -> lapin::Result<Confirmation> {
    let d = publish_description(
        exchange.as_str(),
        routing_key.as_str(),
        &properties,
        payload.len(),
        server,
    );
    let span = instrumenter.start_send(&d, Some(payload));
    let properties = prepare(instrumenter, &span, properties);
    let result = async {
        channel
            .basic_publish(exchange, routing_key, options, payload, properties)
            .await?
            .await
    }
    .await;
    record_confirmation(&span, &result);
    span.end();
    result
}

/// Injects the span's context into the headers and stamps the publish time.
pub(crate) fn prepare(
    instrumenter: &Instrumenter,
    span: &MessagingSpan,
    properties: BasicProperties,
) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    instrumenter.inject(span, &mut FieldTableInjector(&mut headers));
    let properties = properties.with_headers(headers);
    if properties.timestamp().is_some() {
        return properties;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    properties.with_timestamp(now)
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Refused(pub(crate) String);

/// Marks the span by the broker's answer.
pub(crate) fn record_confirmation(span: &MessagingSpan, result: &lapin::Result<Confirmation>) {
    match result {
        Ok(Confirmation::Nack(_)) => {
            span.record_failure("nack", &Refused("the broker refused the message".into()));
        }
        Ok(Confirmation::Ack(Some(returned))) => {
            let kind = returned
                .error()
                .map_or_else(|| "_OTHER".to_owned(), |e| amqp_error_type(&e));
            let text = format!("returned: {}", returned.reply_text);
            span.record_failure(&kind, &Refused(text));
        }
        Ok(_) => {}
        Err(e) => span.record_failure(&error_type(e), e),
    }
}
