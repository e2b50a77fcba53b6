//! Cost of mqtrace's span recipes (send with inject; process with extract, handler
//! and finish), with an always-on sampler and with sampling off. Spans go to a
//! processor that discards them, so export cost is not in the figures.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::FutureExt as _;
use mqtrace::embedded::{HeaderExtractor, HeaderInjector, Headers};
use mqtrace::settle::{Forward, Routes, Settlement, Settler};
use mqtrace::{
    Conventions, Disposition, ForwardKind, Inbound, Instrumenter, MessageDescription,
    MessagingSystem, OperationType,
};
use opentelemetry::propagation::Extractor;
use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, Span, SpanData, SpanProcessor};

#[derive(Debug)]
struct Discard;

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

struct Incoming {
    headers: Headers,
    body: Vec<u8>,
}

impl Inbound for Incoming {
    fn description(&self) -> MessageDescription {
        let mut d = MessageDescription::new(MessagingSystem::Kafka, OperationType::Process)
            .destination("orders")
            .body_size(self.body.len());
        d.partition = Some("3".into());
        d.offset = Some(1234);
        d.consumer_group = Some("billing".into());
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
struct FreeSettle;

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

fn recipes(c: &mut Criterion) {
    let mut group = c.benchmark_group("spans");
    for (mode, sampler) in [
        ("always_on", Sampler::AlwaysOn),
        ("sampling_off", Sampler::AlwaysOff),
    ] {
        let provider = SdkTracerProvider::builder()
            .with_sampler(sampler)
            .with_span_processor(Discard)
            .build();
        let instrumenter = Instrumenter::builder()
            .tracer_provider(&provider)
            .conventions(Conventions::Current)
            .build();
        let body = vec![b'x'; 100];
        let send = MessageDescription::new(MessagingSystem::Kafka, OperationType::Send)
            .destination("orders")
            .body_size(body.len());

        group.bench_function(format!("send+inject/{mode}"), |b| {
            b.iter(|| {
                let span = instrumenter.start_send(black_box(&send), Some(&body));
                let mut headers = Headers::new();
                instrumenter.inject(&span, &mut HeaderInjector(&mut headers));
                span.end();
                black_box(headers)
            })
        });

        // A message as a producer with the same sampler would have sent it.
        let mut headers = Headers::new();
        let span = instrumenter.start_send(&send, None);
        instrumenter.inject(&span, &mut HeaderInjector(&mut headers));
        span.end();
        let incoming = Incoming {
            headers,
            body: body.clone(),
        };
        group.bench_function(format!("process/{mode}"), |b| {
            b.iter(|| {
                let processed = instrumenter
                    .process(black_box(&incoming), async { Ok(()) })
                    .now_or_never()
                    .expect("ready");
                processed.finish(Disposition::Settle).is_ok()
            })
        });
        // The same, ended through the core's lifecycle (decide, settle, record).
        group.bench_function(format!("process+settle/{mode}"), |b| {
            b.iter(|| {
                let processed = instrumenter
                    .process(black_box(&incoming), async { Ok(()) })
                    .now_or_never()
                    .expect("ready");
                instrumenter
                    .settle(processed, FreeSettle)
                    .now_or_never()
                    .expect("ready")
                    .is_done()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, recipes);
criterion_main!(benches);
