//! A RabbitMQ consumer loop of one's own, traced by mqtrace.
//!
//! The service keeps its lapin calls: it publishes with `basic_publish` (through
//! [`ChannelExt::publish_traced`], which wraps it in a `send` span) and consumes
//! with its own `basic_consume` stream. For each delivery it hands mqtrace only
//! the handler's future ([`DeliveryTracer::process`]) and the settlement
//! ([`DeliveryTracer::settle`]): the process span, the retries, the dead letter
//! and the ack are mqtrace's, decided as for every broker.
//!
//! Three payments go out; `p-3` hits a payment gateway that keeps timing out, so
//! it is retried twice and then dead-lettered with its failure metadata.
//!
//! ```text
//! AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 \
//!   cargo run -p rabbitmq-own-loop
//! ```
#![forbid(unsafe_code)]

use futures_util::StreamExt as _;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use mqtrace::settle::ConsumerCounters;
use mqtrace::{Attempt, HandlerError, HandlerResult};
use mqtrace_lapin::{ChannelExt as _, DeliveryTracer, QueueSpec, Server};
use mqtrace_telemetry::TelemetryBuilder;

type Failure = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Failure> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    // A name of its own per run, so that runs never share a queue.
    let queue_name = std::env::var("QUEUE").unwrap_or_else(|_| "payments".into());
    let telemetry = TelemetryBuilder::default()
        .service_name("payments")
        .install_global(false)
        .build()?;
    let instrumenter = telemetry.instrumenter().build();

    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .map_err(|e| {
            format!("cannot connect to RabbitMQ ({e}); set AMQP_URL to its amqp:// URL")
        })?;
    let channel = connection.create_channel().await?;
    // Confirms make a forward safe: it is acked by the broker before the delivery.
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let queue = QueueSpec::new(&queue_name)
        .dead_letter(format!("{queue_name}.dlx"), format!("{queue_name}.dead"));
    queue.declare(&channel).await?;

    // Publishing with the plain channel, inside `send` spans.
    for id in ["p-1", "p-2", "p-3"] {
        channel
            .publish_traced(
                &instrumenter,
                "".into(),
                queue_name.as_str().into(),
                BasicPublishOptions::default(),
                format!(r#"{{"payment":"{id}"}}"#).as_bytes(),
                BasicProperties::default(),
            )
            .await?;
    }

    // The service's own consumer loop.
    let tracer = DeliveryTracer::new(instrumenter, &queue).server(Server::from_uri(&url));
    let mut deliveries = channel
        .basic_consume(
            queue_name.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let counters = ConsumerCounters::new();
    // Three payments, two of them done at once and one tried three times.
    while counters.snapshot().settled + counters.snapshot().dead_lettered < 3 {
        let Some(delivery) = deliveries.next().await else {
            break;
        };
        let delivery = delivery?;
        let processed = tracer
            .process(&delivery, |attempt| charge(&delivery.data, attempt))
            .await;
        let settled = tracer.settle(processed, delivery, &channel).await;
        counters.record(&settled);
    }
    println!("payments: {:?}", counters.snapshot());
    let _ = connection.close(200, "example done".into()).await;
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    Ok(())
}

/// Charges a payment; the gateway always times out for `p-3`.
async fn charge(body: &[u8], attempt: Attempt) -> HandlerResult {
    let payment: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| HandlerError::permanent(e).with_type("invalid_json"))?;
    tracing::info!(%payment, attempt = attempt.number(), "charging");
    if payment["payment"] == "p-3" {
        return Err(HandlerError::transient("gateway timeout").with_type("timeout"));
    }
    Ok(())
}
