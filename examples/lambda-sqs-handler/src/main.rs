//! An SQS-triggered Lambda function with partial batch failures, traced.
//!
//! Each record is a payment to capture. A malformed record is a permanent failure;
//! a payment above the limit fails as "provider busy" (transient). Both go into
//! `batchItemFailures`, so SQS redelivers just those records (and its redrive
//! policy moves poison messages on). Every record has its span, linked to the
//! producer's trace; the batch span links them all; spans are flushed before the
//! invocation returns.
//!
//! Deployed, the Lambda runtime drives it. Locally, give it an event file:
//!
//! ```text
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 \
//!   cargo run -p lambda-sqs-handler -- crates/mqtrace-aws-lambda/tests/fixtures/mixed_sources.json
//! ```
//!
//! It prints the batch response.
#![forbid(unsafe_code)]

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use lambda_runtime::{service_fn, Error, LambdaEvent};
use mqtrace::{HandlerError, HandlerResult};
use mqtrace_aws_lambda::TracedSqsHandler;
use serde::Deserialize;
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;

#[derive(Debug, Deserialize)]
struct Payment {
    order: u64,
    #[serde(default)]
    amount_cents: u64,
}

const LIMIT_CENTS: u64 = 100_000;

#[derive(Debug)]
struct ProviderBusy;

impl std::fmt::Display for ProviderBusy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("payment provider busy")
    }
}

impl std::error::Error for ProviderBusy {}

async fn capture(record: SqsMessage) -> HandlerResult {
    let body = record.body.unwrap_or_default();
    let payment: Payment = serde_json::from_str(&body)
        .map_err(|e| HandlerError::permanent(e).with_type("invalid_payment"))?;
    async {
        if payment.amount_cents > LIMIT_CENTS {
            return Err(HandlerError::transient(ProviderBusy).with_type("provider_busy"));
        }
        tracing::info!(order = payment.order, "captured");
        Ok(())
    }
    .instrument(tracing::info_span!(
        "capture payment",
        order = payment.order
    ))
    .await
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let telemetry = mqtrace_telemetry::TelemetryBuilder::default()
        .service_name("payments-lambda")
        .quiet_targets(mqtrace_aws_lambda::CLIENT_TARGETS)
        .install_global(false)
        .build()?;
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(telemetry.tracing_layer()),
    )?;
    let instrumenter = telemetry.instrumenter().build();
    let traced = TracedSqsHandler::new(&instrumenter, telemetry.flusher());
    let handle = |event: LambdaEvent<SqsEvent>| {
        let traced = traced.clone();
        async move {
            let response: SqsBatchResponse = traced
                .handle(event, |record| capture(record.clone()))
                .await?;
            Ok::<_, Error>(response)
        }
    };

    if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() {
        return lambda_runtime::run(service_fn(handle)).await;
    }
    // Locally: one invocation with the event in the file named on the command line.
    let path = std::env::args()
        .nth(1)
        .ok_or("give an SQS event JSON file, or run under the Lambda runtime")?;
    let event: SqsEvent = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let mut context = lambda_runtime::Context::default();
    context.request_id = "local-invocation".into();
    let response = handle(LambdaEvent::new(event, context)).await?;
    println!("{}", serde_json::to_string(&response)?);
    Ok(())
}
