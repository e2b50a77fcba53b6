//! An order service and a billing worker on Kafka, traced end to end.
//!
//! `orders-api` produces `OrderPlaced` records to the `orders` topic, keyed by
//! customer so each customer's orders stay in order. `billing` consumes them:
//! - it charges each order inside a `tracing` span (a child of the process span);
//! - the payment gateway times out on order 2's first attempt: a transient
//!   failure, so the record goes to `orders.retry` and is charged on the next try;
//! - order 3 is malformed: a permanent failure, so it goes to `orders.dlq` with
//!   its error in the headers.
//!
//! Each order is one trace. Run it with a Kafka broker and an OTLP collector:
//!
//! ```text
//! KAFKA_BOOTSTRAP=127.0.0.1:9092 \
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 \
//!   cargo run -p kafka-order-service
//! ```
//!
//! It creates the three topics when they are missing.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mqtrace::{HandlerError, HandlerResult, Instrumenter};
use mqtrace_rdkafka::{TracedConsumer, TracedProducer};
use mqtrace_telemetry::{TelemetryBuilder, TelemetryGuard};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::FutureRecord;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use tracing_subscriber::layer::SubscriberExt as _;

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: u64,
    customer: String,
    amount_cents: u64,
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

const TOPICS: [&str; 3] = ["orders", "orders.retry", "orders.dlq"];

fn instrumenter(guard: &TelemetryGuard) -> Instrumenter {
    guard.instrumenter().build()
}

#[tokio::main]
async fn main() -> Result<(), Failure> {
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let api = TelemetryBuilder::default()
        .service_name("orders-api")
        .install_global(false)
        .build()?;
    let billing = TelemetryBuilder::default()
        .service_name("billing")
        .quiet_targets(mqtrace_rdkafka::CLIENT_TARGETS)
        .install_global(false)
        .build()?;
    // Billing's `tracing` spans nest under its process spans.
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(billing.tracing_layer()),
    )?;

    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &bootstrap)
        .set("message.timeout.ms", "10000");
    create_topics(&config).await?;

    // orders-api: three orders, the third malformed.
    let producer = TracedProducer::from_config(&config, instrumenter(&api))?;
    for order_id in 1..=3u64 {
        let customer = format!("customer-{}", order_id % 2);
        let body = if order_id == 3 {
            b"{\"order_id\": 3, \"customer\":".to_vec()
        } else {
            serde_json::to_vec(&OrderPlaced {
                order_id,
                customer: customer.clone(),
                amount_cents: 1_250 * order_id,
            })?
        };
        let delivery = producer
            .send(
                FutureRecord::to("orders").key(&customer).payload(&body),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
        println!(
            "orders-api: order {order_id} at partition {} offset {}",
            delivery.partition, delivery.offset
        );
    }

    // billing: the orders topic and its retry topic, until every order is done.
    let mut consumer_config = config.clone();
    consumer_config
        .set("group.id", "billing")
        .set("auto.offset.reset", "earliest");
    let worker = instrumenter(&billing);
    let forwarder = TracedProducer::from_config(&config, worker.clone())?;
    let consumer = TracedConsumer::from_config(
        &consumer_config,
        &["orders", "orders.retry"],
        forwarder,
        worker,
    )?
    .retry_topic("orders.retry")
    .dead_letter_topic("orders.dlq");
    let done = Arc::new(AtomicUsize::new(0));
    let gateway_calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&done);
    let stats = consumer
        .run_until(
            move |record| {
                let (done, calls) = (Arc::clone(&counted), Arc::clone(&gateway_calls));
                async move {
                    let outcome = async {
                        let order: OrderPlaced = record.json()?;
                        charge(&order, &calls).await
                    }
                    .await;
                    // Charged, or malformed (it goes to the dead letters): done.
                    if outcome.is_ok()
                        || matches!(&outcome, Err(e) if e.error_type() == "invalid_json")
                    {
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    outcome
                }
            },
            async move {
                while done.load(Ordering::SeqCst) < 3 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        )
        .await?;
    println!("billing: {stats:?}");

    // Flush before exit: blocking calls, off the async threads.
    tokio::task::spawn_blocking(move || {
        api.shutdown();
        billing.shutdown();
    })
    .await?;
    Ok(())
}

#[derive(Debug)]
struct GatewayTimeout;

impl std::fmt::Display for GatewayTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("payment gateway timed out")
    }
}

impl std::error::Error for GatewayTimeout {}

#[tracing::instrument(name = "charge card", skip_all, fields(order_id = order.order_id))]
async fn charge(order: &OrderPlaced, calls: &AtomicUsize) -> HandlerResult {
    let call = calls.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(5)).await;
    // The gateway fails once, on order 2's first attempt.
    if order.order_id == 2 && call == 1 {
        return Err(HandlerError::transient(GatewayTimeout).with_type("gateway_timeout"));
    }
    tracing::info!(amount_cents = order.amount_cents, "charged");
    Ok(())
}

async fn create_topics(config: &ClientConfig) -> Result<(), Failure> {
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let topics: Vec<NewTopic<'_>> = TOPICS
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
