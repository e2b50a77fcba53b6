//! One traced send, or one traced process, run many times with the real export
//! path: the SDK's batch processor and OTLP/gRPC to a collector in another process.
//! For instruction counts per stage under callgrind (`scripts/callgrind-breakdown.sh`
//! runs it and attributes the counts):
//!
//! ```text
//! ENDPOINT=http://127.0.0.1:4317 valgrind --tool=callgrind \
//!   target/release/examples/export_cost send 20000
//! ```
//!
//! `send`: a `send` span with the context injected into the message, through the
//! embedded broker's traced producer. `process`: a message published untraced with a
//! W3C `traceparent`, then extracted and processed under a `process` span with an
//! empty handler and settled. Metrics are off (their cost is measured apart). The
//! queue holds every span, so nothing is dropped; the run fails if any span was not
//! exported.
//!
//! `VARIANT=sdk-exporter` exports through the SDK's OTLP exporter instead of
//! mqtrace's direct encoding (`TelemetryBuilder::direct_encoding(false)`).
//! `VARIANT=unsampled` runs the same with every span unsampled (`AlwaysOff`: built,
//! never exported), and `VARIANT=raw` the same messages through the embedded broker
//! with no mqtrace at all (published, received, acked): the floor that the other
//! two are counted against. `VARIANT=by-hand` writes the same spans by hand with
//! the OpenTelemetry API (the same names, kinds, parent, link and attributes, the
//! W3C propagator, the same SDK and export): what the spans cost without mqtrace.
//! `VARIANT=by-hand-unsampled` is that with every span unsampled: what a
//! propagated, unsampled span costs through the OpenTelemetry API alone.
#![allow(missing_docs, clippy::print_stderr)]

