//! An instrumenter made before the application installs its global provider
//! exports once the provider is there (its own test binary: it installs the
//! global provider).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use mqtrace::embedded::{Broker, Message, QueueOptions, TracedProducer};
use mqtrace::{Instrumenter, Propagation};
use mqtrace_telemetry::TelemetryBuilder;
use mqtrace_testing::Collector;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instrumenter_built_before_the_global_provider_exports_once_it_is() {
    let instrumenter = Instrumenter::default();
    let broker = Broker::new();
    broker.declare_queue("early", QueueOptions::default());
    let producer = TracedProducer::new(broker, instrumenter);
    // No provider yet: this span goes nowhere, and the message still goes out.
    producer
        .send("early", Message::new("before"))
        .await
        .unwrap();

    let collector = Collector::start().await.unwrap();
    let guard = TelemetryBuilder::default()
        .service_name("late-provider")
        .endpoint(collector.grpc_endpoint())
        // Underscore keys for the whole process.
        .propagation(Propagation::builder().underscore().build())
        .build()
        .unwrap();
    producer.send("early", Message::new("after")).await.unwrap();
    producer.send("early", Message::new("again")).await.unwrap();
    let spans = collector.exactly(guard.provider().unwrap(), 2).await;
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["send early", "send early"]);
    // The instrumenter writes the formats the telemetry set-up installed.
    let queued = producer.inner().drain("early").unwrap();
    let keys = |i: usize| -> Vec<&str> { queued[i].headers.iter().map(|(k, _)| k).collect() };
    assert!(keys(0).is_empty(), "no span, no context: {:?}", keys(0));
    assert_eq!(keys(1), ["trace_id", "span_id", "trace_flags"]);
    assert_eq!(
        Instrumenter::default().propagation().header_fields(),
        ["trace_id", "span_id", "trace_flags", "trace_state"]
    );
    assert_eq!(queued.len(), 3, "every message was published");
}
