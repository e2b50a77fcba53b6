//! `mqtrace view`: an OTLP receiver that prints traces as they complete and the
//! message journeys through them; `--save` keeps what arrived, `--load` shows a
//! saved capture, `--web` draws the journeys in a browser.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::Args;
use mqtrace_testing::{spans_of, Collector, CollectorConfig, Forest, RecordedSpan, TreeOptions};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use tokio::sync::mpsc;

use crate::capture::{self, CaptureError};
use crate::journey::{self, Index};

/// Where `view` and `doctor` listen for OTLP.
#[derive(Debug, Clone, Args)]
pub(crate) struct ListenArgs {
    /// Address of the OTLP/gRPC receiver (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:4317", value_name = "ADDR")]
    pub(crate) grpc: SocketAddr,
    /// Address of the OTLP/HTTP (protobuf) receiver, serving `/v1/traces`.
    #[arg(long, default_value = "127.0.0.1:4318", value_name = "ADDR")]
    pub(crate) http: SocketAddr,
}

/// Options of `mqtrace view`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  mqtrace view                          listen on 127.0.0.1:4317 (gRPC) and :4318 (HTTP)
  mqtrace view --web --save run.jsonl   also draw journeys at http://127.0.0.1:4320, keep a capture
  mqtrace view --load run.jsonl         show a capture (`mqtrace demo --save`, the collector's file exporter)

  In another terminal: OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 mqtrace demo")]
pub(crate) struct ViewArgs {
    #[command(flatten)]
    pub(crate) listen: ListenArgs,
    /// Write every trace request received to FILE as OTLP JSON lines.
    #[arg(long, value_name = "FILE", conflicts_with = "load")]
    save: Option<PathBuf>,
    /// Show a capture (OTLP JSON lines) instead of listening.
    #[arg(long, value_name = "FILE")]
    load: Option<PathBuf>,
    /// Serve a page drawing each journey as a waterfall, on a loopback address.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:4320")]
    web: Option<SocketAddr>,
    /// Traces kept in memory; past this the oldest are dropped, and counted.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    max_traces: usize,
    /// A trace is printed once no span of it arrived for this long.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    quiet: Duration,
    /// Stop after this long (default: at Ctrl-C; with --load and no --web, at once).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    duration: Option<Duration>,
    /// Print journeys and the summary only, not each trace's tree.
    #[arg(long)]
    journeys_only: bool,
    /// Print only the summary at the end (for high rates: printing every trace
    /// would make the viewer the slowest part).
    #[arg(long, conflicts_with = "journeys_only")]
    summary_only: bool,
    /// Leave durations out (for comparing runs).
    #[arg(long)]
    no_timings: bool,
}

/// Why `view` or `doctor` stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ViewError {
    #[error("{0}")]
    Capture(#[from] CaptureError),
    #[error("{0}")]
    Listen(std::io::Error),
    #[error("--web serves on loopback only (the page has no access control), not {0}")]
    WebNotLoopback(SocketAddr),
    #[error("--max-traces must be at least 1")]
    NoTraces,
}

/// One trace in the window.
#[derive(Debug)]
struct Trace {
    spans: Vec<RecordedSpan>,
    last_arrival: Instant,
    /// The number it is shown with, from 1 in order of arrival.
    number: usize,
    printed: usize,
}

/// The traces kept: at most `max`, oldest dropped first.
#[derive(Debug)]
pub(crate) struct Window {
    traces: HashMap<String, Trace>,
    order: VecDeque<String>,
    max: usize,
    dropped: u64,
    received: u64,
    next_number: usize,
    journey_numbers: HashMap<String, usize>,
}

impl Window {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            traces: HashMap::new(),
            order: VecDeque::new(),
            max,
            dropped: 0,
            received: 0,
            next_number: 1,
            journey_numbers: HashMap::new(),
        }
    }

    pub(crate) fn add(&mut self, spans: Vec<RecordedSpan>, now: Instant) {
        self.received += spans.len() as u64;
        for span in spans {
            let next = &mut self.next_number;
            let trace = self.traces.entry(span.trace_id.clone()).or_insert_with(|| {
                self.order.push_back(span.trace_id.clone());
                *next += 1;
                Trace {
                    spans: Vec::new(),
                    last_arrival: now,
                    number: *next - 1,
                    printed: 0,
                }
            });
            trace.last_arrival = now;
            trace.spans.push(span);
        }
        while self.order.len() > self.max {
            if let Some(oldest) = self.order.pop_front() {
                self.traces.remove(&oldest);
                self.dropped += 1;
            }
        }
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    pub(crate) fn spans(&self) -> Vec<RecordedSpan> {
        self.order
            .iter()
            .filter_map(|id| self.traces.get(id))
            .flat_map(|t| t.spans.iter().cloned())
            .collect()
    }

    /// The number a trace is shown with (0 for one no longer kept).
    pub(crate) fn number(&self, trace_id: &str) -> usize {
        self.traces.get(trace_id).map_or(0, |t| t.number)
    }

    /// The traces quiet for `quiet` (all with `None`) that are new or grew since
    /// they were printed, in arrival order, marked printed.
    fn ready(&mut self, now: Instant, quiet: Option<Duration>) -> Vec<String> {
        let mut out = Vec::new();
        for id in &self.order {
            let Some(trace) = self.traces.get_mut(id) else {
                continue;
            };
            let quiet_enough = quiet.is_none_or(|q| now.duration_since(trace.last_arrival) >= q);
            if quiet_enough && trace.printed < trace.spans.len() {
                trace.printed = trace.spans.len();
                out.push(id.clone());
            }
        }
        out
    }

    fn journey_number(&mut self, first_hop: &str) -> usize {
        let next = self.journey_numbers.len() + 1;
        *self
            .journey_numbers
            .entry(first_hop.to_owned())
            .or_insert(next)
    }
}

