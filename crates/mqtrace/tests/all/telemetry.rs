//! Telemetry set-up: the guard flushes on drop over gRPC and HTTP; a collector that
//! is down or hangs never holds up message handling, and what was not exported is
//! counted.

use std::time::{Duration, Instant};

use mqtrace::embedded::{Message, TracedConsumer, TracedProducer};
use mqtrace::Instrumenter;
use mqtrace_telemetry::{Protocol, TelemetryBuilder};
use mqtrace_testing::Collector;
use opentelemetry::trace::{Span as _, Tracer, TracerProvider};
use opentelemetry_sdk::trace::BatchConfigBuilder;

use crate::helpers::broker_with;

async fn flushes_on_drop(protocol: Protocol) {
    let collector = Collector::start().await.unwrap();
    let endpoint = match protocol {
        Protocol::Grpc => collector.grpc_endpoint(),
        Protocol::HttpProtobuf => collector.http_endpoint(),
    };
    let guard = TelemetryBuilder::default()
        .service_name("flush-test")
        .endpoint(endpoint)
        .protocol(protocol)
        .install_global(false)
        // Nothing would be exported for a minute but for the flush on drop.
        .batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(Duration::from_secs(60))
                .build(),
        )
        .build()
        .unwrap();
    guard
        .provider()
        .unwrap()
        .tracer("t")
        .start("last words")
        .end();
    assert!(collector.spans().is_empty());
    tokio::task::spawn_blocking(move || drop(guard))
        .await
        .unwrap();
    let spans = collector.spans();
    assert_eq!(spans.len(), 1, "exported before drop returned");
    assert_eq!(spans[0].name, "last words");
    assert_eq!(spans[0].service, "flush-test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_flushes_on_drop_over_grpc() {
    flushes_on_drop(Protocol::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_flushes_on_drop_over_http() {
    flushes_on_drop(Protocol::HttpProtobuf).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_name_defaults_to_the_executable() {
    let collector = Collector::start().await.unwrap();
    let guard = TelemetryBuilder::default()
        .endpoint(collector.grpc_endpoint())
        .install_global(false)
        .build()
        .unwrap();
    guard.provider().unwrap().tracer("t").start("s").end();
    tokio::task::spawn_blocking(move || drop(guard))
        .await
        .unwrap();
    let expected = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| {
        std::env::current_exe()
            .unwrap()
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    });
    assert_eq!(collector.spans()[0].service, expected);
}

/// Sends and processes `n` messages with telemetry pointed at `endpoint`; returns
/// how long the messaging took and the guard's final counts.
async fn pipeline_against(
    endpoint: String,
    n: usize,
) -> (Duration, mqtrace_telemetry::ExportStats) {
    let guard = TelemetryBuilder::default()
        .service_name("degraded")
        .endpoint(endpoint)
        .install_global(false)
        .export_timeout(Duration::from_millis(500))
        .shutdown_timeout(Duration::from_secs(1))
        .batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(64)
                .with_max_export_batch_size(32)
                .with_scheduled_delay(Duration::from_millis(10))
                .build(),
        )
        .build()
        .unwrap();
    let instrumenter = Instrumenter::builder()
        .tracer_provider(guard.provider().unwrap())
        .build();
    let broker = broker_with(&[("orders", None)]);
    let started = Instant::now();
    let producer = TracedProducer::new(broker.clone(), instrumenter.clone());
    for i in 0..n {
        producer
            .send("orders", Message::new(i.to_string()))
            .await
            .unwrap();
    }
    let stats = TracedConsumer::new(broker, "orders", instrumenter)
        .run_until_idle(|_| async { Ok(()) })
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(stats.settled, n as u64, "every message processed");
    let stats = tokio::task::spawn_blocking(move || guard.shutdown())
        .await
        .unwrap();
    (took, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_collector_blocks_nothing_and_drops_are_counted() {
    // A port that was free a moment ago: connections are refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (took, stats) = tokio::time::timeout(
        Duration::from_secs(60),
        pipeline_against(format!("http://{closed}"), 2_000),
    )
    .await
    .expect("messaging finished although the collector is down");
    assert_eq!(stats.ended, 4_000);
    assert_eq!(stats.exported, 0);
    assert_eq!(stats.not_exported(), 4_000);
    // Correctness bound, not a performance target: nothing waited on the exporter's
    // 500 ms timeout per batch (that alone would be over a minute here).
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_collector_blocks_nothing() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let (took, stats) = tokio::time::timeout(
        Duration::from_secs(60),
        pipeline_against(format!("http://{addr}"), 2_000),
    )
    .await
    .expect("messaging finished although the collector hangs");
    accept.abort();
    assert_eq!(stats.ended, 4_000);
    assert_eq!(stats.exported, 0);
    assert!(took < Duration::from_secs(30), "took {took:?}");
}
