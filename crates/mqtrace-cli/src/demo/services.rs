//! The demo's services, whatever the broker: telemetry per service, the order
//! handler, the options and errors, the report. The broker runners
//! (`super::kafka`, `super::rabbit`, `super::sqs`, and the embedded one in
//! `super`) use them; this module uses none of them.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mqtrace::embedded::ConsumerStats;
use mqtrace::{HandlerError, HandlerResult, Instrumenter, Retryable};
use mqtrace_telemetry::{TelemetryBuilder, TelemetryGuard};
use mqtrace_testing::{
    Collector, CollectorConfig, Forest, Kind, MetricValue, RecordedMetric, RecordedSpan,
    TreeOptions,
};
use opentelemetry_sdk::trace::BatchConfigBuilder;
use serde::{Deserialize, Serialize};
use tracing::instrument::WithSubscriber as _;
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;

pub(crate) const QUEUE: &str = "orders";
pub(crate) const DEAD_LETTERS: &str = "orders.dlq";
/// Every order whose id is a multiple of this has a malformed payload: a permanent
/// failure that goes straight to the dead-letter queue.
const MALFORMED_EVERY: u64 = 7;

/// Options of `mqtrace demo`.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Orders to publish.
    #[arg(long, short = 'n', default_value_t = 12)]
    pub(crate) messages: u64,
    /// Chance that one attempt to charge a payment fails transiently (0 to 1).
    #[arg(long, default_value_t = 0.3)]
    pub(crate) fail_rate: f64,
    /// Seed of the failure dice: the same seed gives the same run.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Traces to print (0: all).
    #[arg(long, default_value_t = 6)]
    pub(crate) show: usize,
    /// Where to run: `embedded` (the in-process broker), a RabbitMQ URL
    /// (`amqp://user:pass@host:port/vhost`) or a Kafka bootstrap address
    /// (`kafka://host:port`), or SQS: `sqs://host:port` for an emulator (static test
    /// credentials), `sqs://` for AWS with the environment's region and
    /// credentials. On a real broker the demo creates its own queues or
    /// topics, named for the run, and deletes them afterwards.
    #[arg(long, default_value = "embedded")]
    pub(crate) broker: String,
    /// Leave durations out of the printed trees (for comparing runs).
    #[arg(long)]
    pub(crate) no_timings: bool,
    /// Also write every span to FILE as OTLP JSON lines, for `mqtrace view --load`
    /// and `mqtrace doctor`.
    #[arg(long, value_name = "FILE")]
    pub(crate) save: Option<std::path::PathBuf>,
}

impl From<mqtrace_rdkafka::ConsumeError> for DemoError {
    fn from(e: mqtrace_rdkafka::ConsumeError) -> Self {
        Self::KafkaConsumer(Box::new(e))
    }
}

