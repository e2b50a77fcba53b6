//! Faults on demand for the reliability tests: a TCP proxy that can refuse, hang or
//! forward connections to a real endpoint, and a Kafka-protocol broker of a test's
//! own, with durable storage, that the test kills and starts again; and the test
//! binary run again as a consumer process that the test kills.

use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What a [`Proxy`] does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Passes bytes both ways between the client and the upstream.
    Forward,
    /// Nothing listens: connections are refused, as by a stopped server.
    Refuse,
    /// Accepts connections and never answers, as a wedged server does.
    Hang,
    /// Forwards, holding each chunk of the upstream's answers back this long: a
    /// server that takes this long per request.
    Slow(Duration),
}

/// A loopback TCP proxy in front of `upstream`. Every change of mode drops the
/// connections open at that moment, as a server going away would.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding to `upstream` from a free port on 127.0.0.1. Needs a tokio
    /// runtime.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, rx) = watch::channel(Mode::Forward);
        let task = tokio::spawn(serve(Some(listener), addr, upstream, rx));
        Ok(Self { addr, mode, task })
    }

    /// `127.0.0.1:port` of the proxy.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches mode; connections open now are closed.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut listener: Option<TcpListener>,
    addr: SocketAddr,
    upstream: SocketAddr,
    mut rx: watch::Receiver<Mode>,
) {
    loop {
        let mode = *rx.borrow_and_update();
        if mode == Mode::Refuse {
            drop(listener.take());
            if rx.changed().await.is_err() {
                return;
            }
            continue;
        }
        let current = match listener.take() {
            Some(l) => l,
            None => match bind_again(addr).await {
                Some(l) => l,
                None => return,
            },
        };
        loop {
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    listener = Some(current);
                    break;
                }
                accepted = current.accept() => {
                    if let Ok((inbound, _)) = accepted {
                        tokio::spawn(connection(inbound, upstream, mode, rx.clone()));
                    }
                }
            }
        }
    }
}

