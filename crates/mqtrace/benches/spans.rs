//! Cost of mqtrace's span recipes (send with inject; process with extract, handler
//! and finish), with an always-on sampler and with sampling off. Spans go to a
//! processor that discards them, so export cost is not in the figures. The
//! `metrics` group times process + settle with the messaging metrics off, into the
//! no-op meter provider, and into an SDK meter provider; with spans sampled, and
//! again unsampled, and with no tracer at all (the API's no-op provider), where
//! the measurements are most of the work; and, as the
//! floor under that cost, the same five measurements straight into the SDK's
//! bound instruments.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::FutureExt as _;
use mqtrace::embedded::{HeaderInjector, Headers};
use mqtrace::{
    Conventions, Disposition, Instrumenter, InstrumenterBuilder, MessageDescription,
    MessagingSystem, OperationType,
};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};

mod common;

use common::{Discard, FreeSettle, Incoming};

/// One message processed by an empty handler and ended through the core's
/// lifecycle (decide, settle, record).
fn process_and_settle(instrumenter: &Instrumenter, incoming: &Incoming) -> bool {
    let processed = instrumenter
        .process(incoming, async { Ok(()) })
        .now_or_never()
        .expect("ready");
    instrumenter
        .settle(processed, FreeSettle)
        .now_or_never()
        .expect("ready")
        .is_done()
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
            .conventions(Conventions::V1_45)
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
            b.iter(|| process_and_settle(&instrumenter, black_box(&incoming)))
        });
    }
    group.finish();
}

/// A named way to start an instrumenter's builder (its tracer provider).
type Base<'a> = Box<dyn Fn() -> InstrumenterBuilder + 'a>;

fn metrics(c: &mut Criterion) {
    let mut group = c.benchmark_group("metrics");
    let sampled = SdkTracerProvider::builder()
        .with_span_processor(Discard)
        .build();
    // Spans unsampled: the least span work around the measurements, so their
    // cost stands out of the machine's noise.
    let unsampled = SdkTracerProvider::builder()
        .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOff)
        .with_span_processor(Discard)
        .build();
    let meters = common::idle_meters();
    let send =
        MessageDescription::new(MessagingSystem::Kafka, OperationType::Send).destination("orders");
    // No tracer at all (the API's no-op provider): only the lifecycle, the
    // carrier and the measurements, so the metrics' share is largest.
    let no_tracer = opentelemetry::trace::noop::NoopTracerProvider::new();
    let bases: [(&str, Base<'_>); 3] = [
        (
            "",
            Box::new(|| Instrumenter::builder().tracer_provider(&sampled)),
        ),
        (
            "unsampled/",
            Box::new(|| Instrumenter::builder().tracer_provider(&unsampled)),
        ),
        (
            "no_tracer/",
            Box::new(|| Instrumenter::builder().tracer_provider(&no_tracer)),
        ),
    ];
    // One message for every case, carrying a sampled producer's context.
    let incoming = {
        let producer = Instrumenter::builder().tracer_provider(&sampled).build();
        let mut headers = Headers::new();
        let span = producer.start_send(&send, None);
        producer.inject(&span, &mut HeaderInjector(&mut headers));
        span.end();
        Incoming {
            headers,
            body: vec![b'x'; 100],
        }
    };
    for (spans, builder) in &bases {
        let base = || builder().conventions(Conventions::V1_45);
        let off = base().metrics(false).build();
        let sdk = base().meter_provider(&meters).build();
        for (mode, instrumenter) in [
            ("off", &off),
            ("noop_provider", &base().build()),
            ("sdk_provider", &sdk),
        ] {
            group.bench_function(format!("process+settle/{spans}{mode}"), |b| {
                b.iter(|| process_and_settle(instrumenter, black_box(&incoming)))
            });
        }
        // What the SDK provider adds: runs of 64 messages without and with it,
        // back to back (their order alternating), and the median of the pairs'
        // differences, so that the machine's drift and its bursts (this one
        // moves by more than the difference between two benchmarks) stay out
        // of it. A median below zero would show as (almost) nothing.
        group.bench_function(format!("added/{spans}sdk_provider"), |b| {
            b.iter_custom(|iters| {
                const RUN: u64 = 64;
                let run = |instrumenter: &Instrumenter| {
                    let started = std::time::Instant::now();
                    for _ in 0..RUN {
                        black_box(process_and_settle(instrumenter, black_box(&incoming)));
                    }
                    started.elapsed().as_secs_f64()
                };
                let mut added: Vec<f64> = (0..iters.div_ceil(RUN).max(1))
                    .map(|pair| {
                        if pair % 2 == 0 {
                            let without = run(&off);
                            run(&sdk) - without
                        } else {
                            let with = run(&sdk);
                            with - run(&off)
                        }
                    })
                    .collect();
                added.sort_by(f64::total_cmp);
                let per_message = (added[added.len() / 2] / RUN as f64).max(1e-12);
                std::time::Duration::from_secs_f64(per_message * iters as f64)
            })
        });
    }
    #[cfg(feature = "bound-instruments")]
    sdk_floor(&mut group, &meters);
    group.finish();
}

/// The floor under the metrics' cost with this SDK: the five measurements
/// mqtrace records per processed message (consumed, queue time, process
/// duration, the settle call's duration, the disposition), each straight into an
/// SDK instrument bound to a stream's attributes, with nothing of mqtrace's
/// around them (no stream lookup, no clock).
#[cfg(feature = "bound-instruments")]
fn sdk_floor(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    meters: &opentelemetry_sdk::metrics::SdkMeterProvider,
) {
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry::KeyValue;

    let meter = meters.meter("sdk-floor");
    let stream = [
        KeyValue::new("messaging.system.name", "kafka"),
        KeyValue::new("messaging.operation.name", "process"),
        KeyValue::new("messaging.operation.type", "process"),
        KeyValue::new("messaging.destination.name", "orders"),
        KeyValue::new("messaging.destination.partition.id", "3"),
        KeyValue::new("messaging.consumer.group.name", "billing"),
    ];
    let mut settle = stream.to_vec();
    settle[1] = KeyValue::new("messaging.operation.name", "ack");
    settle[2] = KeyValue::new("messaging.operation.type", "settle");
    let mut disposed = stream.to_vec();
    disposed.push(KeyValue::new("mqtrace.message.disposition", "settled"));
    let histogram = |name: &'static str| {
        meter
            .f64_histogram(name)
            .with_unit("s")
            .with_boundaries(mqtrace::metrics::DURATION_BUCKETS.to_vec())
            .build()
    };
    let consumed = meter.u64_counter("floor.consumed").build().bind(&stream);
    let queue_time = histogram("floor.queue").bind(&stream);
    let process = histogram("floor.process").bind(&stream);
    let settle_call = histogram("floor.settle").bind(&settle);
    let disposition = meter
        .u64_counter("floor.dispositions")
        .build()
        .bind(&disposed);
    group.bench_function("sdk_floor/five_bound_measurements", |b| {
        b.iter(|| {
            consumed.add(1);
            queue_time.record(black_box(0.0021));
            process.record(black_box(0.000_04));
            settle_call.record(black_box(0.000_01));
            disposition.add(1);
        })
    });
}

criterion_group!(benches, recipes, metrics);
criterion_main!(benches);
