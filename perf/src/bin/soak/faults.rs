//! `--collector-faults`: what the collector's faults cost the messages. The
//! collector runs in a child process (this example again, with
//! [`SERVE_COLLECTOR_ENV`] set), so that its decoding competes for the cores as
//! another process would, not for the consumer's runtime; a proxy in front of it
//! plays the faults.

use std::io::{BufRead as _, Read as _};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqtrace_testing::bench::median;
use mqtrace_testing::faults::{collector_fault_run, Mode, PhaseReport, Proxy};
use mqtrace_testing::Collector;
use tokio::sync::Notify;

use crate::{lock, telemetry, Args, Seen, Under};

/// Set in the child process that serves as the collector.
pub(crate) const SERVE_COLLECTOR_ENV: &str = "MQTRACE_SOAK_SERVE_COLLECTOR";

/// The child's side: a collector that prints its gRPC address, throws away what it
/// receives once a second, and stops when its standard input closes (the parent
/// went away).
pub(crate) async fn serve_collector() -> Result<(), String> {
    let collector = Collector::start().await.map_err(|e| e.to_string())?;
    println!("COLLECTOR {}", collector.grpc_addr());
    let drain = drain_every_second(collector);
    let _ = tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new())).await;
    drain.abort();
    Ok(())
}

/// Throws away what `collector` received, once a second, so that a long run does
/// not keep every span in memory.
fn drain_every_second(collector: Collector) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(collector.take());
        }
    })
}

/// The collector in a child process; killed when dropped.
struct CollectorProcess {
    child: Child,
    addr: SocketAddr,
}

