//! A Kafka consumer loop of one's own, traced by mqtrace.
//!
//! The service keeps its rdkafka clients: a plain `FutureProducer` sends through
//! [`FutureProducerExt::send_traced`] (a `send` span ending on the delivery
//! report), and a plain `StreamConsumer` is read in the service's own loop. For
//! each record it hands mqtrace only the handler's future
//! ([`RecordTracer::process`]) and the settlement ([`RecordTracer::settle`]):
//! the process span, the retries, the dead letter and the commit are mqtrace's.
//!
//! Three payments go out; `p-3` hits a gateway that keeps timing out, so it goes
//! back to the topic twice and then to the dead-letter topic.
//!
//! ```text
//! KAFKA_BOOTSTRAP=127.0.0.1:9092 \
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 \
//!   cargo run -p kafka-own-loop
//! ```
//!
//! It creates its two topics when they are missing.
#![forbid(unsafe_code)]

use std::time::Duration;

use mqtrace::settle::ConsumerCounters;
use mqtrace::{Attempt, HandlerError, HandlerResult};
use mqtrace_rdkafka::{FutureProducerExt as _, RecordTracer};
use mqtrace_telemetry::TelemetryBuilder;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

type Failure = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Failure> {
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
    // A name of its own per run, so that runs never share a topic.
    let topic = std::env::var("TOPIC").unwrap_or_else(|_| "payments".into());
    let dead = format!("{topic}.dlq");
    let telemetry = TelemetryBuilder::default()
        .service_name("payments")
        .install_global(false)
        .build()?;
    let instrumenter = telemetry.instrumenter().build();

    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &bootstrap)
        .set("message.timeout.ms", "10000");
    create_topics(&config, &[&topic, &dead]).await?;

    // Producing with the plain producer, inside `send` spans.
    let producer: FutureProducer = config.create()?;
    for id in ["p-1", "p-2", "p-3"] {
        let body = format!(r#"{{"payment":"{id}"}}"#);
        producer
            .send_traced(
                &instrumenter,
                FutureRecord::to(&topic).key(id).payload(&body),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }

    // The service's own consumer loop, committing through mqtrace.
    let mut consumer_config = config.clone();
    consumer_config
        .set("group.id", format!("{topic}-workers"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false");
    let consumer: StreamConsumer = consumer_config.create()?;
    consumer.subscribe(&[&topic])?;
    let tracer = RecordTracer::new(instrumenter, producer)
        .config(&consumer_config)
        .dead_letter_topic(&dead);
    let counters = ConsumerCounters::new();
    // Three payments, two done at once and one tried three times.
    while counters.snapshot().settled + counters.snapshot().dead_lettered < 3 {
        let record = consumer.recv().await?;
        let processed = tracer
            .process(&record, |attempt| {
                charge(record.payload().unwrap_or_default(), attempt)
            })
            .await;
        counters.record(&tracer.settle(processed, &record, &consumer).await);
    }
    println!("payments: {:?}", counters.snapshot());
    drop(consumer);
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

async fn create_topics(config: &ClientConfig, names: &[&str]) -> Result<(), Failure> {
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1)))
        .collect();
    for result in admin.create_topics(&topics, &AdminOptions::new()).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(format!("cannot create {topic}: {code}").into()),
        }
    }
    Ok(())
}