/// The attributes a tree shows: what tells messages and their fate apart.
const KEY_ATTRIBUTES: &[&str] = &[
    "messaging.message.id",
    "messaging.destination.partition.id",
    "kafka.offset",
    "messaging.kafka.offset",
    "messaging.kafka.message.offset",
    "messaging.consumer.group.name",
    "messaging.batch.message_count",
    "mqtrace.message.attempt",
    "mqtrace.message.disposition",
    "error.type",
];

/// What to print for the traces in `ready`: their trees (unless journeys only),
/// then every journey with a hop in them.
fn render_ready(window: &mut Window, ready: &[String], args: &ViewArgs) -> String {
    if ready.is_empty() || args.summary_only {
        return String::new();
    }
    let spans = window.spans();
    let mut out = String::new();
    if !args.journeys_only {
        let mut forest = Forest::new(spans.clone());
        forest.renumber(|id| window.number(id));
        let options = TreeOptions {
            only: Some(KEY_ATTRIBUTES.iter().map(|k| (*k).to_owned()).collect()),
            services: true,
            durations: !args.no_timings,
            ..TreeOptions::default()
        };
        for id in ready {
            if let Some(i) = forest.position(id) {
                out.push_str(&forest.render_trace(i, &options));
                out.push('\n');
            }
        }
    }
    let index = Index::new(&spans);
    let ready: std::collections::HashSet<&str> = ready.iter().map(String::as_str).collect();
    for j in journey::journeys(&index) {
        let touched = j
            .hops
            .iter()
            .any(|&i| ready.contains(index.spans[i].trace_id.as_str()));
        if !touched {
            continue;
        }
        let Some(&first) = j.hops.first() else {
            continue;
        };
        let number = window.journey_number(&index.spans[first].span_id);
        out.push_str(&journey::render(
            &j,
            number,
            &index,
            &|id| window.number(id),
            !args.no_timings,
        ));
        out.push('\n');
    }
    out
}

/// The closing lines: one per destination, and what the cap dropped.
fn render_summary(window: &Window, timings: bool) -> String {
    let spans = window.spans();
    let index = Index::new(&spans);
    let journeys = journey::journeys(&index);
    let mut summaries = journey::summaries(&index, &journeys);
    let mut out = format!(
        "{} spans in {} traces, {} message journeys\n",
        spans.len(),
        window.order.len(),
        journeys.len()
    );
    out.push_str(&journey::render_summaries(&mut summaries, timings));
    if window.dropped > 0 {
        out.push_str(&format!(
            "dropped {} oldest traces (--max-traces {}); {} spans received in all\n",
            window.dropped, window.max, window.received
        ));
    }
    out
}

/// Writes to stdout; a closed stdout (a pipe whose reader left) is not an error
/// worth a panic.
pub(crate) fn print(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// One trace request: into the capture being saved, then into the window.
fn keep(
    request: &ExportTraceServiceRequest,
    window: &Mutex<Window>,
    writer: Option<&mut capture::Writer>,
) -> Result<(), ViewError> {
    if let Some(w) = writer {
        w.write(request)?;
    }
    window
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .add(spans_of(request), Instant::now());
    Ok(())
}

/// What is printed last: every trace not printed yet, its journeys, the summary.
fn closing(window: &Mutex<Window>, args: &ViewArgs) -> String {
    let mut w = window.lock().unwrap_or_else(PoisonError::into_inner);
    let ready = w.ready(Instant::now(), None);
    let mut text = render_ready(&mut w, &ready, args);
    text.push_str(&render_summary(&w, !args.no_timings));
    text
}

/// Starts the receivers; each trace request goes to the returned channel.
pub(crate) async fn listen(
    listen: &ListenArgs,
) -> Result<(Collector, mpsc::Receiver<ExportTraceServiceRequest>), ViewError> {
    let (tap, requests) = mpsc::channel(256);
    let config = CollectorConfig::default()
        .listen(listen.grpc, listen.http)
        .keep(false);
    let collector = Collector::start_with(config, Some(tap))
        .await
        .map_err(ViewError::Listen)?;
    Ok((collector, requests))
}

/// Resolves when the user presses Ctrl-C or `duration` passes.
pub(crate) async fn stopped(duration: Option<Duration>) {
    let timer = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = timer => {}
    }
}