use mqtrace::embedded::{Broker, Message, QueueOptions, TracedConsumer, TracedProducer};
use mqtrace_telemetry::TelemetryBuilder;
use opentelemetry_sdk::trace::{BatchConfigBuilder, Sampler};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "send".into());
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let endpoint = std::env::var("ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4317".to_owned());
    let variant = std::env::var("VARIANT").unwrap_or_else(|_| "exported".to_owned());
    let (sampler, direct) = match variant.as_str() {
        "exported" => (Sampler::AlwaysOn, true),
        "sdk-exporter" => (Sampler::AlwaysOn, false),
        "unsampled" => (Sampler::AlwaysOff, true),
        "by-hand" => (Sampler::AlwaysOn, true),
        "by-hand-unsampled" => (Sampler::AlwaysOff, true),
        "raw" => return raw(&mode, n),
        other => {
            return Err(format!(
                "VARIANT={other:?}: use exported, sdk-exporter, unsampled, by-hand, by-hand-unsampled or raw"
            ))
        }
    };
    let sampler_off = matches!(sampler, Sampler::AlwaysOff);
    let telemetry = TelemetryBuilder::default()
        .sampler(sampler)
        .service_name("export-cost")
        .endpoint(endpoint)
        .install_global(false)
        .metrics(false)
        .direct_encoding(direct)
        .batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(n + 1_024)
                .build(),
        )
        .build()
        .map_err(|e| e.to_string())?;
    let instrumenter = telemetry.instrumenter().metrics(false).build();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let broker = Broker::new();
    broker.declare_queue("orders", QueueOptions::default());
    runtime.block_on(async {
        if variant.starts_with("by-hand") {
            let provider = telemetry.provider().ok_or("telemetry is off")?;
            return by_hand(&mode, n, &broker, provider).await;
        }
        match mode.as_str() {
            "send" => {
                let producer = TracedProducer::new(broker.clone(), instrumenter);
                for i in 0..n {
                    producer
                        .send("orders", Message::new(i.to_be_bytes().to_vec()))
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            "process" => {
                publish_waiting(&broker, n)?;
                let consumer = TracedConsumer::new(broker.clone(), "orders", instrumenter);
                for _ in 0..n {
                    consumer
                        .process_next(|_| async { Ok(()) })
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            other => return Err(format!("mode {other:?}: use send or process")),
        }
        Ok::<(), String>(())
    })?;
    let stats = telemetry.shutdown();
    let expected = if sampler_off { 0 } else { n as u64 };
    if stats.not_exported() > 0 || stats.exported != expected {
        return Err(format!(
            "{} of {} spans exported: is a collector listening?",
            stats.exported, stats.ended
        ));
    }
    eprintln!("{mode}: {n} spans exported");
    Ok(())
}

/// The spans mqtrace makes for these messages, written by hand with the
/// OpenTelemetry API: a `send orders` PRODUCER span injected into the message, or a
/// `process orders` CONSUMER span, child of the extracted context and linking it,
/// around an empty handler and the ack; their attributes as mqtrace sets them.
async fn by_hand(
    mode: &str,
    n: usize,
    broker: &Broker,
    provider: &opentelemetry_sdk::trace::SdkTracerProvider,
) -> Result<(), String> {
    use mqtrace::embedded::{HeaderExtractor, HeaderInjector};
    use opentelemetry::propagation::TextMapPropagator as _;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry::trace::{FutureExt as _, Link, SpanKind, TraceContextExt as _, Tracer as _};
    use opentelemetry::{Context, KeyValue};
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    let tracer = provider.tracer("by-hand");
    let propagator = TraceContextPropagator::new();
    let common = |operation: &'static str| {
        vec![
            KeyValue::new("messaging.system.name", "mqtrace"),
            KeyValue::new("messaging.operation.name", operation),
            KeyValue::new("messaging.operation.type", operation),
            KeyValue::new("messaging.destination.name", "orders".to_owned()),
        ]
    };
    match mode {
        "send" => {
            for i in 0..n {
                let mut message = Message::new(i.to_be_bytes().to_vec());
                let span = tracer
                    .span_builder("send orders")
                    .with_kind(SpanKind::Producer)
                    .with_attributes(common("send"))
                    .start(&tracer);
                let cx = Context::current().with_span(span);
                propagator.inject_context(&cx, &mut HeaderInjector(&mut message.headers));
                let id = broker
                    .publish("orders", message)
                    .map_err(|e| e.to_string())?;
                let span = cx.span();
                span.set_attribute(KeyValue::new("messaging.message.id", id.to_string()));
                span.end();
            }
        }
        "process" => {
            publish_waiting(broker, n)?;
            for _ in 0..n {
                let delivery = broker.receive("orders").await.map_err(|e| e.to_string())?;
                let stored = delivery.message();
                let parent = propagator.extract(&HeaderExtractor(&stored.headers));
                let creation = parent.span().span_context().clone();
                let waited = std::time::SystemTime::now()
                    .duration_since(stored.published_at)
                    .map_or(0.0, |d| d.as_secs_f64());
                let mut attributes = common("process");
                attributes.extend([
                    KeyValue::new("messaging.message.id", stored.id.to_string()),
                    KeyValue::new("mqtrace.message.attempt", 1),
                    KeyValue::new("mqtrace.message.queue_time", waited),
                ]);
                let span = tracer
                    .span_builder("process orders")
                    .with_kind(SpanKind::Consumer)
                    .with_attributes(attributes)
                    .with_links(vec![Link::with_context(creation)])
                    .start_with_context(&tracer, &parent);
                // The handler runs in the span's context.
                let cx = parent.with_span(span);
                async {}.with_context(cx.clone()).await;
                delivery.ack();
                let span = cx.span();
                span.set_attribute(KeyValue::new("mqtrace.message.disposition", "settled"));
                span.end();
            }
        }
        other => return Err(format!("mode {other:?}: use send or process")),
    }
    Ok(())
}

/// The same messages through the embedded broker with no mqtrace: `send` publishes
/// each, `process` receives and acks each.
fn raw(mode: &str, n: usize) -> Result<(), String> {
    let broker = Broker::new();
    broker.declare_queue("orders", QueueOptions::default());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        if mode == "process" {
            publish_waiting(&broker, n)?;
            for _ in 0..n {
                broker
                    .receive("orders")
                    .await
                    .map_err(|e| e.to_string())?
                    .ack();
            }
        } else {
            for i in 0..n {
                broker
                    .publish("orders", Message::new(i.to_be_bytes().to_vec()))
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok::<(), String>(())
    })?;
    eprintln!("{mode}: {n} messages, no mqtrace");
    Ok(())
}

/// Publishes the `n` messages a `process` run consumes, untraced, each carrying a
/// producer's context in `traceparent`.
fn publish_waiting(broker: &Broker, n: usize) -> Result<(), String> {
    for i in 0..n {
        broker
            .publish(
                "orders",
                Message::new(i.to_be_bytes().to_vec()).header("traceparent", TRACEPARENT),
            )
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}
