//! Pieces the benchmarks and the callgrind driver (`examples/lifecycle_cost.rs`)
//! share: a processor that drops spans, a meter provider that never exports
//! during a run, a Kafka-like message, a free settlement.

use std::hint::black_box;

use mqtrace::embedded::{HeaderExtractor, Headers};
use mqtrace::settle::{Forward, Routes, Settlement, Settler};
use mqtrace::{ForwardKind, Inbound, MessageDescription, MessagingSystem, OperationType, Text};
use opentelemetry::propagation::Extractor;
use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanProcessor};

/// Drops every span: export cost stays out of the figures.
#[derive(Debug)]
pub(crate) struct Discard;

impl SpanProcessor for Discard {
    fn on_start(&self, _: &mut Span, _: &Context) {}
    fn on_end(&self, span: SpanData) {
        black_box(span);
    }
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _: std::time::Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// An SDK meter provider whose reader would export once an hour: measurements
/// are aggregated as in a service, none leaves during a run.
pub(crate) fn idle_meters() -> opentelemetry_sdk::metrics::SdkMeterProvider {
    opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_reader(
            opentelemetry_sdk::metrics::PeriodicReader::builder(
                opentelemetry_sdk::metrics::InMemoryMetricExporter::default(),
            )
            .with_interval(std::time::Duration::from_secs(3600))
            .build(),
        )
        .build()
}

/// A consumed Kafka-like record: partition, offset, group, headers and body.
pub(crate) struct Incoming {
    pub(crate) headers: Headers,
    pub(crate) body: Vec<u8>,
}

impl Inbound for Incoming {
    fn description(&self) -> MessageDescription {
        let mut d = MessageDescription::new(MessagingSystem::Kafka, OperationType::Process)
            .destination(Text::from_static("orders"))
            .body_size(self.body.len());
        // Texts an adapter makes once and shares, as the Kafka adapter does.
        d.partition = Some(Text::from_static("3"));
        d.offset = Some(1234);
        d.consumer_group = Some(Text::from_static("billing"));
        d
    }
    fn headers(&self) -> impl Extractor + '_ {
        HeaderExtractor(&self.headers)
    }
    fn body(&self) -> &[u8] {
        &self.body
    }
}

/// A broker whose settlement costs nothing: what the lifecycle itself adds.
pub(crate) struct FreeSettle;

impl Settler for FreeSettle {
    type Error = std::convert::Infallible;
    fn routes(&self) -> Routes<'_> {
        Routes::forward_retries("orders")
    }
    fn describe_forward(&self, _: ForwardKind, target: &str) -> MessageDescription {
        MessageDescription::new(MessagingSystem::Kafka, OperationType::Send).destination(target)
    }
    fn forward(&self, _: Forward<'_>) -> impl std::future::Future<Output = bool> + Send {
        std::future::ready(true)
    }
    fn settle_name(&self, _: Settlement) -> Option<&'static str> {
        Some("commit")
    }
    fn settle(
        self,
        _: Settlement,
    ) -> impl std::future::Future<Output = Result<(), Self::Error>> + Send {
        std::future::ready(Ok(()))
    }
    fn error_type(error: &Self::Error) -> String {
        match *error {}
    }
}