pub(crate) async fn run(args: ViewArgs) -> Result<(), ViewError> {
    if args.max_traces == 0 {
        return Err(ViewError::NoTraces);
    }
    if let Some(web) = args.web {
        if !web.ip().is_loopback() {
            return Err(ViewError::WebNotLoopback(web));
        }
    }
    let window = Arc::new(Mutex::new(Window::new(args.max_traces)));
    let live = args.load.is_none();
    if let Some(web) = args.web {
        let addr = crate::web::serve(web, window.clone(), live)
            .await
            .map_err(ViewError::Listen)?;
        print(&format!("journeys drawn at http://{addr}/\n"));
    }

    if let Some(path) = &args.load {
        let mut spans = capture::load(path)?.spans;
        // Traces numbered by when they started, whatever order their services
        // exported them in.
        spans.sort_by(|a, b| (a.start_unix_nano, &a.name).cmp(&(b.start_unix_nano, &b.name)));
        window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add(spans, Instant::now());
        print(&closing(&window, &args));
        if args.web.is_some() {
            stopped(args.duration).await;
        }
        return Ok(());
    }

    let (collector, mut requests) = listen(&args.listen).await?;
    print(&format!(
        "listening for OTLP: gRPC {}, HTTP {}/v1/traces\n",
        collector.grpc_endpoint(),
        collector.http_endpoint()
    ));
    let mut writer = args
        .save
        .as_deref()
        .map(capture::Writer::create)
        .transpose()?;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = stopped(args.duration);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            request = requests.recv() => {
                let Some(request) = request else { break };
                keep(&request, &window, writer.as_mut())?;
            }
            _ = tick.tick() => {
                let text = {
                    let mut w = window.lock().unwrap_or_else(PoisonError::into_inner);
                    let ready = w.ready(Instant::now(), Some(args.quiet));
                    render_ready(&mut w, &ready, &args)
                };
                print(&text);
            }
            () = &mut stop => break,
        }
    }
    drop(collector);
    // What arrived since the last tick, then the summary.
    while let Ok(request) = requests.try_recv() {
        keep(&request, &window, writer.as_mut())?;
    }
    print(&closing(&window, &args));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journey::fixture::Spans;

    #[test]
    fn the_window_keeps_the_newest_traces_and_counts_the_rest() {
        let mut c = Spans::default();
        c.healthy("1", 0);
        c.healthy("2", 10);
        c.healthy("3", 20);
        let mut w = Window::new(2);
        let now = Instant::now();
        w.add(c.spans.clone(), now);
        assert_eq!(w.dropped(), 1);
        let kept: Vec<String> = w.spans().iter().map(|s| s.trace_id.clone()).collect();
        assert_eq!(kept.len(), 4);
        assert!(kept.iter().all(|t| !t.ends_with('1')), "{kept:?}");
        assert_eq!(
            render_summary(&w, false).lines().last(),
            Some("dropped 1 oldest traces (--max-traces 2); 6 spans received in all")
        );
    }

    #[test]
    fn a_trace_is_ready_when_quiet_and_again_when_it_grows() {
        let mut c = Spans::default();
        let (send, _) = c.healthy("1", 0);
        let mut w = Window::new(10);
        let t0 = Instant::now();
        w.add(c.spans[..1].to_vec(), t0);
        assert!(w.ready(t0, Some(Duration::from_secs(2))).is_empty());
        let later = t0 + Duration::from_secs(3);
        assert_eq!(w.ready(later, Some(Duration::from_secs(2))).len(), 1);
        assert!(w.ready(later, Some(Duration::from_secs(2))).is_empty());
        w.add(c.spans[1..].to_vec(), later);
        let ready = w.ready(later + Duration::from_secs(3), Some(Duration::from_secs(2)));
        assert_eq!(ready.len(), 1);
        // The trace keeps its number.
        assert_eq!(w.number(&ready[0]), 1);
        assert!(!send.is_empty());
    }
}
