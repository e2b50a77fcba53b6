//! Shared set-up: collector, telemetry, a RabbitMQ connection, unique names.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicGetOptions, ConfirmSelectOptions};
use lapin::{Channel, Connection, ConnectionProperties};
use mqtrace::{Instrumenter, InstrumenterBuilder};
use mqtrace_telemetry::{TelemetryBuilder, TelemetryGuard};
use mqtrace_testing::{brokers, Forest, RecordedSpan, TreeOptions};
use opentelemetry_sdk::trace::BatchConfigBuilder;

pub use mqtrace_testing::assert_tree;

pub struct Harness {
    pub collector: mqtrace_testing::Collector,
    pub guard: TelemetryGuard,
    pub url: String,
    /// Distinguishes this test's queues and exchanges from every other's.
    pub run: String,
    /// This test's turn on the machine (`mqtrace_testing::turns`).
    _turn: mqtrace_testing::turns::Turn,
}

impl Harness {
    pub async fn start() -> Self {
        Self::started(mqtrace_testing::turns::Turn::shared().await).await
    }

    /// For a test that judges time: it runs with no other test of the binary.
    pub async fn start_alone() -> Self {
        Self::started(mqtrace_testing::turns::Turn::alone().await).await
    }

    async fn started(turn: mqtrace_testing::turns::Turn) -> Self {
        let url = brokers::rabbitmq_url();
        let collector = mqtrace_testing::Collector::start().await.unwrap();
        let guard = TelemetryBuilder::default()
            .service_name("mqtrace-lapin-test")
            .endpoint(collector.grpc_endpoint())
            .install_global(false)
            .batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(Duration::from_millis(50))
                    .build(),
            )
            .build()
            .unwrap();
        let run = format!("{:08x}", fastrand::u32(..));
        Self {
            collector,
            guard,
            url,
            run,
            _turn: turn,
        }
    }

    /// A name unique to this test run.
    pub fn name(&self, base: &str) -> String {
        format!("{base}-{}", self.run)
    }

    pub fn instrumenter(
        &self,
        configure: impl FnOnce(InstrumenterBuilder) -> InstrumenterBuilder,
    ) -> Instrumenter {
        configure(self.guard.instrumenter()).build()
    }

    /// Flushes the metrics and renders the streams of `names` (see
    /// `RecordedMetric::render`), leaving out the attributes in `hide`; this run's
    /// suffix shown as `RUN`.
    pub async fn metrics(&self, names: &[&str], hide: &[&str]) -> String {
        let provider = self.guard.meter_provider().expect("telemetry enabled");
        self.collector
            .flushed_metrics_of_run(provider, names, hide, &self.run)
            .await
    }

    /// A channel in confirm mode.
    pub async fn channel(&self) -> (Connection, Channel) {
        let connection = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        (connection, channel)
    }

    /// Flushes and waits for exactly `count` spans.
    pub async fn spans(&self, count: usize) -> Vec<RecordedSpan> {
        self.collector
            .exactly(self.guard.provider().unwrap(), count)
            .await
    }

    /// The exported trees, this run's suffix shown as `RUN` and the port masked.
    pub async fn render(&self, count: usize, options: TreeOptions) -> String {
        Forest::new(self.spans(count).await)
            .render(&options)
            .replace(&self.run, "RUN")
    }
}

/// Tree options for these tests: the broker's port varies with the machine.
pub fn normalised() -> TreeOptions {
    let mut o = TreeOptions::normalised();
    o.mask.push("server.port".into());
    o
}

/// Every message waiting in a queue, taken off it (acked).
pub async fn drain(channel: &Channel, queue: &str) -> Vec<lapin::message::Delivery> {
    let mut out = Vec::new();
    while let Some(m) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        out.push(m.delivery);
    }
    out
}

/// Takes at least `n` messages from `queue`, waiting up to 10 s for them (a
/// dead-letter exchange routes a rejected message asynchronously), then whatever
/// else is there.
pub async fn drain_at_least(
    channel: &Channel,
    queue: &str,
    n: usize,
) -> Vec<lapin::message::Delivery> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        out.extend(drain(channel, queue).await);
        if out.len() >= n || tokio::time::Instant::now() >= deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Completes once `counter` reaches `n`.
pub fn when_count(counter: &Arc<AtomicUsize>, n: usize) -> impl Future<Output = ()> + use<> {
    let counter = Arc::clone(counter);
    async move {
        while counter.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Fails the test when `f` takes longer than `secs`.
pub async fn within<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("did not finish within {secs} s"))
}

/// Publishes the bodies `0`, `1`, … `n - 1` to `queue` through the default
/// exchange, traced and confirmed one at a time.
pub async fn publish_numbered(
    channel: &Channel,
    instrumenter: &Instrumenter,
    queue: &str,
    n: usize,
) {
    let publisher = mqtrace_lapin::TracedPublisher::new(channel.clone(), instrumenter.clone());
    for i in 0..n {
        publisher
            .publish(
                "".into(),
                queue.into(),
                lapin::options::BasicPublishOptions::default(),
                i.to_string().as_bytes(),
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap();
    }
}

/// The number a `publish_numbered` body carries (1 for anything else).
pub fn number_of(body: &[u8]) -> u64 {
    std::str::from_utf8(body)
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(1)
}

/// The bodies of at least `n` messages drained from `queue`, in number order.
pub async fn drain_numbers(channel: &Channel, queue: &str, n: usize) -> Vec<String> {
    let mut bodies: Vec<String> = drain_at_least(channel, queue, n)
        .await
        .iter()
        .map(|d| String::from_utf8_lossy(&d.data).into_owned())
        .collect();
    bodies.sort_by_key(|d| d.parse::<u64>().unwrap_or(u64::MAX));
    bodies
}
