//! The meter provider's set-up over real OTLP: periodic export on the interval
//! asked for, the temporality of
//! `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`, and `OTEL_METRICS_EXPORTER=none`.
//! One test, run in order, since the variables are the process's.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use mqtrace::embedded::{Broker, Message, QueueOptions, TracedConsumer, TracedProducer};
use mqtrace_telemetry::TelemetryBuilder;
use mqtrace_testing::Collector;

/// Sends and processes one message through an instrumenter of `telemetry`.
async fn one_message(telemetry: &mqtrace_telemetry::TelemetryGuard) {
    let instrumenter = telemetry.instrumenter().build();
    let broker = Broker::new();
    broker.declare_queue("orders", QueueOptions::default());
    TracedProducer::new(broker.clone(), instrumenter.clone())
        .send("orders", Message::new("x"))
        .await
        .unwrap();
    TracedConsumer::new(broker, "orders", instrumenter)
        .run_until_idle(|_| async { Ok(()) })
        .await
        .unwrap();
}

fn builder(collector: &Collector) -> TelemetryBuilder {
    TelemetryBuilder::default()
        .service_name("metrics-env")
        .endpoint(collector.grpc_endpoint())
        .install_global(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_temporality_and_off() {
    // Exported on the interval, without a flush of ours; cumulative by default.
    let collector = Collector::start().await.unwrap();
    let telemetry = builder(&collector)
        .metric_export_interval(Duration::from_millis(200))
        .build()
        .unwrap();
    one_message(&telemetry).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while collector.metrics().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = collector.metrics();
    let sent = metrics
        .iter()
        .find(|m| m.name == "messaging.client.sent.messages")
        .expect("exported on the interval");
    assert_eq!(sent.number(), Some(1.0));
    assert!(!sent.delta, "cumulative by default");
    telemetry.shutdown_async().await;

    // Deltas when the variable says so.
    std::env::set_var("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "delta");
    let collector = Collector::start().await.unwrap();
    let telemetry = builder(&collector).build().unwrap();
    std::env::remove_var("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE");
    one_message(&telemetry).await;
    telemetry.shutdown_async().await;
    let metrics = collector.metrics();
    let sent = metrics
        .iter()
        .find(|m| m.name == "messaging.client.sent.messages")
        .expect("exported at shutdown");
    assert!(sent.delta, "{sent:?}");
    assert_eq!(sent.number(), Some(1.0));

    // Off: spans still go, metrics do not.
    std::env::set_var("OTEL_METRICS_EXPORTER", "none");
    let collector = Collector::start().await.unwrap();
    let telemetry = builder(&collector).build().unwrap();
    std::env::remove_var("OTEL_METRICS_EXPORTER");
    one_message(&telemetry).await;
    telemetry.shutdown_async().await;
    assert!(collector.metrics().is_empty(), "{:?}", collector.metrics());
    assert_eq!(collector.spans().len(), 2, "spans still exported");

    // A value the set-up does not know is a clear error.
    std::env::set_var("OTEL_METRICS_EXPORTER", "prometheus");
    let refused = builder(&collector).build();
    std::env::remove_var("OTEL_METRICS_EXPORTER");
    let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("OTEL_METRICS_EXPORTER=prometheus"),
        "{message}"
    );
}
