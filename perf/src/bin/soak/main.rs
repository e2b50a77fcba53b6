//! The soak run of the reliability notes: one broker, a steady rate of messages for
//! a set time, 1% of them failing permanently (dead-lettered), telemetry exported
//! over OTLP to an in-process collector. At the end it accounts for every message
//! (processed, dead-lettered, lost), reports the process's resident memory after
//! the warm-up and at the end, and the process spans' overhead: each process
//! span's duration minus the time its handler ran (what the instrumentation and the
//! settlement add around the handler).
//!
//! Run it with `scripts/soak.sh` (starts the brokers), or with the brokers'
//! variables set (`source .mqtrace-test/env`):
//!
//! ```text
//! cargo run --release -p mqtrace-perf --bin soak -- rabbitmq --minutes 10 --rate 100
//! ```
//!
//! With `--collector-faults` it measures instead what an OTLP collector's faults cost
//! the messages: rounds of four phases (collector healthy, unreachable, hanging,
//! back; see `mqtrace_testing::faults::COLLECTOR_PHASES`), each sending
//! `--per-phase` messages as fast as the broker takes them and waiting until all are
//! processed, with the collector in a process of its own behind a proxy that plays
//! the fault. No handler fails in this mode. It prints each phase's throughput
//! relative to its round's healthy phase, then the median per phase
//! (`scripts/collector-faults.sh`).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use mqtrace::{HandlerError, HandlerResult, Instrumenter};
use mqtrace_telemetry::{TelemetryBuilder, TelemetryGuard};
use mqtrace_testing::{Collector, Kind};
use opentelemetry::trace::TraceContextExt as _;
use tokio::sync::Notify;

mod faults;
mod kafka;
mod rabbit;
mod sqs;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Broker {
    Rabbitmq,
    Kafka,
    Sqs,
}

#[derive(Debug, Parser)]
struct Args {
    broker: Broker,
    /// How long to send for.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Messages per second.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Also append the report line to this file.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Measure the collector's faults instead of soaking (see the example's docs).
    #[arg(long)]
    collector_faults: bool,
    /// With `--collector-faults`: messages per phase.
    #[arg(long, default_value_t = 3000)]
    per_phase: usize,
    /// With `--collector-faults`: rounds of the four phases.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// With `--collector-faults`: run the collector in this process, on the same
    /// runtime as the consumer, as the fault tests do.
    #[arg(long)]
    in_process_collector: bool,
}

/// In the soak, one message in a hundred fails permanently.
fn fails(id: usize) -> bool {
    id % 100 == 99
}

/// What the handlers saw, shared with the reporter.
#[derive(Default)]
struct Seen {
    /// Ids handled successfully.
    processed: Mutex<BTreeSet<usize>>,
    /// Handler time in µs by process span id, until the span is exported.
    handler_micros: Mutex<HashMap<String, u64>>,
    /// Handler calls, successful or not.
    calls: AtomicUsize,
    /// Whether one message in a hundred fails (the soak) or none (collector faults).
    failures: bool,
    /// When each id was sent, for the ids whose latency is measured.
    sent_at: Mutex<HashMap<usize, Instant>>,
    /// From the send to the handler, for those ids, in the order handled.
    latencies: Mutex<Vec<Duration>>,
}

