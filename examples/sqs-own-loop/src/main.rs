//! An SQS receive loop of one's own, traced by mqtrace.
//!
//! The service keeps its aws-sdk-sqs client: it sends with `send_message()`
//! (through [`SendMessageExt::send_traced`], a `send` span with the context in the
//! message attributes and `AWSTraceHeader`) and receives with its own
//! `receive_message()` loop. For each message it hands mqtrace only the handler's
//! future ([`MessageTracer::process`]) and the settlement
//! ([`MessageTracer::settle`]): the process span, the delete, leaving a failure
//! for SQS to hand out again, and the dead letter are mqtrace's.
//!
//! Three payments go out; `p-3` hits a gateway that keeps timing out: SQS hands it
//! out again after its one-second visibility timeout, and on the third attempt it
//! goes to the dead-letter queue.
//!
//! ```text
//! SQS_ENDPOINT=http://127.0.0.1:4566 \
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 \
//!   cargo run -p sqs-own-loop
//! ```
#![forbid(unsafe_code)]

use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use aws_sdk_sqs::Client;
use mqtrace::settle::ConsumerCounters;
use mqtrace::{Attempt, HandlerError, HandlerResult};
use mqtrace_aws_sqs::{MessageTracer, SendMessageExt as _};
use mqtrace_telemetry::TelemetryBuilder;

type Failure = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Failure> {
    let endpoint = std::env::var("SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4566".into());
    // A name of its own per run, so that runs never share a queue.
    let name = std::env::var("QUEUE").unwrap_or_else(|_| "payments".into());
    let client = Client::from_conf(
        aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(&endpoint)
            .credentials_provider(Credentials::new("test", "test", None, None, "example"))
            .build(),
    );
    let telemetry = TelemetryBuilder::default()
        .service_name("payments")
        .install_global(false)
        .build()?;
    let instrumenter = telemetry.instrumenter().build();
    let queue = client
        .create_queue()
        .queue_name(&name)
        // A failed attempt comes back after a second.
        .attributes(QueueAttributeName::VisibilityTimeout, "1")
        .send()
        .await
        .map_err(|e| format!("cannot reach SQS at {endpoint} ({e}); set SQS_ENDPOINT"))?
        .queue_url
        .unwrap_or_default();
    let dead = client
        .create_queue()
        .queue_name(format!("{name}-dead"))
        .send()
        .await?
        .queue_url
        .unwrap_or_default();

    // Sending with the plain client, inside `send` spans.
    for id in ["p-1", "p-2", "p-3"] {
        client
            .send_message()
            .queue_url(&queue)
            .message_body(format!(r#"{{"payment":"{id}"}}"#))
            .send_traced(&instrumenter)
            .await?;
    }

    // The service's own receive loop.
    let tracer = MessageTracer::new(client.clone(), &queue, &instrumenter).dead_letter_queue(&dead);
    let counters = ConsumerCounters::new();
    // Three payments, two done at once and one tried three times.
    while counters.snapshot().settled + counters.snapshot().dead_lettered < 3 {
        let out = client
            .receive_message()
            .queue_url(&queue)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await?;
        for message in out.messages() {
            let processed = tracer
                .process(message, |attempt| {
                    charge(message.body().unwrap_or_default(), attempt)
                })
                .await;
            counters.record(&tracer.settle(processed, message).await);
        }
    }
    println!("payments: {:?}", counters.snapshot());
    for url in [&queue, &dead] {
        let _ = client.delete_queue().queue_url(url).send().await;
    }
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    Ok(())
}

/// Charges a payment; the gateway always times out for `p-3`.
async fn charge(body: &str, attempt: Attempt) -> HandlerResult {
    let payment: serde_json::Value = serde_json::from_str(body)
        .map_err(|e| HandlerError::permanent(e).with_type("invalid_json"))?;
    tracing::info!(%payment, attempt = attempt.number(), "charging");
    if payment["payment"] == "p-3" {
        return Err(HandlerError::transient("gateway timeout").with_type("timeout"));
    }
    Ok(())
}
