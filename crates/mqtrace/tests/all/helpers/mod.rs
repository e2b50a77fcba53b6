//! Shared set-up: an in-process collector and a tracer provider exporting to it over
//! real OTLP, through mqtrace's own telemetry set-up.

use std::time::Duration;

use mqtrace::embedded::{Broker, QueueOptions};
use mqtrace::{Instrumenter, InstrumenterBuilder};
use mqtrace_telemetry::{Protocol, TelemetryBuilder, TelemetryGuard};
use mqtrace_testing::{Collector, Forest, RecordedSpan};
use opentelemetry_sdk::trace::BatchConfigBuilder;

pub struct Harness {
    pub collector: Collector,
    pub guard: TelemetryGuard,
}

impl Harness {
    pub async fn start() -> Self {
        Self::with_protocol(Protocol::Grpc).await
    }

    pub async fn with_protocol(protocol: Protocol) -> Self {
        Self::configured(protocol, |b| b).await
    }

    /// A harness whose telemetry set-up is adjusted by `configure`.
    pub async fn configured(
        protocol: Protocol,
        configure: impl FnOnce(TelemetryBuilder) -> TelemetryBuilder,
    ) -> Self {
        let collector = Collector::start().await.expect("collector starts");
        let endpoint = match protocol {
            Protocol::Grpc => collector.grpc_endpoint(),
            Protocol::HttpProtobuf => collector.http_endpoint(),
        };
        let guard = configure(TelemetryBuilder::default())
            .service_name("mqtrace-test")
            .endpoint(endpoint)
            .protocol(protocol)
            .install_global(false)
            .batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(Duration::from_millis(50))
                    .build(),
            )
            .build()
            .expect("telemetry set-up");
        Self { collector, guard }
    }

    /// An instrumenter exporting to this harness's collector.
    pub fn instrumenter(
        &self,
        configure: impl FnOnce(InstrumenterBuilder) -> InstrumenterBuilder,
    ) -> Instrumenter {
        configure(self.guard.instrumenter()).build()
    }

    /// Flushes the metrics and renders the streams of `names` (see
    /// `RecordedMetric::render`), leaving out the attributes in `hide`.
    pub async fn metrics(&self, names: &[&str], hide: &[&str]) -> String {
        let provider = self.guard.meter_provider().expect("telemetry enabled");
        self.collector.flushed_metrics(provider, names, hide).await
    }

    /// Flushes and waits for exactly `count` spans; fails if a different number came.
    pub async fn spans(&self, count: usize) -> Vec<RecordedSpan> {
        self.collector
            .exactly(self.guard.provider().expect("telemetry enabled"), count)
            .await
    }

    pub async fn forest(&self, count: usize) -> Forest {
        Forest::new(self.spans(count).await)
    }
}

pub fn broker_with(queues: &[(&str, Option<&str>)]) -> Broker {
    let broker = Broker::new();
    for (name, dlq) in queues {
        let mut options = QueueOptions::default();
        if let Some(dlq) = dlq {
            options = options.dead_letter(*dlq);
        }
        broker.declare_queue(*name, options);
    }
    broker
}

pub use mqtrace_testing::assert_tree;