impl CollectorProcess {
    fn start() -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .env(SERVE_COLLECTOR_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the collector process: {e}"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or("the collector's output is gone")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let addr = line
            .trim()
            .strip_prefix("COLLECTOR ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("the collector process printed {line:?}, not its address"))?;
        Ok(Self { child, addr })
    }
}

impl Drop for CollectorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the spans go: a collector in another process, or in this one (drained
/// by a task of this process's runtime).
enum Sink {
    Process(CollectorProcess),
    InProcess(SocketAddr, tokio::task::JoinHandle<()>),
}

impl Sink {
    fn addr(&self) -> SocketAddr {
        match self {
            Self::Process(p) => p.addr,
            Self::InProcess(addr, _) => *addr,
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Self::InProcess(_, drain) = self {
            drain.abort();
        }
    }
}

pub(crate) async fn run(args: &Args) -> Result<(), String> {
    let sink = if args.in_process_collector {
        let collector = Collector::start().await.map_err(|e| e.to_string())?;
        Sink::InProcess(collector.grpc_addr(), drain_every_second(collector))
    } else {
        Sink::Process(CollectorProcess::start()?)
    };
    let proxy = Proxy::start(sink.addr()).await.map_err(|e| e.to_string())?;
    // The library's defaults but for the endpoint: what an application gets.
    let (guard, instrumenter) = telemetry(
        "mqtrace-collector-faults",
        format!("http://{}", proxy.addr()),
    )?;
    let run = format!("{:08x}", fastrand::u32(..));
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(Notify::new());
    let mut broker = Under::start(args.broker, &run, &instrumenter, &seen, &stop).await?;
    let where_ = if args.in_process_collector {
        "in this process"
    } else {
        "in a child process"
    };
    println!(
        "{:?}: {} rounds of {} messages per phase, collector {where_}",
        args.broker, args.rounds, args.per_phase
    );

    let mut rounds: Vec<Round> = Vec::new();
    for round in 0..args.rounds {
        let base = round * 4 * args.per_phase;
        let (broker, seen) = (&broker, &seen);
        // Span counts from the round's start, so that each phase line is its own.
        let at_start = guard.stats();
        let latencies = std::sync::Mutex::new(Vec::<(f64, f64)>::new());
        let reports = collector_fault_run(
            &format!("{:?} round {}", args.broker, round + 1),
            &proxy,
            args.per_phase,
            |first, n| {
                let latencies = &latencies;
                async move {
                    if let Err(e) = send_and_wait(broker, seen, base + first, n).await {
                        eprintln!("collector faults: {e}");
                        std::process::exit(1);
                    }
                    lock(latencies).push(take_latencies(seen));
                }
            },
            || {
                let s = guard.stats();
                (s.ended - at_start.ended, s.exported - at_start.exported)
            },
        )
        .await;
        let latencies = lock(&latencies).clone();
        for (r, (p99, max)) in reports.iter().zip(&latencies) {
            println!(
                "{:?} round {} collector {}: send to handler p99 {p99:.1} ms, highest {max:.1} ms",
                args.broker,
                round + 1,
                r.name
            );
        }
        rounds.push((reports, latencies));
    }
    // A closing healthy phase: the last round's faulty phases need the healthy
    // throughput after them too.
    proxy.set(Mode::Forward);
    let started = Instant::now();
    send_and_wait(
        &broker,
        &seen,
        args.rounds * 4 * args.per_phase,
        args.per_phase,
    )
    .await?;
    let closing = args.per_phase as f64 / started.elapsed().as_secs_f64().max(1e-9);
    println!("{:?} closing healthy phase: {closing:.0}/s", args.broker);
    let measured = summarise(&rounds, closing);
    stop.notify_waiters();
    let finished = broker.finish().await?;
    let stats = tokio::task::spawn_blocking(move || guard.shutdown())
        .await
        .map_err(|e| e.to_string())?;
    let sent = (args.rounds * 4 + 1) * args.per_phase;
    let processed = lock(&seen.processed).len();
    println!(
        "{:?}: sent {sent}, processed {processed}, lost {}; {finished}; spans ended {}, exported {}, not exported (counted) {}",
        args.broker,
        sent.saturating_sub(processed),
        stats.ended,
        stats.exported,
        stats.not_exported()
    );
    println!(
        "| phase | throughput against healthy: median (lowest–highest) | send to handler: median p99, highest |"
    );
    println!("|---|---|---|");
    for (name, m) in measured {
        println!(
            "| {name} | {} | {:.1} ms, {:.1} ms |",
            spread(m.ratio),
            median(m.p99),
            m.max
        );
    }
    println!(
        "(healthy: the next round's healthy phase against this round's, the noise of the \
         measure; the others: against the healthy throughput interpolated between their \
         round's healthy phase and the next)"
    );
    if processed < sent {
        return Err(format!("{} messages lost", sent - processed));
    }
    Ok(())
}

/// One round's phase reports, with each phase's (p99, highest) send-to-handler
/// latency in ms.
type Round = (Vec<PhaseReport>, Vec<(f64, f64)>);

/// What one phase measured, over the rounds.
#[derive(Default)]
struct Measured {
    /// Throughput relative to the round's healthy phase.
    ratio: Vec<f64>,
    /// p99 send-to-handler latency, ms.
    p99: Vec<f64>,
    /// The highest send-to-handler latency of any round, ms.
    max: f64,
}

/// Per phase, in the order of the phases: each faulty phase's throughput against
/// the healthy throughput interpolated at its place between its round's healthy
/// phase and the next round's (`closing` after the last round), which takes out a
/// broker's drift over the run; for the healthy phase, the next round's healthy
/// throughput against its own, the noise of the measure.
fn summarise(rounds: &[Round], closing: f64) -> Vec<(&'static str, Measured)> {
    let healthy: Vec<f64> = rounds
        .iter()
        .map(|(r, _)| r.first().map_or(1.0, PhaseReport::throughput))
        .chain(std::iter::once(closing))
        .collect();
    let mut out: Vec<(&'static str, Measured)> = Vec::new();
    for (i, (reports, latencies)) in rounds.iter().enumerate() {
        let (h0, h1) = (healthy[i], healthy[i + 1]);
        let phases = reports.len() as f64;
        for (k, (r, (p99, max))) in reports.iter().zip(latencies).enumerate() {
            let ratio = if k == 0 {
                h1 / h0
            } else {
                r.throughput() / (h0 + (h1 - h0) * k as f64 / phases)
            };
            let at = match out.iter().position(|(n, _)| *n == r.name) {
                Some(at) => at,
                None => {
                    out.push((r.name, Measured::default()));
                    out.len() - 1
                }
            };
            let m = &mut out[at].1;
            m.ratio.push(ratio);
            m.p99.push(*p99);
            m.max = m.max.max(*max);
        }
    }
    out
}

/// "median (lowest–highest)".
fn spread(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    let (lo, hi) = (
        v.first().copied().unwrap_or(0.0),
        v.last().copied().unwrap_or(0.0),
    );
    format!("{:.2} ({lo:.2}–{hi:.2})", median(v))
}

/// Sends ids `first..first + n` one after another, each once the broker has taken
/// the one before, then waits until the handler has seen all of them.
async fn send_and_wait(broker: &Under, seen: &Seen, first: usize, n: usize) -> Result<(), String> {
    for id in first..first + n {
        lock(&seen.sent_at).insert(id, Instant::now());
        broker.send(id).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    // Distinct ids: a redelivery is no progress.
    loop {
        let processed = lock(&seen.processed).len();
        if processed >= first + n {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{processed} of {} messages processed after 120 s",
                first + n
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    lock(&seen.handler_micros).clear();
    Ok(())
}

/// The 99th percentile and the highest of the latencies measured since the last
/// call, in ms; clears them.
fn take_latencies(seen: &Seen) -> (f64, f64) {
    let mut l = std::mem::take(&mut *lock(&seen.latencies));
    l.sort_unstable();
    let at = |i: usize| l.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let p99 = (l.len() * 99 / 100).min(l.len().saturating_sub(1));
    (at(p99), at(l.len().saturating_sub(1)))
}
