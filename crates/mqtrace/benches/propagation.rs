//! Inject + extract of one message's context: straight into the broker's header type
//! through mqtrace's carriers, against the naive route (a `HashMap<String, String>`
//! per message, copied into and out of the headers).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use mqtrace::embedded::{HeaderExtractor, HeaderInjector, Headers};
use mqtrace::Propagation;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;

fn context() -> Context {
    Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ))
}

fn round_trip(c: &mut Criterion) {
    let cx = context();
    let mut group = c.benchmark_group("inject+extract");
    for (name, propagation) in [
        ("w3c", Propagation::default()),
        (
            "w3c+xray+underscore",
            Propagation::builder()
                .w3c()
                .xray()
                .underscore()
                .baggage()
                .build(),
        ),
    ] {
        group.bench_function(format!("{name}/carrier"), |b| {
            b.iter(|| {
                let mut headers = Headers::new();
                propagation.inject(&cx, &mut HeaderInjector(&mut headers));
                let out = propagation.extract(&HeaderExtractor(black_box(&headers)));
                black_box(out.span().span_context().is_valid())
            })
        });
        group.bench_function(format!("{name}/naive-hashmap"), |b| {
            b.iter(|| {
                let mut map: HashMap<String, String> = HashMap::new();
                propagation.inject_context(&cx, &mut map);
                let mut headers = Headers::new();
                for (k, v) in &map {
                    headers.insert(k.clone(), v.clone());
                }
                let back: HashMap<String, String> = black_box(&headers)
                    .iter()
                    .filter_map(|(k, v)| {
                        Some((k.to_owned(), std::str::from_utf8(v).ok()?.to_owned()))
                    })
                    .collect();
                let out = propagation.extract_with_context(&Context::new(), &back);
                black_box(out.span().span_context().is_valid())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, round_trip);
criterion_main!(benches);