impl From<mqtrace_aws_sqs::ConsumeError> for DemoError {
    fn from(e: mqtrace_aws_sqs::ConsumeError) -> Self {
        Self::SqsConsumer(Box::new(e))
    }
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DemoError {
    #[error("--fail-rate must be between 0 and 1, not {0}")]
    FailRate(f64),
    #[error(
        "broker {0:?} is not supported: use `embedded`, an `amqp://` URL, `kafka://host:port` or `sqs://host:port`"
    )]
    Broker(String),
    #[error("SQS: {0}")]
    Sqs(String),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("Kafka: cannot create topic {0}: {1}")]
    KafkaTopic(String, rdkafka::types::RDKafkaErrorCode),
    #[error("Kafka: no answer within {0:?}; is the broker up?")]
    KafkaTimeout(Duration),
    #[error("Kafka consumer: {0}")]
    KafkaConsumer(Box<mqtrace_rdkafka::ConsumeError>),
    #[error("SQS consumer: {0}")]
    SqsConsumer(Box<mqtrace_aws_sqs::ConsumeError>),
    #[error("RabbitMQ: {0}")]
    Rabbit(#[from] lapin::Error),
    #[error("RabbitMQ consumer: {0}")]
    RabbitConsumer(#[from] mqtrace_lapin::ConsumeError),
    #[error("RabbitMQ: no answer within {0:?}; is the broker up?")]
    RabbitTimeout(Duration),
    #[error("cannot start the in-process collector: {0}")]
    Collector(#[from] std::io::Error),
    #[error("telemetry: {0}")]
    Telemetry(#[from] mqtrace_telemetry::TelemetryError),
    #[error("broker: {0}")]
    Embedded(#[from] mqtrace::embedded::BrokerError),
    #[error("flush task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("{0}")]
    Capture(#[from] crate::receive::capture::CaptureError),
}

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    order_id: u64,
    amount_cents: u64,
}

fn service(name: &str, collector: &Collector) -> Result<TelemetryGuard, DemoError> {
    Ok(TelemetryBuilder::default()
        .service_name(name)
        .quiet_targets(mqtrace_lapin::CLIENT_TARGETS)
        .quiet_targets(mqtrace_rdkafka::CLIENT_TARGETS)
        .quiet_targets(mqtrace_aws_sqs::CLIENT_TARGETS)
        .endpoint(collector.grpc_endpoint())
        .install_global(false)
        .mirror_to_env_endpoint(true)
        .batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(65_536)
                .with_scheduled_delay(Duration::from_millis(200))
                .build(),
        )
        .build()?)
}

/// The two services of the demo, exporting to the in-process collector.
pub(crate) struct Services {
    collector: Collector,
    /// Writes the capture (`--save`) as trace requests arrive.
    saving: Option<tokio::task::JoinHandle<Result<(), crate::receive::capture::CaptureError>>>,
    producer: TelemetryGuard,
    worker: TelemetryGuard,
    /// The worker's `tracing` subscriber: handler spans nest under the process span.
    dispatch: tracing::Dispatch,
    bar: ProgressBar,
}

impl Services {
    pub(crate) async fn start(
        messages: u64,
        save: Option<&std::path::Path>,
    ) -> Result<Self, DemoError> {
        let (collector, saving) = match save {
            None => (Collector::start().await?, None),
            Some(path) => {
                let mut writer = crate::receive::capture::Writer::create(path)?;
                let (tap, mut requests) = tokio::sync::mpsc::channel(64);
                let collector =
                    Collector::start_with(CollectorConfig::default(), Some(tap)).await?;
                let saving = tokio::task::spawn_blocking(move || {
                    while let Some(request) = requests.blocking_recv() {
                        writer.write(&request)?;
                    }
                    Ok(())
                });
                (collector, Some(saving))
            }
        };
        let producer = service("order-producer", &collector)?;
        let worker = service("order-worker", &collector)?;
        let dispatch =
            tracing::Dispatch::new(tracing_subscriber::registry().with(worker.tracing_layer()));
        let bar = ProgressBar::new(messages);
        bar.set_style(
            ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Ok(Self {
            collector,
            saving,
            producer,
            worker,
            dispatch,
            bar,
        })
    }

    pub(crate) fn producer(&self) -> Instrumenter {
        instrumenter(&self.producer)
    }

    pub(crate) fn worker(&self) -> Instrumenter {
        instrumenter(&self.worker)
    }

    pub(crate) fn bar(&self) -> &ProgressBar {
        &self.bar
    }

    /// The worker's handler: parse, charge, reserve, under its `tracing` subscriber.
    pub(crate) fn handler(&self, args: &DemoArgs) -> OrderHandler {
        OrderHandler {
            dispatch: self.dispatch.clone(),
            fail_rate: args.fail_rate,
            seed: args.seed,
        }
    }

    /// The handler for a run on a real broker, whose worker gives up after
    /// `budget` attempts.
    pub(crate) fn finishing(&self, args: &DemoArgs, budget: u32) -> Finishing {
        Finishing {
            handler: self.handler(args),
            budget,
            done: Arc::new(AtomicU64::new(0)),
            bar: self.bar.clone(),
        }
    }

    /// Flushes both services and prints the trees and the summary.
    pub(crate) async fn report(
        self,
        args: &DemoArgs,
        stats: &ConsumerStats,
        dead: u64,
    ) -> Result<(), DemoError> {
        self.bar.finish_and_clear();
        let (producer, worker) = (self.producer, self.worker);
        // Blocking calls, off the async threads.
        tokio::task::spawn_blocking(move || {
            producer.shutdown();
            worker.shutdown();
        })
        .await?;
        print_report(
            args,
            &self.collector.spans(),
            &self.collector.metrics(),
            stats,
            dead,
        );
        // Stopping the collector ends the tap, and so the capture.
        drop(self.collector);
        if let Some(saving) = self.saving {
            saving.await??;
        }
        Ok(())
    }
}

/// The demo's handler, cheap to clone onto consumer tasks.
#[derive(Clone)]
pub(crate) struct OrderHandler {
    dispatch: tracing::Dispatch,
    fail_rate: f64,
    seed: u64,
}

impl OrderHandler {
    pub(crate) fn call(
        &self,
        body: Vec<u8>,
        attempt: u32,
    ) -> impl std::future::Future<Output = HandlerResult> + Send + 'static {
        handle_order(body, attempt, self.fail_rate, self.seed)
            .with_subscriber(self.dispatch.clone())
    }
}

/// The demo handler on a real broker, counting the orders that are done (settled,
/// or on their way to the dead letters) so the run stops when all of them are.
#[derive(Clone)]
pub(crate) struct Finishing {
    handler: OrderHandler,
    budget: u32,
    done: Arc<AtomicU64>,
    bar: ProgressBar,
}

impl Finishing {
    /// Handles one delivery of an order body at `attempt`.
    pub(crate) fn call(
        &self,
        body: Vec<u8>,
        attempt: u32,
    ) -> impl std::future::Future<Output = HandlerResult> + Send + 'static {
        let work = self.handler.call(body, attempt);
        let (done, bar, budget) = (Arc::clone(&self.done), self.bar.clone(), self.budget);
        async move {
            let outcome = work.await;
            let finished = match &outcome {
                Ok(()) => true,
                Err(e) => e.retryable() == Retryable::Permanent || attempt >= budget,
            };
            if finished {
                done.fetch_add(1, Ordering::SeqCst);
                bar.inc(1);
            }
            outcome
        }
    }

    /// Completes once `orders` orders are done.
    pub(crate) fn all_done(&self, orders: u64) -> impl std::future::Future<Output = ()> + 'static {
        let done = Arc::clone(&self.done);
        async move {
            while done.load(Ordering::SeqCst) < orders {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// The body of order `order_id`: every `MALFORMED_EVERY`th is cut short.
pub(crate) fn order_body(order_id: u64) -> Vec<u8> {
    if order_id.is_multiple_of(MALFORMED_EVERY) {
        format!("{{\"order_id\": {order_id}, \"amount_cents\": ").into_bytes()
    } else {
        serde_json::to_vec(&Order {
            order_id,
            amount_cents: 1_000 + order_id * 37 % 9_000,
        })
        .unwrap_or_default()
    }
}

fn instrumenter(telemetry: &TelemetryGuard) -> Instrumenter {
    // With OTEL_SDK_DISABLED, spans and metrics go nowhere; the pipeline still runs.
    telemetry.instrumenter().build()
}

/// Parse, then charge (which may fail transiently), then reserve stock.
async fn handle_order(body: Vec<u8>, attempt: u32, fail_rate: f64, seed: u64) -> HandlerResult {
    let order = validate(&body)?;
    charge(&order, attempt, fail_rate, seed)
        .instrument(tracing::info_span!(
            "charge payment",
            order_id = order.order_id,
            attempt
        ))
        .await?;
    async { tokio::task::yield_now().await }
        .instrument(tracing::info_span!(
            "reserve stock",
            order_id = order.order_id
        ))
        .await;
    Ok(())
}

#[tracing::instrument(name = "validate order", skip_all)]
fn validate(body: &[u8]) -> Result<Order, HandlerError> {
    serde_json::from_slice(body).map_err(|e| HandlerError::permanent(e).with_type("invalid_order"))
}

#[derive(Debug, thiserror::Error)]
#[error("payment service timed out")]
struct PaymentTimeout;

async fn charge(order: &Order, attempt: u32, fail_rate: f64, seed: u64) -> HandlerResult {
    tokio::task::yield_now().await;
    // One die per order and attempt: the same seed replays the same run.
    let mut dice = fastrand::Rng::with_seed(seed ^ (order.order_id << 8) ^ u64::from(attempt));
    if dice.f64() < fail_rate {
        return Err(HandlerError::transient(PaymentTimeout).with_type("payment_timeout"));
    }
    Ok(())
}

/// A trace is complete when it starts at the producer's `send` span, no span's
/// parent is missing, and the message was processed in it.
fn complete(trace: &[RecordedSpan]) -> bool {
    let ids: Vec<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
    let roots: Vec<&RecordedSpan> = trace
        .iter()
        .filter(|s| {
            s.parent_span_id
                .as_deref()
                .is_none_or(|p| !ids.contains(&p))
        })
        .collect();
    roots.len() == 1
        && roots[0].kind == Kind::Producer
        && roots[0].parent_span_id.is_none()
        && trace.iter().any(|s| s.kind == Kind::Consumer)
}

fn print_report(
    args: &DemoArgs,
    spans: &[RecordedSpan],
    metrics: &[RecordedMetric],
    stats: &ConsumerStats,
    dead: u64,
) {
    let forest = Forest::new(spans.to_vec());
    let options = TreeOptions {
        only: Some(
            [
                "messaging.message.id",
                "mqtrace.message.attempt",
                "mqtrace.message.disposition",
                "error.type",
            ]
            .map(str::to_owned)
            .to_vec(),
        ),
        services: true,
        durations: !args.no_timings,
        ..TreeOptions::default()
    };
    let traces = forest.traces();
    let shown = if args.show == 0 {
        traces.len()
    } else {
        args.show.min(traces.len())
    };
    let mut out = std::io::stdout().lock();
    // Show the traces with a story first: failures, then the rest in order.
    let mut order: Vec<usize> = (0..traces.len()).collect();
    order.sort_by_key(|&i| {
        !traces[i]
            .iter()
            .any(|s| s.kind == Kind::Producer && s.parent_span_id.is_some())
    });
    for &i in order.iter().take(shown) {
        let _ = writeln!(out, "{}", forest.render_trace(i, &options));
    }
    if shown < traces.len() {
        let _ = writeln!(
            out,
            "({} more traces not shown; --show 0 prints all)\n",
            traces.len() - shown
        );
    }
    let _ = write!(out, "{}", metrics_summary(metrics, !args.no_timings));
    let complete = traces.iter().filter(|t| complete(t)).count();
    let _ = writeln!(
        out,
        "sent {} · processed {} · retried {} · dead-lettered {} · traces {} · complete {}",
        args.messages,
        stats.settled,
        stats.retried,
        dead,
        traces.len(),
        complete
    );
}

/// What one destination's metrics say, summed over their streams.
#[derive(Default)]
struct DestinationMetrics {
    sent: f64,
    consumed: f64,
    /// Process durations: bucket bounds and counts, merged.
    process: Option<(Vec<f64>, Vec<u64>)>,
    lag: Option<f64>,
}

/// One line per destination: messages sent and consumed, process time p50 / p99
/// (the upper bound of the bucket holding it; left out with `timings` off, as they
/// vary run to run) and the consumer lag where the broker reports one.
fn metrics_summary(metrics: &[RecordedMetric], timings: bool) -> String {
    use std::collections::BTreeMap;
    let mut by: BTreeMap<String, DestinationMetrics> = BTreeMap::new();
    for m in metrics {
        let Some(dest) = m
            .attributes
            .get("messaging.destination.name")
            .and_then(|v| v.as_str())
        else {
            continue;
        };
        let entry = by.entry(dest.to_owned()).or_default();
        match (m.name.as_str(), &m.value) {
            ("messaging.client.sent.messages", MetricValue::Number(n)) => entry.sent += n,
            ("messaging.client.consumed.messages", MetricValue::Number(n)) => entry.consumed += n,
            (mqtrace_rdkafka::CONSUMER_LAG, MetricValue::Number(n)) => entry.lag = Some(*n),
            (
                "messaging.process.duration",
                MetricValue::Histogram {
                    bounds, buckets, ..
                },
            ) => match &mut entry.process {
                Some((_, counts)) if counts.len() == buckets.len() => {
                    for (c, b) in counts.iter_mut().zip(buckets) {
                        *c += b;
                    }
                }
                _ => entry.process = Some((bounds.clone(), buckets.clone())),
            },
            _ => {}
        }
    }
    if by.is_empty() {
        return String::new();
    }
    let mut out = String::from("metrics by destination\n");
    for (dest, m) in &by {
        let mut line = format!("  {dest}: sent {} · consumed {}", m.sent, m.consumed);
        if let (true, Some((bounds, counts))) = (timings, &m.process) {
            line.push_str(&format!(
                " · process p50 {} / p99 {}",
                quantile(bounds, counts, 0.5),
                quantile(bounds, counts, 0.99)
            ));
        }
        if let Some(lag) = m.lag {
            line.push_str(&format!(" · lag {lag}"));
        }
        out.push_str(&line);
        out.push('\n');
    }
    out.push('\n');
    out
}

/// The upper bound of the bucket holding quantile `q`, in milliseconds.
fn quantile(bounds: &[f64], counts: &[u64], q: f64) -> String {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return "-".to_owned();
    }
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return match bounds.get(i) {
                Some(b) => format!("≤ {} ms", b * 1000.0),
                None => format!("> {} ms", bounds.last().copied().unwrap_or(0.0) * 1000.0),
            };
        }
    }
    "-".to_owned()
}

#[cfg(test)]
mod metric_tests {
    use super::quantile;

    #[test]
    fn quantiles_are_bucket_upper_bounds() {
        let bounds = [0.005, 0.01, 0.025];
        assert_eq!(quantile(&bounds, &[6, 3, 1, 0], 0.5), "≤ 5 ms");
        assert_eq!(quantile(&bounds, &[6, 3, 1, 0], 0.99), "≤ 25 ms");
        assert_eq!(quantile(&bounds, &[0, 0, 0, 2], 0.5), "> 25 ms");
        assert_eq!(quantile(&bounds, &[0, 0, 0, 0], 0.5), "-");
    }
}
