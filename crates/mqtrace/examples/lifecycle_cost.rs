//! Runs one delivery path many times, for instruction counts under callgrind:
//!
//! ```text
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p \
//!   target/release/examples/lifecycle_cost finish 20000
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p \
//!   target/release/examples/lifecycle_cost settle 20000
//! ```
//!
//! `finish`: process span, empty handler, disposition recorded by hand (what each
//! adapter did before the lifecycle moved into the core). `settle`: the same ended
//! through `Instrumenter::settle` with a settlement that costs nothing. Spans go to
//! a processor that drops them. The difference between the two, per message, is
//! what the core's lifecycle adds.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr
)]

use futures_util::FutureExt as _;
use mqtrace::embedded::{HeaderExtractor, HeaderInjector, Headers};
use mqtrace::settle::{Forward, Routes, Settlement, Settler};
use mqtrace::{
    Disposition, ForwardKind, Inbound, Instrumenter, MessageDescription, MessagingSystem,
    OperationType,
};
use opentelemetry::propagation::Extractor;
use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, Span, SpanData, SpanProcessor};

#[derive(Debug)]
struct Discard;

impl SpanProcessor for Discard {
    fn on_start(&self, _: &mut Span, _: &Context) {}
    fn on_end(&self, span: SpanData) {
        std::hint::black_box(span);
    }
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _: std::time::Duration) -> OTelSdkResult {
        Ok(())
    }
}

struct Incoming(Headers);

impl Inbound for Incoming {
    fn description(&self) -> MessageDescription {
        let mut d = MessageDescription::new(MessagingSystem::Kafka, OperationType::Process)
            .destination("orders")
            .body_size(100);
        d.partition = Some("3".into());
        d.offset = Some(1234);
        d.consumer_group = Some("billing".into());
        d
    }
    fn headers(&self) -> impl Extractor + '_ {
        HeaderExtractor(&self.0)
    }
    fn body(&self) -> &[u8] {
        &[]
    }
}

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

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "settle".into());
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let provider = SdkTracerProvider::builder()
        .with_span_processor(Discard)
        .build();
    let instrumenter = Instrumenter::builder().tracer_provider(&provider).build();
    let send =
        MessageDescription::new(MessagingSystem::Kafka, OperationType::Send).destination("orders");
    let mut headers = Headers::new();
    let span = instrumenter.start_send(&send, None);
    instrumenter.inject(&span, &mut HeaderInjector(&mut headers));
    span.end();
    let incoming = Incoming(headers);
    let mut done = 0;
    for _ in 0..n {
        let processed = instrumenter
            .process(&incoming, async { Ok(()) })
            .now_or_never()
            .expect("ready");
        let ok = match path.as_str() {
            "finish" => processed.finish(Disposition::Settle).is_ok(),
            _ => instrumenter
                .settle(processed, FreeSettle)
                .now_or_never()
                .expect("ready")
                .is_done(),
        };
        done += usize::from(ok);
    }
    eprintln!("{path}: {done} of {n}");
}
