//! An order queue on SQS, traced end to end.
//!
//! `checkout` sends 12 orders in one batch call (split into requests of 10 and 2,
//! a `create` span per order), the last one malformed. `fulfilment` polls the
//! queue; the malformed order is a permanent failure and goes to the dead-letter
//! queue with its error in the attributes. Each order is one trace.
//!
//! ```text
//! SQS_ENDPOINT=http://127.0.0.1:4566 \
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 \
//!   cargo run -p sqs-order-queue
//! ```
//!
//! Without `SQS_ENDPOINT` it talks to an emulator at `http://127.0.0.1:4566` with
//! static test credentials; the queues are created when missing.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use aws_sdk_sqs::Client;
use mqtrace::{HandlerResult, Instrumenter};
use mqtrace_aws_sqs::{TracedConsumer, TracedSqs};
use mqtrace_telemetry::{TelemetryBuilder, TelemetryGuard};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    order_id: u64,
    sku: String,
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

fn instrumenter(guard: &TelemetryGuard) -> Instrumenter {
    guard.instrumenter().build()
}

#[tokio::main]
async fn main() -> Result<(), Failure> {
    let endpoint = std::env::var("SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4566".into());
    let client = Client::from_conf(
        aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(&endpoint)
            .credentials_provider(Credentials::new("test", "test", None, None, "example"))
            .build(),
    );
    let checkout = TelemetryBuilder::default()
        .service_name("checkout")
        .install_global(false)
        .build()?;
    let fulfilment = TelemetryBuilder::default()
        .service_name("fulfilment")
        .install_global(false)
        .build()?;
    let queue = client
        .create_queue()
        .queue_name("orders")
        .send()
        .await
        .map_err(|e| format!("cannot reach SQS at {endpoint} ({e}); set SQS_ENDPOINT"))?
        .queue_url
        .unwrap_or_default();
    let dead = client
        .create_queue()
        .queue_name("orders-dead")
        .send()
        .await?
        .queue_url
        .unwrap_or_default();

    // checkout: one batch call for 12 orders.
    let mut entries = Vec::new();
    for order_id in 1..=12u64 {
        let body = if order_id == 12 {
            "{\"order_id\": 12, \"sku\":".to_owned()
        } else {
            serde_json::to_string(&Order {
                order_id,
                sku: format!("sku-{}", order_id % 3),
            })?
        };
        entries.push(
            SendMessageBatchRequestEntry::builder()
                .id(format!("order-{order_id}"))
                .message_body(body)
                .build()?,
        );
    }
    let sent = TracedSqs::new(client.clone(), instrumenter(&checkout))
        .send_batch(&queue, entries)
        .await;
    for (i, result) in sent.iter().enumerate() {
        let out = result.as_ref().map_err(|e| e.to_string())?;
        println!(
            "checkout: request {} sent {} orders, {} refused",
            i + 1,
            out.successful().len(),
            out.failed().len()
        );
    }

    // fulfilment: until all 12 are handled.
    let done = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&done);
    let stats = TracedConsumer::new(client.clone(), &queue, &instrumenter(&fulfilment))
        .dead_letter_queue(&dead)
        .wait_time_seconds(1)
        .run_until(
            move |message| {
                let counted = Arc::clone(&counted);
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let order: Order = message.json()?;
                    println!(
                        "fulfilment: packing order {} ({})",
                        order.order_id, order.sku
                    );
                    HandlerResult::Ok(())
                }
            },
            async move {
                while done.load(Ordering::SeqCst) < 12 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        )
        .await?;
    println!("fulfilment: {stats:?}");

    // Flush before exit: blocking calls, off the async threads.
    tokio::task::spawn_blocking(move || {
        checkout.shutdown();
        fulfilment.shutdown();
    })
    .await?;
    Ok(())
}