/// The port was ours a moment ago; another process could take it in between, so
/// this retries for a while before giving up.
async fn bind_again(addr: SocketAddr) -> Option<TcpListener> {
    for _ in 0..100 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return Some(l);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn connection(
    mut inbound: TcpStream,
    upstream: SocketAddr,
    mode: Mode,
    mut rx: watch::Receiver<Mode>,
) {
    let work = async {
        match mode {
            Mode::Forward => {
                if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            }
            Mode::Slow(delay) => {
                if let Ok(outbound) = TcpStream::connect(upstream).await {
                    let (mut from_client, mut to_client) = inbound.into_split();
                    let (mut from_upstream, mut to_upstream) = outbound.into_split();
                    let requests = tokio::io::copy(&mut from_client, &mut to_upstream);
                    let answers = async {
                        let mut chunk = vec![0_u8; 64 * 1024];
                        loop {
                            match from_upstream.read(&mut chunk).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    tokio::time::sleep(delay).await;
                                    if to_client.write_all(&chunk[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                    };
                    tokio::select! {
                        _ = requests => {}
                        () = answers => {}
                    }
                }
            }
            // Holds the connection open, reading nothing and answering nothing.
            Mode::Hang | Mode::Refuse => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = work => {}
        _ = rx.changed() => {}
    }
}

/// A free port on 127.0.0.1 (free when this returns).
pub fn free_port() -> std::io::Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Variable naming the tansu binary `scripts/brokers.sh` built.
pub const TANSU_ENV: &str = "MQTRACE_TEST_TANSU";
/// Variable holding the S3 endpoint (the SQS emulator also speaks S3) where a
/// [`Tansu`] keeps its data, in the bucket [`TANSU_BUCKET`].
pub const S3_ENV: &str = "MQTRACE_TEST_S3_ENDPOINT";
/// The bucket `scripts/brokers.sh` creates for [`Tansu`] brokers.
pub const TANSU_BUCKET: &str = "mqtrace-kafka";

/// A Kafka-protocol broker of one test's own: tansu, storing its log in S3 (the SQS
/// emulator's S3) under a cluster id unique to the test, so that killing the
/// process loses nothing and a restart finds every record and committed offset.
#[derive(Debug)]
pub struct Tansu {
    binary: PathBuf,
    s3: String,
    port: u16,
    /// What the broker tells clients to connect to, when not its own address.
    advertised: Option<SocketAddr>,
    cluster: String,
    child: Option<Child>,
}

impl Tansu {
    /// Starts the broker on a free port and waits until it accepts connections.
    pub fn start() -> Self {
        let port = free_port().unwrap_or_else(|e| panic!("no free port on 127.0.0.1: {e}"));
        Self::start_on(port, None)
    }

    /// Starts the broker on `port`, telling clients to connect to `advertised`
    /// instead (a [`Proxy`] in front of it, so that every connection of a client,
    /// the group coordinator's included, goes through the proxy), and waits until
    /// it accepts connections.
    pub fn start_behind(port: u16, advertised: SocketAddr) -> Self {
        Self::start_on(port, Some(advertised))
    }

    fn start_on(port: u16, advertised: Option<SocketAddr>) -> Self {
        let binary = PathBuf::from(crate::brokers::env_or_explain(
            TANSU_ENV,
            "The tansu binary for the broker-restart tests",
        ));
        let s3 = crate::brokers::env_or_explain(S3_ENV, "An S3 endpoint for tansu's storage");
        let cluster = format!("restart-{:016x}", fastrand::u64(..));
        let mut tansu = Self {
            binary,
            s3,
            port,
            advertised,
            cluster,
            child: None,
        };
        tansu.restart();
        tansu
    }

    /// `host:port` for `bootstrap.servers`: the advertised address when there is
    /// one, the broker's own otherwise.
    pub fn bootstrap(&self) -> String {
        self.advertised
            .map_or_else(|| format!("127.0.0.1:{}", self.port), |a| a.to_string())
    }

    /// Kills the process (SIGKILL: no orderly shutdown) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process (again) on the same port and storage and waits until it
    /// accepts connections.
    pub fn restart(&mut self) {
        self.kill();
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = self
            .advertised
            .map_or_else(|| url.clone(), |a| format!("tcp://{a}"));
        let child = Command::new(&self.binary)
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &advertised])
            .args(["--cluster-id", &self.cluster])
            .args(["--storage-engine", &format!("s3://{TANSU_BUCKET}/")])
            .env("AWS_ENDPOINT", &self.s3)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(30);
        while StdStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {addr} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Variable that turns a test into the child process of a kill test.
pub const CHILD_ENV: &str = "MQTRACE_TEST_CHILD";

/// The role given to this process by [`ChildProcess::spawn`], if it is one.
pub fn child_role() -> Option<String> {
    std::env::var(CHILD_ENV).ok().filter(|v| !v.is_empty())
}

/// The test binary run again as a child process: only the test `test` (which
/// sees [`child_role`] and plays the consumer), killed by the parent test with
/// SIGKILL when it reports the moment to.
#[derive(Debug)]
pub struct ChildProcess {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl ChildProcess {
    /// Runs `test` of this test binary in a child process with `role` and the
    /// extra variables `env`.
    pub fn spawn(test: &str, role: &str, env: &[(&str, &str)]) -> Self {
        let exe = std::env::current_exe()
            .unwrap_or_else(|e| panic!("cannot find the test binary to run again: {e}"));
        let mut command = Command::new(exe);
        command
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, role)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the child process: {e}"));
        let (tx, lines) = std::sync::mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stdout)
                    .lines()
                    .map_while(Result::ok)
                {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        Self { child, lines }
    }

    /// Waits (blocking) for `prefix` in the child's output and returns the rest of
    /// its line. (Not necessarily at the line's start: the test harness prints the
    /// test's name first.) Fails the test after `timeout`.
    pub fn wait_for(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some((_, rest)) = line.split_once(prefix) {
                        return rest.trim().to_owned();
                    }
                }
                Err(e) => panic!("the child process did not print {prefix:?} ({e})"),
            }
        }
    }

    /// SIGKILL: no destructor, no flush, no goodbye to the broker.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Appends `line` to the file at `path` and syncs it: the record of work a
/// process did before it was killed.
pub fn append_synced(path: &str, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{line}")?;
    f.sync_data()
}

/// The collector's states in a collector-fault run, in order: healthy,
/// unreachable (connections refused), hanging (accepts, never answers), back.
pub const COLLECTOR_PHASES: [(&str, Mode); 4] = [
    ("healthy", Mode::Forward),
    ("unreachable", Mode::Refuse),
    ("hanging", Mode::Hang),
    ("back", Mode::Forward),
];

/// Messages per phase of a collector-fault run: `MQTRACE_FAULT_MESSAGES`, or
/// `default`. Longer runs give steadier throughput figures.
pub fn messages_per_phase(default: usize) -> usize {
    std::env::var("MQTRACE_FAULT_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One phase of a collector-fault run.
#[derive(Debug, Clone)]
pub struct PhaseReport {
    /// Which of [`COLLECTOR_PHASES`].
    pub name: &'static str,
    /// Messages sent and processed in the phase.
    pub messages: usize,
    /// From the first send to the last message processed.
    pub elapsed: Duration,
    /// The telemetry's span counts (ended, exported) at the end of the phase.
    pub spans_at_end: (u64, u64),
}

impl PhaseReport {
    /// Messages per second through the broker.
    pub fn throughput(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs `phase(first_id, n)` (send `n` messages and wait until all are
/// processed) once per state of [`COLLECTOR_PHASES`], with the proxy in front of
/// the collector set to that state; `spans` reads the telemetry's (ended,
/// exported) counts. Prints a line per phase and returns the reports.
pub async fn collector_fault_run<P, PF>(
    broker: &str,
    proxy: &Proxy,
    messages: usize,
    mut phase: P,
    spans: impl Fn() -> (u64, u64),
) -> Vec<PhaseReport>
where
    P: FnMut(usize, usize) -> PF,
    PF: std::future::Future<Output = ()>,
{
    let mut reports: Vec<PhaseReport> = Vec::new();
    for (i, (name, mode)) in COLLECTOR_PHASES.iter().enumerate() {
        proxy.set(*mode);
        let started = Instant::now();
        phase(i * messages, messages).await;
        let report = PhaseReport {
            name,
            messages,
            elapsed: started.elapsed(),
            spans_at_end: spans(),
        };
        let healthy = reports.first().unwrap_or(&report).throughput();
        let before = reports.last().map_or((0, 0), |r| r.spans_at_end);
        println!(
            "{broker} collector {name}: {messages} messages in {:.2?} ({:.0}/s, {:.2} of healthy); \
             spans ended {}, exported {} during the phase",
            report.elapsed,
            report.throughput(),
            report.throughput() / healthy,
            report.spans_at_end.0 - before.0,
            report.spans_at_end.1.saturating_sub(before.1),
        );
        reports.push(report);
    }
    reports
}

/// The deliveries of numbered messages a fault test's handler saw: every one, in
/// order, and a count of the distinct ids to wait on (a redelivery is no progress).
/// Recording is a set insertion, cheap enough for a timed handler.
#[derive(Debug, Default)]
pub struct Deliveries {
    seen: std::sync::Mutex<(Vec<usize>, std::collections::BTreeSet<usize>)>,
    distinct: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Deliveries {
    /// Records a delivery of `id`.
    pub fn record(&self, id: usize) {
        let (all, distinct) = &mut *self.lock();
        all.push(id);
        if distinct.insert(id) {
            self.distinct
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The number of distinct ids delivered so far, as a counter to wait on.
    pub fn distinct(&self) -> &std::sync::Arc<std::sync::atomic::AtomicUsize> {
        &self.distinct
    }

    /// Every delivery, in order.
    pub fn all(&self) -> Vec<usize> {
        self.lock().0.clone()
    }

    /// The run in the delivery checker's terms: `sent` as the messages sent
    /// (each its own order scope: these runs send side by side, so no order is
    /// claimed), every delivery recorded as a successful handler invocation.
    /// Add what is waiting or dead-lettered, then [`crate::delivery::Ledger::check`].
    pub fn ledger(&self, sent: std::ops::Range<usize>) -> crate::delivery::Ledger {
        ledger_of(sent, |id| id.to_string(), self.all())
    }

    /// How many of `ids` were never delivered.
    pub fn lost(&self, ids: std::ops::Range<usize>) -> usize {
        let seen = self.lock();
        ids.filter(|i| !seen.1.contains(i)).count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<usize>, std::collections::BTreeSet<usize>)> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What a kill test's child printed and recorded before it was killed.
#[derive(Debug)]
pub struct Killed {
    /// The id the child held on when it was killed.
    pub held: usize,
    /// Every id the child's handler did the work for, in order.
    pub done: Vec<usize>,
}

impl Killed {
    /// The run so far in the delivery checker's terms: the messages `sent`, each
    /// in the order scope `scope` gives it, and every id the killed child did
    /// the work for as a successful handler invocation (the work was done; its
    /// settlement is what the kill cut off). Record the next consumer's
    /// invocations on it, then what is waiting, then check.
    pub fn ledger(
        &self,
        sent: std::ops::Range<usize>,
        scope: impl Fn(usize) -> String,
    ) -> crate::delivery::Ledger {
        ledger_of(sent, scope, self.done.iter().copied())
    }
}

/// A ledger of numbered messages `sent`, each in the order scope `scope` gives
/// it, and each id in `handled` as a successful handler invocation.
fn ledger_of(
    sent: std::ops::Range<usize>,
    scope: impl Fn(usize) -> String,
    handled: impl IntoIterator<Item = usize>,
) -> crate::delivery::Ledger {
    let ledger = crate::delivery::Ledger::new();
    for id in sent {
        ledger.sent(id.to_string(), scope(id));
    }
    for id in handled {
        ledger.started(id.to_string()).finished(true);
    }
    ledger
}

/// The parent's side of a kill test: runs `test` as a child process with `role`
/// and `env`, plus [`KILL_FILE_ENV`] naming a fresh file; waits until the child
/// prints `HOLDING <id>` (see [`record_and_hold`]), kills it with SIGKILL, and
/// returns the held id and the ids the child recorded. Blocking: call it from
/// `spawn_blocking` in async tests.
pub fn run_and_kill_child(test: &str, role: &str, env: &[(&str, String)]) -> Killed {
    let file = std::env::temp_dir().join(format!("mqtrace-kill-{:016x}.txt", fastrand::u64(..)));
    let file_name = file.to_string_lossy().into_owned();
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.push((KILL_FILE_ENV, &file_name));
    let child = ChildProcess::spawn(test, role, &all);
    let held = child.wait_for("HOLDING ", Duration::from_secs(90));
    child.kill();
    let done: Vec<usize> = std::fs::read_to_string(&file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    let _ = std::fs::remove_file(&file);
    Killed {
        held: held
            .parse()
            .unwrap_or_else(|_| panic!("the child held on {held:?}, not an id")),
        done,
    }
}

/// Variable naming the file where a kill test's child records its work.
pub const KILL_FILE_ENV: &str = "MQTRACE_KILL_FILE";

/// The child's side of a kill test, in its handler after the work for `id`:
/// records `id` (synced), and for `hold_at` prints `HOLDING <id>` and never
/// returns, so that the parent kills the process before the message is settled.
pub async fn record_and_hold(id: usize, hold_at: usize) {
    let file = crate::brokers::env_or_explain(KILL_FILE_ENV, "The kill test's record file");
    if let Err(e) = append_synced(&file, &id.to_string()) {
        panic!("cannot record id {id} in {file}: {e}");
    }
    if id == hold_at {
        println!("HOLDING {id}");
        std::future::pending::<()>().await;
    }
}

/// Checks a collector-fault run: spans were lost to the outage and counted
/// (`not_exported`), export resumed once the collector was back (`exported` at the
/// end above what it was when the hanging phase ended), and no faulty phase fell
/// under half the healthy throughput. The last is a correctness bound, not a
/// performance target: an exporter that held up messages would cost a second-long
/// export timeout per batch.
pub fn check_collector_run(reports: &[PhaseReport], exported: u64, not_exported: u64) {
    assert!(not_exported > 0, "the outage cost spans, counted");
    let before_back = reports.get(2).map_or(0, |r| r.spans_at_end.1);
    assert!(
        exported > before_back,
        "export resumed when the collector came back"
    );
    let healthy = reports.first().map_or(0.0, PhaseReport::throughput);
    for r in reports.iter().skip(1) {
        assert!(
            r.throughput() > healthy * 0.5,
            "{} phase: {:.0}/s against {:.0}/s healthy",
            r.name,
            r.throughput(),
            healthy
        );
    }
}
