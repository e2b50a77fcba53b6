//! Shared set-up: collector, telemetry, an SQS client on the emulator, queues
//! unique to a test.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::types::QueueAttributeName;
use aws_sdk_sqs::Client;
use mqtrace::{Instrumenter, InstrumenterBuilder};
use mqtrace_telemetry::{TelemetryBuilder, TelemetryGuard};
use mqtrace_testing::{brokers, Forest, RecordedSpan, TreeOptions};
use opentelemetry_sdk::trace::BatchConfigBuilder;

pub use mqtrace_testing::assert_tree;

pub struct Harness {
    pub collector: mqtrace_testing::Collector,
    pub guard: TelemetryGuard,
    pub client: Client,
    /// Distinguishes this test's queues from every other's.
    pub run: String,
    /// This test's turn on the machine (`mqtrace_testing::turns`).
    _turn: mqtrace_testing::turns::Turn,
}

/// A client for the emulator: any region, static test credentials.
pub fn client(endpoint: &str) -> Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new(
            "test",
            "test",
            None,
            None,
            "mqtrace-tests",
        ))
        .build();
    Client::from_conf(config)
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
        let endpoint = brokers::sqs_endpoint();
        let collector = mqtrace_testing::Collector::start().await.unwrap();
        let guard = TelemetryBuilder::default()
            .service_name("mqtrace-sqs-test")
            .endpoint(collector.grpc_endpoint())
            .install_global(false)
            .batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(Duration::from_millis(50))
                    .build(),
            )
            .build()
            .unwrap();
        Self {
            collector,
            guard,
            client: client(&endpoint),
            run: format!("{:08x}", fastrand::u32(..)),
            _turn: turn,
        }
    }

    /// A name unique to this run; FIFO names keep their `.fifo` suffix last.
    pub fn name(&self, base: &str) -> String {
        match base.strip_suffix(".fifo") {
            Some(stem) => format!("{stem}-{}.fifo", self.run),
            None => format!("{base}-{}", self.run),
        }
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

    /// Creates a queue (name unique to this run) and returns its URL.
    pub async fn queue(&self, base: &str, attributes: &[(QueueAttributeName, String)]) -> String {
        let mut request = self.client.create_queue().queue_name(self.name(base));
        for (k, v) in attributes {
            request = request.attributes(k.clone(), v.clone());
        }
        request.send().await.unwrap().queue_url.unwrap()
    }

    /// Every message left on a queue (received with a short wait, then deleted).
    /// Sends the bodies `0`, `1`, … `n - 1` to the queue, traced, one at a time.
    pub async fn send_numbered(&self, url: &str, n: usize, instrumenter: &Instrumenter) {
        let sqs = mqtrace_aws_sqs::TracedSqs::new(self.client.clone(), instrumenter.clone());
        for i in 0..n {
            sqs.send(
                self.client
                    .send_message()
                    .queue_url(url)
                    .message_body(i.to_string()),
            )
            .await
            .unwrap();
        }
    }

    /// One receive of up to ten messages, every attribute, waiting up to 1 s.
    pub async fn receive(&self, url: &str) -> Vec<aws_sdk_sqs::types::Message> {
        self.client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
            .send()
            .await
            .unwrap()
            .messages
            .unwrap_or_default()
    }

    pub async fn drain(&self, url: &str) -> Vec<aws_sdk_sqs::types::Message> {
        let mut out = Vec::new();
        loop {
            let got = self.receive(url).await;
            if got.is_empty() {
                return out;
            }
            for m in &got {
                self.client
                    .delete_message()
                    .queue_url(url)
                    .receipt_handle(m.receipt_handle().unwrap())
                    .send()
                    .await
                    .unwrap();
            }
            out.extend(got);
        }
    }

    pub async fn spans(&self, count: usize) -> Vec<RecordedSpan> {
        self.collector
            .exactly(self.guard.provider().unwrap(), count)
            .await
    }

    /// The trees, this run's suffix as `RUN` and the message ids on links as `*`
    /// (SQS makes them up).
    pub async fn render(&self, count: usize, options: TreeOptions) -> String {
        let text = Forest::new(self.spans(count).await)
            .render(&options)
            .replace(&self.run, "RUN");
        text.lines()
            .map(|line| match line.split_once(r#"messaging.message.id=""#) {
                Some((head, tail)) if line.trim_start().starts_with("~>") => {
                    let rest = tail.split_once('"').map_or("", |(_, r)| r);
                    format!("{head}messaging.message.id=*{rest}\n")
                }
                _ => format!("{line}\n"),
            })
            .collect()
    }
}

/// Tree options for these tests: values that vary per run are masked.
pub fn normalised() -> TreeOptions {
    let mut o = TreeOptions::normalised();
    o.mask
        .extend(["server.port", "messaging.message.id", "aws.sqs.queue.url"].map(str::to_owned));
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
