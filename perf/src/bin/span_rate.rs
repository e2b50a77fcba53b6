//! Spans at messaging rates with the default telemetry set-up: a producer service
//! and a worker service (each its own `TelemetryBuilder::default()` set-up, only the
//! endpoint given) pass messages through the embedded broker at a steady rate, and
//! export to a collector in another process. At the end both services shut down
//! (flushing what is queued) and the run prints what each exported and what it did
//! not; it exits 1 when any span was not exported.
//!
//! ```text
//! mqtrace view --summary-only &                 # the collector, in its own process
//! cargo run --release -p mqtrace-perf --bin span_rate -- --rate 10000 --seconds 60
//! ```
//!
//! `--collector-delay-ms` makes the collector slow (a proxy holds its answers back);
//! `--sdk-batch-defaults` uses the SDK's batch settings instead of mqtrace's, to
//! compare. `docs/benchmarks.md` ("Batch defaults") has the full runs;
//! `crates/mqtrace-cli/tests/view.rs` runs test-sized ones.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use mqtrace::embedded::{Broker, Message, QueueOptions, TracedConsumer, TracedProducer};
use mqtrace_telemetry::{ExportStats, TelemetryBuilder, TelemetryGuard};

#[derive(Debug, Parser)]
struct Args {
    /// Messages per second.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// How long to send for.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// The collector's OTLP/gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:4317")]
    endpoint: String,
    /// Make the collector slow: a proxy in this process holds each of its answers
    /// back this long (milliseconds).
    #[arg(long)]
    collector_delay_ms: Option<u64>,
    /// Use the SDK's batch defaults instead of mqtrace's, to compare.
    #[arg(long)]
    sdk_batch_defaults: bool,
}

fn service(name: &str, endpoint: &str, sdk_defaults: bool) -> Result<TelemetryGuard, String> {
    let mut builder = TelemetryBuilder::default()
        .service_name(name)
        .endpoint(endpoint)
        .install_global(false)
        .metrics(false);
    if sdk_defaults {
        builder =
            builder.batch_config(opentelemetry_sdk::trace::BatchConfigBuilder::default().build());
    }
    builder.build().map_err(|e| format!("telemetry: {e}"))
}

fn line(name: &str, stats: &ExportStats) -> String {
    format!(
        "{name}: ended {} exported {} not exported {}",
        stats.ended,
        stats.exported,
        stats.not_exported()
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let mut endpoint = args.endpoint.clone();
    let _proxy = match args.collector_delay_ms {
        Some(ms) => {
            let upstream = args
                .endpoint
                .trim_start_matches("http://")
                .parse()
                .map_err(|e| format!("--endpoint {}: {e}", args.endpoint))?;
            let proxy = mqtrace_testing::faults::Proxy::start(upstream)
                .await
                .map_err(|e| format!("proxy: {e}"))?;
            proxy.set(mqtrace_testing::faults::Mode::Slow(Duration::from_millis(
                ms,
            )));
            endpoint = format!("http://{}", proxy.addr());
            Some(proxy)
        }
        None => None,
    };
    let producer_telemetry = service("rate-producer", &endpoint, args.sdk_batch_defaults)?;
    let worker_telemetry = service("rate-worker", &endpoint, args.sdk_batch_defaults)?;
    let broker = Broker::new();
    broker.declare_queue("orders", QueueOptions::default());
    let producer = TracedProducer::new(broker.clone(), producer_telemetry.instrumenter().build());
    let consumer = Arc::new(TracedConsumer::new(
        broker.clone(),
        "orders",
        worker_telemetry.instrumenter().build(),
    ));
    let total = (args.rate as f64 * args.seconds).round() as u64;
    let processed = Arc::new(AtomicU64::new(0));
    let worker = {
        let (consumer, processed) = (consumer.clone(), processed.clone());
        tokio::spawn(async move {
            while processed.load(Ordering::Relaxed) < total {
                match consumer.process_next(|_| async { Ok(()) }).await {
                    Ok(_) => {
                        processed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => return Err(format!("consumer: {e}")),
                }
            }
            Ok(())
        })
    };

    // A burst every 10 ms keeps the rate without a timer per message.
    let started = Instant::now();
    let per_tick = (args.rate / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut sent = 0;
    let mut behind = Duration::ZERO;
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * args.rate as f64) as u64).min(total);
        let burst = due.saturating_sub(sent).min(per_tick * 4);
        for _ in 0..burst {
            producer
                .send("orders", Message::new(sent.to_be_bytes().to_vec()))
                .await
                .map_err(|e| format!("send: {e}"))?;
            sent += 1;
        }
        let expected = Duration::from_secs_f64(sent as f64 / args.rate as f64);
        behind = behind.max(started.elapsed().saturating_sub(expected));
    }
    let sending = started.elapsed();
    worker.await.map_err(|e| e.to_string())??;
    let (producer_stats, worker_stats) = tokio::task::spawn_blocking(move || {
        (producer_telemetry.shutdown(), worker_telemetry.shutdown())
    })
    .await
    .map_err(|e| e.to_string())?;
    println!(
        "sent {sent} in {:.1} s ({:.0}/s, at most {} ms behind the rate), processed {}",
        sending.as_secs_f64(),
        sent as f64 / sending.as_secs_f64(),
        behind.as_millis(),
        processed.load(Ordering::Relaxed)
    );
    println!("{}", line("producer", &producer_stats));
    println!("{}", line("worker", &worker_stats));
    let lost = producer_stats.not_exported() + worker_stats.not_exported();
    println!("spans not exported: {lost}");
    if lost > 0 {
        std::process::exit(1);
    }
    Ok(())
}
