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
//! a processor that drops them; `SAMPLER=off` makes every span unsampled,
//! `SAMPLER=none` uses no tracer at all (the API's no-op provider). The difference between the two, per message, is
//! what the core's lifecycle adds. `METRICS=off` turns the messaging metrics off,
//! `METRICS=sdk` records them into an SDK meter provider (read only at exit);
//! otherwise they go to the global no-op provider.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr
)]

use futures_util::FutureExt as _;
use mqtrace::embedded::{HeaderInjector, Headers};
use mqtrace::{Disposition, Instrumenter, MessageDescription, MessagingSystem, OperationType};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};

#[path = "../benches/common/mod.rs"]
mod common;

use common::{Discard, FreeSettle, Incoming};

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "settle".into());
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    // `SAMPLER=off`: every span unsampled, as for traffic a sampler drops.
    let sampler = match std::env::var("SAMPLER").as_deref() {
        Ok("off") => Sampler::AlwaysOff,
        _ => Sampler::AlwaysOn,
    };
    let provider = SdkTracerProvider::builder()
        .with_sampler(sampler)
        .with_span_processor(Discard)
        .build();
    let meters = common::idle_meters();
    // `SAMPLER=none`: no tracer at all (the API's no-op provider).
    let mut builder = match std::env::var("SAMPLER").as_deref() {
        Ok("none") => Instrumenter::builder()
            .tracer_provider(&opentelemetry::trace::noop::NoopTracerProvider::new()),
        _ => Instrumenter::builder().tracer_provider(&provider),
    };
    match std::env::var("METRICS").as_deref() {
        Ok("off") => builder = builder.metrics(false),
        Ok("sdk") => builder = builder.meter_provider(&meters),
        _ => {}
    }
    let instrumenter = builder.build();
    let send =
        MessageDescription::new(MessagingSystem::Kafka, OperationType::Send).destination("orders");
    let mut headers = Headers::new();
    let span = instrumenter.start_send(&send, None);
    instrumenter.inject(&span, &mut HeaderInjector(&mut headers));
    span.end();
    let incoming = Incoming {
        headers,
        body: vec![b'x'; 100],
    };
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