impl Seen {
    /// The handler of every broker: times itself, records the id.
    fn handle(&self, id: Result<usize, HandlerError>) -> HandlerResult {
        let started = Instant::now();
        let span_id = opentelemetry::Context::current()
            .span()
            .span_context()
            .span_id()
            .to_string();
        let id = id?;
        if let Some(sent) = lock(&self.sent_at).remove(&id) {
            lock(&self.latencies).push(sent.elapsed());
        }
        let result = if self.failures && fails(id) {
            Err(HandlerError::permanent("soak: one in a hundred fails").with_type("soak"))
        } else {
            lock(&self.processed).insert(id);
            Ok(())
        };
        let micros = started.elapsed().as_micros() as u64;
        lock(&self.handler_micros).insert(span_id, micros);
        self.calls.fetch_add(1, Ordering::SeqCst);
        result
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Resident memory of this process in KiB (Linux).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn env(var: &str) -> Result<String, String> {
    std::env::var(var).map_err(|_| {
        format!("{var} is not set: run scripts/soak.sh, or scripts/brokers.sh start and source .mqtrace-test/env")
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), String> {
    if std::env::var_os(faults::SERVE_COLLECTOR_ENV).is_some() {
        return faults::serve_collector().await;
    }
    let args = Args::parse();
    if args.collector_faults {
        return faults::run(&args).await;
    }
    let collector = Collector::start().await.map_err(|e| e.to_string())?;
    let (guard, instrumenter) = telemetry("mqtrace-soak", collector.grpc_endpoint())?;
    let run = format!("{:08x}", fastrand::u32(..));
    let seen = Arc::new(Seen {
        failures: true,
        ..Seen::default()
    });
    let stop = Arc::new(Notify::new());
    let duration = Duration::from_secs_f64(args.minutes * 60.0);

    let mut broker = Under::start(args.broker, &run, &instrumenter, &seen, &stop).await?;

    // The overheads, from the spans as they arrive.
    let overheads = Arc::new(Mutex::new(Vec::<(u64, bool)>::new()));
    let sampler = {
        let (collector, seen, overheads) = (
            Arc::new(collector),
            Arc::clone(&seen),
            Arc::clone(&overheads),
        );
        let c = Arc::clone(&collector);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                collect_overheads(&c, &seen, &overheads);
            }
        });
        (collector, task)
    };

    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0usize;
    let mut send_failures = 0u64;
    let mut rss_warm = None;
    let mut last_report = Instant::now();
    while started.elapsed() < duration {
        tick.tick().await;
        // Sent once, or counted as a failure and sent again: never skipped.
        while let Err(e) = broker.send(sent).await {
            send_failures += 1;
            eprintln!("soak: send {sent} failed ({e}); again");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sent += 1;
        if rss_warm.is_none() && started.elapsed() > Duration::from_secs(30) {
            rss_warm = Some(rss_kib());
        }
        if last_report.elapsed() > Duration::from_secs(60) {
            last_report = Instant::now();
            eprintln!(
                "soak: {:.0} s, sent {sent}, handled {}, rss {} KiB",
                started.elapsed().as_secs_f64(),
                seen.calls.load(Ordering::SeqCst),
                rss_kib()
            );
        }
    }
    let sending = started.elapsed();
    // Everything handled once (the failures are permanent: one call each).
    let drained = Instant::now();
    while seen.calls.load(Ordering::SeqCst) < sent && drained.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.notify_waiters();
    let stats = broker.finish().await?;
    let rss_end = rss_kib();
    let dead: BTreeSet<usize> = broker.dead_letters().await?;
    flush(guard).await;
    collect_overheads(&sampler.0, &seen, &overheads);
    sampler.1.abort();

    let processed = lock(&seen.processed).clone();
    let lost = (0..sent)
        .filter(|i| !processed.contains(i) && !dead.contains(i))
        .count();
    let expected_dead = (0..sent).filter(|i| fails(*i)).count();
    let all: Vec<(u64, bool)> = lock(&overheads).clone();
    let settled: Vec<u64> = all.iter().filter(|(_, s)| *s).map(|(o, _)| *o).collect();
    let everything: Vec<u64> = all.iter().map(|(o, _)| *o).collect();
    let line = format!(
        "| {:?} | {:.1} min at {}/s | sent {sent} (send failures {send_failures}) | processed {} | dead-lettered {} (expected {expected_dead}) | lost {lost} | {stats} | RSS {} KiB after 30 s, {} KiB at the end | settled: p50 {} µs, p99 {} µs; all (with dead-letter forwards): p99 {} µs; {} spans |",
        args.broker,
        sending.as_secs_f64() / 60.0,
        args.rate,
        processed.len(),
        dead.len(),
        rss_warm.unwrap_or(0),
        rss_end,
        percentile(&settled, 0.50),
        percentile(&settled, 0.99),
        percentile(&everything, 0.99),
        everything.len(),
    );
    println!("{line}");
    if let Some(path) = &args.out {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| e.to_string())?;
        writeln!(f, "{line}").map_err(|e| e.to_string())?;
    }
    if lost > 0 {
        return Err(format!("{lost} messages lost"));
    }
    Ok(())
}

/// Telemetry with the library's defaults, exporting to `endpoint`, and an
/// instrumenter on it.
fn telemetry(service: &str, endpoint: String) -> Result<(TelemetryGuard, Instrumenter), String> {
    let guard = TelemetryBuilder::default()
        .service_name(service)
        .endpoint(endpoint)
        .install_global(false)
        .build()
        .map_err(|e| e.to_string())?;
    let provider = guard.provider().ok_or("telemetry is off")?;
    let instrumenter = Instrumenter::builder().tracer_provider(provider).build();
    Ok((guard, instrumenter))
}

fn percentile(samples: &[u64], p: f64) -> u64 {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(i).copied().unwrap_or(0)
}

async fn flush(guard: TelemetryGuard) {
    let _ = tokio::task::spawn_blocking(move || guard.shutdown()).await;
}

/// Matches exported process spans with their handler's time.
fn collect_overheads(collector: &Collector, seen: &Seen, overheads: &Mutex<Vec<(u64, bool)>>) {
    let spans = collector.take();
    let mut timings = lock(&seen.handler_micros);
    let mut out = lock(overheads);
    for s in spans.iter().filter(|s| s.kind == Kind::Consumer) {
        if let Some(handler) = timings.remove(&s.span_id) {
            let settled = s
                .attr("mqtrace.message.disposition")
                .and_then(|v| v.as_str())
                == Some("settled");
            out.push((s.duration_micros().saturating_sub(handler), settled));
        }
    }
}

/// A broker under soak: sends, consumes in the background, reads its dead letters.
#[allow(clippy::large_enum_variant)] // one, for the whole run
enum Under {
    Rabbit(rabbit::Soak),
    Kafka(kafka::Soak),
    Sqs(sqs::Soak),
}

impl Under {
    async fn start(
        broker: Broker,
        run: &str,
        instrumenter: &Instrumenter,
        seen: &Arc<Seen>,
        stop: &Arc<Notify>,
    ) -> Result<Self, String> {
        Ok(match broker {
            Broker::Rabbitmq => {
                Self::Rabbit(rabbit::Soak::start(run, instrumenter, seen, stop).await?)
            }
            Broker::Kafka => Self::Kafka(kafka::Soak::start(run, instrumenter, seen, stop).await?),
            Broker::Sqs => Self::Sqs(sqs::Soak::start(run, instrumenter, seen, stop).await?),
        })
    }

    async fn send(&self, id: usize) -> Result<(), String> {
        match self {
            Self::Rabbit(b) => b.send(id).await,
            Self::Kafka(b) => b.send(id).await,
            Self::Sqs(b) => b.send(id).await,
        }
    }

    /// Waits for the consumer to stop; its counts as text.
    async fn finish(&mut self) -> Result<String, String> {
        match self {
            Self::Rabbit(b) => b.finish().await,
            Self::Kafka(b) => b.finish().await,
            Self::Sqs(b) => b.finish().await,
        }
    }

    async fn dead_letters(&self) -> Result<BTreeSet<usize>, String> {
        match self {
            Self::Rabbit(b) => b.dead_letters().await,
            Self::Kafka(b) => b.dead_letters().await,
            Self::Sqs(b) => b.dead_letters().await,
        }
    }
}

/// The id in a body.
fn id_of(body: &[u8]) -> Option<usize> {
    serde_json::from_slice(body).ok()
}
