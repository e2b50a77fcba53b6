//! Shared set-up: collector, telemetry, Kafka clients, topics unique to a test.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mqtrace::{Instrumenter, InstrumenterBuilder};
use mqtrace_rdkafka::{TracedConsumer, TracedProducer};
use mqtrace_telemetry::{TelemetryBuilder, TelemetryGuard};
use mqtrace_testing::{brokers, Forest, RecordedSpan, TreeOptions};
use opentelemetry_sdk::trace::BatchConfigBuilder;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use rdkafka::ClientConfig;

pub use mqtrace_testing::assert_tree;

pub struct Harness {
    pub collector: mqtrace_testing::Collector,
    pub guard: TelemetryGuard,
    pub bootstrap: String,
    /// Distinguishes this test's topics and group from every other's.
    pub run: String,
    /// This test's turn on the machine (`mqtrace_testing::turns`).
    _turn: mqtrace_testing::turns::Turn,
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_at(brokers::kafka_bootstrap()).await
    }

    /// For a test that judges time: it runs with no other test of the binary.
    pub async fn start_alone() -> Self {
        Self::started(
            brokers::kafka_bootstrap(),
            mqtrace_testing::turns::Turn::alone().await,
        )
        .await
    }

    /// Against the broker at `bootstrap` (a test's own broker).
    pub async fn start_at(bootstrap: String) -> Self {
        Self::started(bootstrap, mqtrace_testing::turns::Turn::shared().await).await
    }

    async fn started(bootstrap: String, turn: mqtrace_testing::turns::Turn) -> Self {
        let collector = mqtrace_testing::Collector::start().await.unwrap();
        let guard = TelemetryBuilder::default()
            .service_name("mqtrace-rdkafka-test")
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
            bootstrap,
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

    /// The lifecycle's metrics, without the lag gauge (whose presence depends on
    /// when librdkafka's statistics arrive).
    pub const LIFECYCLE_METRICS: &'static [&'static str] = &[
        "messaging.client.consumed.messages",
        "messaging.client.operation.duration",
        "messaging.client.sent.messages",
        "messaging.process.duration",
        "mqtrace.message.dispositions",
        "mqtrace.message.queue.duration",
    ];

    /// Flushes the metrics and renders the streams of `names` (see
    /// `RecordedMetric::render`), leaving out the attributes in `hide`; this run's
    /// suffix shown as `RUN`.
    pub async fn metrics(&self, names: &[&str], hide: &[&str]) -> String {
        let provider = self.guard.meter_provider().expect("telemetry enabled");
        self.collector
            .flushed_metrics_of_run(provider, names, hide, &self.run)
            .await
    }

    pub fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap)
            .set("client.id", "mqtrace-test")
            .set("message.timeout.ms", "10000");
        c
    }

    /// Consumer settings: this run's group, from the earliest offset.
    pub fn consumer_config(&self) -> ClientConfig {
        let mut c = self.config();
        c.set("group.id", self.name("group"))
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500");
        c
    }

    /// Creates topics of one partition each (the broker does not auto-create).
    pub async fn topics(&self, names: &[&str]) {
        let admin: AdminClient<DefaultClientContext> = self.config().create().unwrap();
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| NewTopic::new(n, 1, TopicReplication::Fixed(1)))
            .collect();
        let results = admin
            .create_topics(&topics, &AdminOptions::new())
            .await
            .unwrap();
        for r in results {
            r.unwrap();
        }
    }

    /// Creates a topic of `partitions` partitions.
    pub async fn partitioned_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = self.config().create().unwrap();
        let results = admin
            .create_topics(
                &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await
            .unwrap();
        for r in results {
            r.unwrap();
        }
    }

    pub fn producer(&self, instrumenter: &Instrumenter) -> TracedProducer {
        TracedProducer::from_config(&self.config(), instrumenter.clone()).unwrap()
    }

    pub fn consumer(&self, topics: &[&str], instrumenter: &Instrumenter) -> TracedConsumer {
        self.consumer_with(&self.consumer_config(), topics, instrumenter)
    }

    /// A full consumer made from `config`, forwarding with this run's producer.
    pub fn consumer_with(
        &self,
        config: &ClientConfig,
        topics: &[&str],
        instrumenter: &Instrumenter,
    ) -> TracedConsumer {
        TracedConsumer::from_config(
            config,
            topics,
            self.producer(instrumenter),
            instrumenter.clone(),
        )
        .unwrap()
    }

    /// Flushes and waits for exactly `count` spans.
    pub async fn spans(&self, count: usize) -> Vec<RecordedSpan> {
        self.collector
            .exactly(self.guard.provider().unwrap(), count)
            .await
    }

    /// The exported trees, this run's suffix shown as `RUN`.
    pub async fn render(&self, count: usize, options: TreeOptions) -> String {
        Forest::new(self.spans(count).await)
            .render(&options)
            .replace(&self.run, "RUN")
    }
}

/// Tree options for these tests: values that vary with the machine or with
/// timing are masked or left out.
pub fn normalised() -> TreeOptions {
    let mut o = TreeOptions::normalised();
    o.mask.push("server.port".into());
    // Present only once librdkafka's statistics have arrived: its own test.
    o.hide.push(mqtrace_rdkafka::CONSUMER_LAG.into());
    o
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

/// Sends the records `0`, `1`, … `n - 1` (their number as text) to `topic`, each
/// awaited to its delivery report.
pub async fn send_numbered(producer: &TracedProducer, topic: &str, n: usize) {
    for i in 0..n {
        producer
            .send(
                FutureRecord::<str, str>::to(topic).payload(&i.to_string()),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
}

/// The group's committed offset on the topic's one partition. (tansu's reported
/// high watermark is not reliable enough to count against; the records are numbered
/// from offset 0, so the committed offset is the count of settled records.)
pub async fn committed_offset(h: &Harness, topic: &str) -> i64 {
    committed_offset_of(h, topic, 0).await
}

/// The group's committed offset on one partition of the topic (librdkafka's
/// `OFFSET_INVALID`, -1001, when there is none).
pub async fn committed_offset_of(h: &Harness, topic: &str, partition: i32) -> i64 {
    let consumer: StreamConsumer = h.consumer_config().create().unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    committed
        .find_partition(topic, partition)
        .and_then(|p| p.offset().to_raw())
        .unwrap_or(0)
}

/// Checks the consumer lag on the process spans of five records at offsets 0 to
/// 4: present once librdkafka's statistics have arrived (the first record waits
/// long enough for that), and always the records left behind each one.
pub fn assert_lag_of_five(spans: &[RecordedSpan]) {
    let mut lags: Vec<(i64, i64)> = spans
        .iter()
        .filter(|s| s.name.starts_with("process"))
        .filter_map(|s| {
            let offset = s.attr(mqtrace::conventions::attr::KAFKA_OFFSET)?.as_i64()?;
            let lag = s.attr(mqtrace_rdkafka::CONSUMER_LAG)?.as_i64()?;
            Some((offset, lag))
        })
        .collect();
    lags.sort_unstable();
    assert!(lags.len() >= 2, "{lags:?}");
    assert!(
        lags.iter().all(|&(offset, lag)| lag == 4 - offset),
        "{lags:?}"
    );
    assert_eq!(lags.last(), Some(&(4, 0)));
}
