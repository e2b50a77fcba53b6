//! `mqtrace view` and `mqtrace doctor` as a user runs them: on the demo's capture,
//! live over real OTLP (gRPC and HTTP) from the demo's services, in headless
//! Chromium for the web page, and on broken and unreadable captures.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use mqtrace_testing::turns::Turn;

fn mqtrace() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mqtrace"));
    command
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL");
    command
}

fn run(args: &[&str]) -> (Output, String) {
    let out = mqtrace().args(args).output().expect("mqtrace runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, stdout)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mqtrace-view-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The demo's run with seed 3 (one retry, one dead letter), saved as a capture.
fn demo_capture(dir: &Path) -> PathBuf {
    let path = dir.join("demo.jsonl");
    let (out, _) = run(&[
        "demo",
        "--messages",
        "8",
        "--seed",
        "3",
        "--show",
        "0",
        "--save",
        path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// A running `mqtrace` whose stdout lines arrive on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn start(args: &[&str]) -> Self {
        let mut child = mqtrace()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("mqtrace starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line starting with `prefix` and returns it.
    fn wait_for(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line starting {prefix:?} within {timeout:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Ctrl-C, then everything it printed.
    fn interrupt(mut self) -> (bool, String) {
        let pid = self.child.id().to_string();
        let killed = Command::new("kill").args(["-INT", &pid]).status().unwrap();
        assert!(killed.success());
        let status = self.child.wait().unwrap();
        self.seen.extend(self.lines.iter());
        (status.success(), self.seen.join("\n"))
    }

    fn finish(mut self) -> (bool, String) {
        let status = self.child.wait().unwrap();
        self.seen.extend(self.lines.iter());
        (status.success(), self.seen.join("\n"))
    }
}

/// `http://127.0.0.1:PORT` from the line `view` prints when it listens.
fn endpoints(line: &str) -> (String, String) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let grpc = words[words.iter().position(|w| *w == "gRPC").unwrap() + 1].trim_end_matches(',');
    let http =
        words[words.iter().position(|w| *w == "HTTP").unwrap() + 1].trim_end_matches("/v1/traces");
    (grpc.to_owned(), http.to_owned())
}

/// The same capture prints the same trees, journeys and summary. Regenerate after
/// an intended change with `MQTRACE_BLESS=1 cargo test -p mqtrace-cli`.
#[test]
fn a_demo_capture_shows_as_trees_journeys_and_a_summary() {
    let _turn = Turn::shared_blocking();
    let dir = scratch("golden");
    let capture = demo_capture(&dir);
    let (out, stdout) = run(&["view", "--load", capture.to_str().unwrap(), "--no-timings"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let golden = mqtrace_testing::assert_golden(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/view.txt"),
        &stdout,
    );
    // The retried order is one journey through its forward; the malformed one ends
    // in the dead letters.
    assert!(golden.contains(
        "journey #6 · orders · message \"6\" · 2 attempts · 1 trace · settled\n\
         \x20 send     orders                   order-producer   trace #6\n\
         \x20 process  orders                   order-worker     trace #6  attempt 1  ERROR payment_timeout  → retried\n\
         \x20 forward  orders                   order-worker     trace #6\n\
         \x20 process  orders                   order-worker     trace #6  attempt 2  → settled\n"
    ));
    assert!(golden.ends_with(
        "43 spans in 8 traces, 8 message journeys\norders: 8 messages, 9 attempts, 2 failed\n"
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Two demo runs export to a listening `view`, one over gRPC and one over HTTP;
/// traces print as they complete, Ctrl-C prints the summary, and `--save` kept
/// every span in a capture that reads back.
#[test]
fn view_receives_over_grpc_and_http_and_saves_what_arrived() {
    let _turn = Turn::shared_blocking();
    let dir = scratch("live");
    let saved = dir.join("saved.jsonl");
    let mut view = Running::start(&[
        "view",
        "--grpc",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--quiet",
        "300ms",
        "--save",
        saved.to_str().unwrap(),
        "--web",
        "127.0.0.1:0",
    ]);
    let page = view.wait_for("journeys drawn at ", Duration::from_secs(30));
    let page = page
        .trim_start_matches("journeys drawn at http://")
        .trim_end_matches('/')
        .to_owned();
    let (grpc, http) = endpoints(&view.wait_for("listening for OTLP", Duration::from_secs(30)));
    for (endpoint, protocol) in [(grpc, "grpc"), (http, "http/protobuf")] {
        let out = mqtrace()
            .args(["demo", "--messages", "8", "--seed", "3", "--show", "0"])
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Both runs' traces were printed before Ctrl-C: sixteen trees.
    for _ in 0..16 {
        view.wait_for("trace #", Duration::from_secs(30));
    }
    view.wait_for("journey #16 ", Duration::from_secs(30));
    // The page's live data, as it polls it.
    let live = http_get(&page, "/api/journeys");
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");
    assert!(live.contains("\"live\":true"), "{live}");
    assert_eq!(live.matches("\"outcome\":").count(), 16, "{live}");
    let (ok, output) = view.interrupt();
    assert!(ok, "view failed:\n{output}");
    assert!(
        output.contains("86 spans in 16 traces, 16 message journeys\norders: 16 messages, 18 attempts, 4 failed, process p50"),
        "{output}"
    );
    let (out, stdout) = run(&["doctor", saved.to_str().unwrap()]);
    assert!(out.status.success(), "{stdout}");
    assert_eq!(
        stdout,
        "mqtrace doctor: no broken propagation in 86 spans from 2 services (16 message journeys)\n"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_cap_drops_the_oldest_traces_and_says_so() {
    let _turn = Turn::shared_blocking();
    let dir = scratch("cap");
    let capture = demo_capture(&dir);
    let (out, stdout) = run(&[
        "view",
        "--load",
        capture.to_str().unwrap(),
        "--max-traces",
        "3",
        "--journeys-only",
        "--no-timings",
    ]);
    assert!(out.status.success());
    assert!(!stdout.contains("trace #1\n"), "{stdout}");
    assert!(
        stdout.ends_with(
            "18 spans in 3 traces, 3 message journeys\norders: 3 messages, 4 attempts, 2 failed\ndropped 5 oldest traces (--max-traces 3); 43 spans received in all\n"
        ),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A plain HTTP/1.1 GET: the status line, headers and body.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

fn chromium() -> PathBuf {
    let path = std::env::var_os("MQTRACE_TEST_CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        path.exists(),
        "headless Chromium is needed at {} (MQTRACE_TEST_CHROMIUM): scripts/brokers.sh start \
         installs it, or apt-get install chromium",
        path.display()
    );
    path
}

fn headless(chromium: &Path, profile: &Path, args: &[&str]) -> Output {
    Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("chromium runs")
}

/// The page, loaded in headless Chromium, draws every journey with its hops in
/// order and the parents and links between them; the test keeps a screenshot.
#[test]
fn the_web_page_draws_the_journeys_in_headless_chromium() {
    let _turn = Turn::shared_blocking();
    let chromium = chromium();
    let dir = scratch("web");
    let capture = demo_capture(&dir);
    let mut view = Running::start(&[
        "view",
        "--load",
        capture.to_str().unwrap(),
        "--journeys-only",
        "--web",
        "127.0.0.1:0",
        "--duration",
        "120s",
    ]);
    let line = view.wait_for("journeys drawn at ", Duration::from_secs(30));
    let url = line.trim_start_matches("journeys drawn at ").to_owned();

    let dom = headless(&chromium, &dir.join("profile-dom"), &["--dump-dom", &url]);
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    assert!(
        dom.contains("data-ready=\"true\""),
        "the page did not draw:\n{dom}"
    );
    assert_eq!(
        dom.matches("<section class=\"journey\"").count(),
        8,
        "{dom}"
    );
    // Journey 6: the retried order, its hops in order, and its edges: the process
    // spans' parents and links, the forward's two links and its parent.
    let six = section(&dom, 6);
    assert!(six.contains("data-outcome=\"settled\""), "{six}");
    assert_eq!(
        hops(six),
        [
            "send orders",
            "process orders",
            "forward orders",
            "process orders"
        ]
    );
    assert_eq!(
        six.matches("class=\"edge edge-parent\"").count(),
        3,
        "{six}"
    );
    assert_eq!(six.matches("class=\"edge edge-link\"").count(), 4, "{six}");
    let seven = section(&dom, 7);
    assert!(seven.contains("data-outcome=\"dead_lettered\""), "{seven}");
    assert_eq!(
        hops(seven),
        ["send orders", "process orders", "forward orders.dlq"]
    );

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("view-web.png");
    let _ = std::fs::remove_file(&shot);
    let out = headless(
        &chromium,
        &dir.join("profile-shot"),
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,1400",
            &url,
        ],
    );
    let png = std::fs::read(&shot).unwrap_or_else(|e| {
        panic!(
            "no screenshot at {} ({e}): {}",
            shot.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    println!("screenshot of the journeys page: {}", shot.display());

    let (_, output) = view.interrupt();
    assert!(output.contains("journey #8 "), "{output}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn section(dom: &str, number: usize) -> &str {
    let start = dom
        .find(&format!("data-journey=\"{number}\""))
        .unwrap_or_else(|| panic!("no journey {number}"));
    let end = dom[start..]
        .find("</section>")
        .map_or(dom.len(), |e| start + e);
    &dom[start..end]
}

fn hops(section: &str) -> Vec<&str> {
    section
        .split("data-hop=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .collect()
}

/// The demo's capture is healthy; the same capture with the consumers' context
/// stripped (no parent, no link: what a dropped header does) is not, and the
/// report names the spans, the cause and the fix.
#[test]
fn doctor_passes_the_demo_and_names_a_broken_propagation() {
    let _turn = Turn::shared_blocking();
    let dir = scratch("doctor");
    let capture = demo_capture(&dir);
    let (out, stdout) = run(&["doctor", capture.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert_eq!(
        stdout,
        "mqtrace doctor: no broken propagation in 43 spans from 2 services (8 message journeys)\n"
    );

    let text = std::fs::read_to_string(&capture).unwrap();
    let mut broken = String::new();
    for line in text.lines() {
        let mut request: serde_json::Value = serde_json::from_str(line).unwrap();
        for rs in request["resourceSpans"].as_array_mut().unwrap() {
            for ss in rs["scopeSpans"].as_array_mut().unwrap() {
                for span in ss["spans"].as_array_mut().unwrap() {
                    if span["name"] == "process orders" && span["kind"] == 5 {
                        span["parentSpanId"] = "".into();
                        span["links"] = serde_json::json!([]);
                    }
                }
            }
        }
        broken.push_str(&request.to_string());
        broken.push('\n');
    }
    let broken_path = dir.join("broken.jsonl");
    std::fs::write(&broken_path, broken).unwrap();
    let (out, stdout) = run(&["doctor", broken_path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.starts_with("mqtrace doctor: "), "{stdout}");
    assert!(
        stdout.contains("\n✗ context_not_continued: 9 process spans on orders\n    process orders (order-worker, span "),
        "{stdout}"
    );
    assert!(
        stdout.contains("  likely cause: the consumer found no trace context in the message"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  fix: use the same propagators on both sides"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("\n✗ ").count(), 1, "{stdout}");
    // The capture ended within a second of the publications: only with no grace
    // time are they judged unconsumed (the retry forward among them, the
    // dead-letter forward not).
    let (out, stdout) = run(&[
        "doctor",
        broken_path.to_str().unwrap(),
        "--allow",
        "context_not_continued",
        "--grace",
        "0s",
    ]);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("\n✗ not_consumed: 9 publications to orders\n"),
        "{stdout}"
    );
    let (out, stdout) = run(&[
        "doctor",
        broken_path.to_str().unwrap(),
        "--allow",
        "context_not_continued",
    ]);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `doctor --listen-for` judges what arrives meanwhile.
#[test]
fn doctor_listens_for_a_while() {
    let _turn = Turn::shared_blocking();
    let mut doctor = Running::start(&[
        "doctor",
        "--listen-for",
        "8s",
        "--grpc",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
    ]);
    let (grpc, _) =
        endpoints(&doctor.wait_for("mqtrace doctor: listening", Duration::from_secs(30)));
    let out = mqtrace()
        .args(["demo", "--messages", "8", "--seed", "3", "--show", "0"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &grpc)
        .output()
        .unwrap();
    assert!(out.status.success());
    let (ok, output) = doctor.finish();
    assert!(ok, "{output}");
    assert!(
        output.ends_with("mqtrace doctor: no broken propagation in 43 spans from 2 services (8 message journeys)"),
        "{output}"
    );
}

#[test]
fn bad_input_gets_a_clear_error() {
    let _turn = Turn::shared_blocking();
    let dir = scratch("bad");
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"resourceSpans\":[]}\nnot json\n").unwrap();
    for args in [
        vec!["doctor", bad.to_str().unwrap()],
        vec!["view", "--load", bad.to_str().unwrap()],
    ] {
        let (out, _) = run(&args);
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "capture {}, line 2: not an OTLP JSON export request",
                bad.display()
            )),
            "{stderr}"
        );
    }
    let (out, _) = run(&["view", "--load", "/nonexistent/capture.jsonl"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("cannot open capture /nonexistent/capture.jsonl"));
    let (out, _) = run(&["view", "--web", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--web serves on loopback only"));
    // A port in use is named.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let (out, _) = run(&["view", "--grpc", &port, "--http", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("cannot listen for OTLP gRPC on {port}")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn help_has_examples_and_names_the_checks() {
    let _turn = Turn::shared_blocking();
    let (out, stdout) = run(&["view", "--help"]);
    assert!(out.status.success());
    assert!(stdout.contains("Examples:\n  mqtrace view "), "{stdout}");
    let (out, stdout) = run(&["doctor", "--help"]);
    assert!(out.status.success());
    for check in [
        "context_not_continued",
        "xray_only",
        "missing_spans",
        "not_consumed",
        "context_omitted",
        "retry_without_forward_link",
        "link_only_parenting",
        "no_messaging_spans",
        "negative_queue_time",
        "retry_never_arrived",
    ] {
        assert!(stdout.contains(check), "{check} missing from:\n{stdout}");
    }
    assert!(stdout.contains("Exit status: 0 when nothing is wrong, 1 with findings"));
}

/// A binary of the `mqtrace-perf` crate, which `cargo test --workspace` builds
/// (its own tests run them).
fn perf_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: `cargo test --workspace` builds it, or `cargo build -p mqtrace-perf --bin {name}`",
        path.display()
    );
    path
}

/// Runs `span_rate` (`mqtrace-perf`) against `mqtrace view` in another process and
/// returns its report and the number of spans the view received.
fn span_rate(args: &[&str]) -> (bool, String, u64) {
    // One rate run at a time: two would share the machine's two cores.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut view = Running::start(&[
        "view",
        "--grpc",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--summary-only",
        "--max-traces",
        "100",
    ]);
    let (grpc, _) = endpoints(&view.wait_for("listening for OTLP", Duration::from_secs(30)));
    let out = Command::new(perf_binary("span_rate"))
        .args(args)
        .args(["--endpoint", &grpc])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}");
    let (ok, output) = view.interrupt();
    assert!(ok, "{output}");
    let received = output
        .split("; ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no span count in:\n{output}"));
    (out.status.success(), stdout, received)
}

/// Messaging rates with the default telemetry set-up lose no span: two services
/// at 10,000 messages/s for 3 s export to `mqtrace view` in another process, which
/// receives every span (the full 60 s runs: docs/benchmarks.md).
#[test]
fn ten_thousand_messages_a_second_with_the_defaults_lose_no_span() {
    let _turn = Turn::alone_blocking();
    let (ok, stdout, received) = span_rate(&["--rate", "10000", "--seconds", "3"]);
    assert!(ok, "{stdout}");
    assert!(stdout.contains(", processed 30000\n"), "{stdout}");
    assert!(
        stdout.contains("producer: ended 30000 exported 30000 not exported 0\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("worker: ended 30000 exported 30000 not exported 0\n"),
        "{stdout}"
    );
    assert_eq!(received, 60_000);
}

/// A collector that takes 100 ms to answer each export: mqtrace's batch defaults
/// still lose nothing at 10,000 messages/s, where the SDK's lose most spans (what
/// the defaults are for).
#[test]
fn the_batch_defaults_keep_up_with_a_slow_collector() {
    let _turn = Turn::alone_blocking();
    let slow = [
        "--rate",
        "10000",
        "--seconds",
        "3",
        "--collector-delay-ms",
        "100",
    ];
    let (ok, stdout, received) = span_rate(&slow);
    assert!(ok, "{stdout}");
    assert!(stdout.contains("spans not exported: 0\n"), "{stdout}");
    assert_eq!(received, 60_000);

    let (ok, stdout, received) = span_rate(&[&slow[..], &["--sdk-batch-defaults"]].concat());
    assert!(!ok, "the SDK's defaults kept up:\n{stdout}");
    let lost: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("spans not exported: "))
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(lost > 10_000, "{stdout}");
    assert_eq!(received + lost, 60_000, "{stdout}");
}
