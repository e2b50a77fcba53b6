//! `mqtrace view`: an OTLP receiver that prints traces as they complete and the
//! message journeys through them; `--save` keeps what arrived, `--load` shows a
//! saved capture, `--web` draws the journeys in a browser.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::Args;
use mqtrace_testing::{spans_of, Forest, TreeOptions};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

use crate::journey::{self, Index};
use crate::receive::capture::{self, CaptureError};
use crate::receive::{listen, print, stopped, ListenArgs, ReceiveError};

mod web;
mod window;

use window::Window;

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
    /// Spans kept in memory, in all traces: the oldest traces are dropped to make
    /// room; a trace that alone holds this many keeps its first spans and the
    /// rest are dropped, and counted.
    #[arg(long, default_value_t = 200_000, value_name = "N")]
    max_spans: usize,
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

/// Why `view` stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ViewError {
    #[error(transparent)]
    Receive(#[from] ReceiveError),
    #[error("{0}")]
    Capture(#[from] CaptureError),
    #[error("{0}")]
    Web(std::io::Error),
    #[error("--web serves on loopback only (the page has no access control), not {0}")]
    WebNotLoopback(SocketAddr),
    #[error("--max-traces must be at least 1")]
    NoTraces,
    #[error("--max-spans must be at least 1")]
    NoSpans,
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
/// then every journey with a hop in them. Only the ready traces' spans (and the
/// spans their links point at) are copied, for the trees.
fn render_ready(window: &mut Window, ready: &[String], args: &ViewArgs) -> String {
    if ready.is_empty() || args.summary_only {
        return String::new();
    }
    let snapshot = window.snapshot();
    let index = Index::new(snapshot.spans.iter().map(|s| &**s));
    let ready_ids: HashSet<&str> = ready.iter().map(String::as_str).collect();
    let mut out = String::new();
    if !args.journeys_only {
        let mut picked: HashSet<&str> = HashSet::new();
        let mut shown = Vec::new();
        for span in index
            .spans
            .iter()
            .filter(|s| ready_ids.contains(s.trace_id.as_str()))
        {
            let targets = span.links.iter().filter_map(|l| index.find(&l.span_id));
            for s in std::iter::once(*span).chain(targets.map(|j| index.spans[j])) {
                if picked.insert(s.span_id.as_str()) {
                    shown.push(s.clone());
                }
            }
        }
        let mut forest = Forest::new(shown);
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
    for j in journey::journeys(&index) {
        let touched = j
            .hops
            .iter()
            .any(|&i| ready_ids.contains(index.spans[i].trace_id.as_str()));
        if !touched {
            continue;
        }
        let Some(&first) = j.hops.first() else {
            continue;
        };
        let first = index.spans[first];
        let number = window.journey_number(&first.span_id, &first.trace_id);
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

/// The closing lines: one per destination, and what the caps dropped.
fn render_summary(window: &Window, timings: bool) -> String {
    let snapshot = window.snapshot();
    let index = Index::new(snapshot.spans.iter().map(|s| &**s));
    let journeys = journey::journeys(&index);
    let mut summaries = journey::summaries(&index, &journeys);
    let mut out = format!(
        "{} spans in {} traces, {} message journeys\n",
        snapshot.spans.len(),
        window.order.len(),
        journeys.len()
    );
    out.push_str(&journey::render_summaries(&mut summaries, timings));
    if window.dropped > 0 {
        let caps = if window.dropped_for_spans {
            format!(
                "--max-traces {}, --max-spans {}",
                window.max, window.max_spans
            )
        } else {
            format!("--max-traces {}", window.max)
        };
        out.push_str(&format!(
            "dropped {} oldest traces ({caps}); {} spans received in all\n",
            window.dropped, window.received
        ));
    }
    if window.dropped_spans > 0 {
        out.push_str(&format!(
            "dropped {} spans of traces larger than --max-spans {}; {} spans received in all\n",
            window.dropped_spans, window.max_spans, window.received
        ));
    }
    out
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
    let spans = spans_of(request);
    window
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .add(spans, Instant::now());
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

pub(crate) async fn run(args: ViewArgs) -> Result<(), ViewError> {
    if args.max_traces == 0 {
        return Err(ViewError::NoTraces);
    }
    if args.max_spans == 0 {
        return Err(ViewError::NoSpans);
    }
    if let Some(web) = args.web {
        if !web.ip().is_loopback() {
            return Err(ViewError::WebNotLoopback(web));
        }
    }
    let window = Arc::new(Mutex::new(Window::new(args.max_traces, args.max_spans)));
    let live = args.load.is_none();
    if let Some(web) = args.web {
        let addr = web::serve(web, window.clone(), live)
            .await
            .map_err(ViewError::Web)?;
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
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::journey::fixture::Spans;

    trait Pad {
        /// A fixture's trace id.
        fn pad(&self) -> String;
    }

    impl Pad for str {
        fn pad(&self) -> String {
            format!("{self:0>32}")
        }
    }

    #[test]
    fn the_window_keeps_the_newest_traces_and_counts_the_rest() {
        let mut c = Spans::default();
        c.healthy("1", 0);
        c.healthy("2", 10);
        c.healthy("3", 20);
        let mut w = Window::new(2, 100);
        let now = Instant::now();
        w.add(c.spans.clone(), now);
        assert_eq!(w.dropped(), 1);
        let kept: Vec<String> = w
            .snapshot()
            .spans
            .iter()
            .map(|s| s.trace_id.clone())
            .collect();
        assert_eq!(kept.len(), 4);
        assert!(kept.iter().all(|t| !t.ends_with('1')), "{kept:?}");
        assert_eq!(
            render_summary(&w, false).lines().last(),
            Some("dropped 1 oldest traces (--max-traces 2); 6 spans received in all")
        );
    }

    /// One trace of 1,000 spans under `--max-spans 100` keeps its first 100 and
    /// counts the other 900; before, `--max-traces` alone let it grow without end.
    #[test]
    fn one_trace_keeps_at_most_max_spans_and_counts_the_rest() {
        let mut c = Spans::default();
        for i in 0..500 {
            c.healthy("1", i);
        }
        let mut w = Window::new(10, 100);
        w.add(c.spans.clone(), Instant::now());
        assert_eq!(w.span_count(), 100);
        assert_eq!(w.snapshot().spans.len(), 100);
        assert_eq!(w.dropped(), 0);
        assert_eq!(w.dropped_spans(), 900);
        assert_eq!(
            render_summary(&w, false).lines().last(),
            Some("dropped 900 spans of traces larger than --max-spans 100; 1000 spans received in all")
        );
    }

    /// Spans of new traces make room by dropping the oldest traces first: three
    /// traces of two spans under `--max-spans 4` keep the last two.
    #[test]
    fn the_oldest_traces_make_room_under_the_span_cap() {
        let mut c = Spans::default();
        c.healthy("1", 0);
        c.healthy("2", 10);
        c.healthy("3", 20);
        let mut w = Window::new(10, 4);
        w.add(c.spans.clone(), Instant::now());
        assert_eq!(w.span_count(), 4);
        assert_eq!(w.dropped(), 1);
        assert_eq!(w.dropped_spans(), 0);
        assert_eq!(w.number(&"1".pad()), 0);
        assert_eq!(w.number(&"2".pad()), 2);
        assert_eq!(
            render_summary(&w, false).lines().last(),
            Some(
                "dropped 1 oldest traces (--max-traces 10, --max-spans 4); 6 spans received in all"
            )
        );
    }

    /// Journey numbers go with the traces of their first hop: a window that
    /// keeps two traces remembers two journeys, however many went by, and new
    /// journeys keep counting up.
    #[test]
    fn journey_numbers_are_pruned_with_their_traces() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            view: ViewArgs,
        }
        let args =
            <Cli as clap::Parser>::parse_from(["view", "--journeys-only", "--no-timings"]).view;
        let mut w = Window::new(2, 1_000);
        let mut c = Spans::default();
        let mut last = String::new();
        for t in 1..=50u64 {
            let from = c.spans.len();
            c.healthy(&t.to_string(), t * 10);
            let now = Instant::now();
            w.add(c.spans[from..].to_vec(), now);
            let ready = w.ready(now, None);
            last = render_ready(&mut w, &ready, &args);
        }
        assert_eq!(w.journey_count(), 2);
        assert!(last.starts_with("journey #50 · orders"), "{last}");
    }

    /// Answers an HTTP/1.1 `POST /v1/traces` with this body, sent with a
    /// `Content-Length` or chunked: the status code.
    async fn post(addr: SocketAddr, body: &[u8], chunked: bool) -> u16 {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut request = b"POST /v1/traces HTTP/1.1\r\nHost: 127.0.0.1\r\n\
            Content-Type: application/x-protobuf\r\nConnection: close\r\n"
            .to_vec();
        if chunked {
            request.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            for chunk in body.chunks(100) {
                request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                request.extend_from_slice(chunk);
                request.extend_from_slice(b"\r\n");
            }
            request.extend_from_slice(b"0\r\n\r\n");
        } else {
            request.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
            request.extend_from_slice(body);
        }
        // The receiver may answer and close before reading it all.
        let _ = stream.write_all(&request).await;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        answer
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status in {answer:?}"))
    }

    /// A trace request of about `bytes` bytes, encoded.
    fn request_of(bytes: usize) -> ExportTraceServiceRequest {
        use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        trace_id: vec![1; 16],
                        span_id: vec![2; 8],
                        name: "x".repeat(bytes.saturating_sub(40)),
                        ..Span::default()
                    }],
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            }],
        }
    }

    /// Both receivers refuse a request over `--max-request-size` before reading
    /// it whole: HTTP with 413 (by its `Content-Length`, or once a chunked body
    /// passes the limit), gRPC with `RESOURCE_EXHAUSTED`. Below it, both take it.
    /// Before, the HTTP receiver read any body whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_over_the_size_limit_are_refused() {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
        use prost::Message as _;

        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let listen_args = ListenArgs {
            grpc: loopback,
            http: loopback,
            max_request_size: Some(10_000),
        };
        let (collector, mut requests) = listen(&listen_args).await.unwrap();
        let http: SocketAddr = collector.http_endpoint()["http://".len()..]
            .parse()
            .unwrap();
        let small = request_of(9_000).encode_to_vec();
        let large = request_of(11_000).encode_to_vec();
        assert!(small.len() <= 10_000 && large.len() > 10_000);

        assert_eq!(post(http, &large, false).await, 413);
        assert_eq!(post(http, &large, true).await, 413);
        assert_eq!(post(http, &small, false).await, 200);
        assert_eq!(post(http, &small, true).await, 200);

        let mut grpc = TraceServiceClient::connect(collector.grpc_endpoint())
            .await
            .unwrap();
        let refused = grpc.export(request_of(11_000)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
        grpc.export(request_of(9_000)).await.unwrap();

        drop(collector);
        let mut taken = 0;
        while requests.recv().await.is_some() {
            taken += 1;
        }
        assert_eq!(taken, 3);
    }

    #[test]
    fn a_trace_is_ready_when_quiet_and_again_when_it_grows() {
        let mut c = Spans::default();
        let (send, _) = c.healthy("1", 0);
        let mut w = Window::new(10, 100);
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
