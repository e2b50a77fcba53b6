//! What a service pays, measured as services run: this process is the service (one
//! broker, one role, one variant), the collector is another process
//! (`mqtrace view`), and the process reports its own CPU (user and system, every
//! thread's, from `getrusage`) and wall time over the measured part as one JSON
//! line. `scripts/service-cost.sh` runs every combination in interleaved
//! rounds and writes the tables into `docs/benchmarks.md`.
//!
//! Roles: `produce` (at full speed, 500 in flight, each awaited to its broker
//! acknowledgement: delivery report or publisher confirm), `consume` (records or
//! deliveries already waiting, empty handler; the raw loops commit or ack each one,
//! as hand-written loops do; traced, each runs mqtrace's `TracedConsumer`, which
//! on Kafka commits stored offsets every 200 ms and on RabbitMQ coalesces acks
//! into `multiple` ones) and
//! `worker` (the same with a 50 µs busy handler). Variants: `raw` (the plain
//! client), `unsampled` (mqtrace, every span unsampled: built, never exported) and
//! `exported` (mqtrace exporting every span over OTLP/gRPC to `--endpoint`);
//! `by-hand` (Kafka producer only) writes the same send spans by hand with the
//! OpenTelemetry API and the SDK's W3C propagator over the same export. The
//! exported variant's CPU includes the final flush; its wall time stops at the
//! last message. CPU counts every thread (the client's, the runtime's,
//! librdkafka's, the exporter's), from the first message (for consumers: the first
//! record or delivery received) to the end.
//!
//! SQS (the local emulator) runs the same roles: the raw consumer receives ten at
//! a time and deletes each message; the traced one is mqtrace's `TracedConsumer`,
//! which deletes a receive's messages with one `DeleteMessageBatch`.
//!
//! ```text
//! service_cost kafka produce exported --messages 20000 --endpoint http://127.0.0.1:4317
//! ```
//!
//! Needs the test brokers' variables (`source .mqtrace-test/env`).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use futures_util::StreamExt as _;
use mqtrace::{HandlerResult, Instrumenter};
use mqtrace_telemetry::{TelemetryBuilder, TelemetryGuard};
use nix::sys::resource::{getrusage, UsageWho};
use opentelemetry_sdk::trace::Sampler;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Broker {
    Kafka,
    Rabbitmq,
    Sqs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    Produce,
    Consume,
    Worker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Variant {
    Raw,
    Unsampled,
    Exported,
    /// Kafka producer only: the send spans mqtrace makes, written by hand with the
    /// OpenTelemetry API over the same set-up and export as `exported`.
    ByHand,
}

#[derive(Debug, Parser)]
struct Args {
    broker: Broker,
    role: Role,
    variant: Variant,
    /// Messages in the measured part.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// The collector's OTLP/gRPC endpoint (the exported variant).
    #[arg(long, default_value = "http://127.0.0.1:4317")]
    endpoint: String,
    /// Export through the SDK's OTLP exporter instead of mqtrace's direct
    /// encoding (`TelemetryBuilder::direct_encoding(false)`).
    #[arg(long)]
    sdk_exporter: bool,
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

const IN_FLIGHT: usize = 500;
const HANDLER: Duration = Duration::from_micros(50);

/// This process's CPU time so far, user and system: every thread's, those that
/// ended included (`getrusage`), in microseconds.
fn cpu() -> (Duration, Duration) {
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(usage) => (time(usage.user_time()), time(usage.system_time())),
        Err(_) => (Duration::ZERO, Duration::ZERO),
    }
}

fn time(t: nix::sys::time::TimeVal) -> Duration {
    let micros = t.tv_sec() * 1_000_000 + t.tv_usec();
    Duration::from_micros(u64::try_from(micros).unwrap_or(0))
}

/// The measured part of a run.
struct Measure {
    started: Instant,
    cpu: (Duration, Duration),
    wall: Option<Duration>,
}

impl Measure {
    fn start() -> Result<Self, Failure> {
        Ok(Self {
            started: Instant::now(),
            cpu: cpu(),
            wall: None,
        })
    }

    /// The last message is done: the wall time stops here.
    fn last_message(&mut self) {
        self.wall = Some(self.started.elapsed());
    }

    fn report(self, args: &Args) -> Result<(), Failure> {
        let (user, sys) = cpu();
        let (user, sys) = (
            user.saturating_sub(self.cpu.0),
            sys.saturating_sub(self.cpu.1),
        );
        let wall = self.wall.unwrap_or_else(|| self.started.elapsed());
        println!(
            "{}",
            serde_json::json!({
                "broker": format!("{:?}", args.broker).to_lowercase(),
                "role": format!("{:?}", args.role).to_lowercase(),
                "variant": format!("{:?}", args.variant).to_lowercase(),
                "messages": args.messages,
                "wall_s": wall.as_secs_f64(),
                "cpu_s": (user + sys).as_secs_f64(),
                "sys_s": sys.as_secs_f64(),
            })
        );
        Ok(())
    }
}

fn telemetry(args: &Args) -> Result<Option<(TelemetryGuard, Instrumenter)>, Failure> {
    if args.variant == Variant::Raw {
        return Ok(None);
    }
    let mut builder = TelemetryBuilder::default()
        .service_name("service-cost")
        .endpoint(&args.endpoint)
        .install_global(false)
        .metrics(false)
        .direct_encoding(!args.sdk_exporter);
    if args.variant == Variant::Unsampled {
        builder = builder.sampler(Sampler::AlwaysOff);
    }
    let guard = builder.build()?;
    let instrumenter = guard.instrumenter().metrics(false).build();
    Ok(Some((guard, instrumenter)))
}

/// Runs `send` `n` times, `IN_FLIGHT` at a time, and reports the failures.
async fn in_flight<F, Fut, E>(n: usize, send: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    futures_util::stream::iter(0..n)
        .map(|_| send())
        .buffer_unordered(IN_FLIGHT)
        .for_each(|sent| async move {
            if let Err(e) = sent {
                eprintln!("send failed: {e}");
            }
        })
        .await;
}

/// The handler: nothing, or 50 µs of work.
async fn handle(role: Role) -> HandlerResult {
    if role == Role::Worker {
        let until = Instant::now() + HANDLER;
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    }
    Ok(())
}

/// A full consumer's handler that counts: the clock starts at the first message
/// handled and its wall time stops at the `n`-th, when `all_done` completes.
#[derive(Clone)]
struct Clocked {
    n: usize,
    handled: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    measure: std::sync::Arc<std::sync::Mutex<Option<Measure>>>,
}

impl Clocked {
    fn new(n: usize) -> Self {
        Self {
            n,
            handled: std::sync::Arc::default(),
            measure: std::sync::Arc::default(),
        }
    }

    async fn handle(&self, role: Role) -> HandlerResult {
        use std::sync::atomic::Ordering;
        if let Ok(mut m) = self.measure.lock() {
            if m.is_none() {
                *m = Measure::start().ok();
            }
        }
        let result = handle(role).await;
        if self.handled.fetch_add(1, Ordering::Relaxed) + 1 == self.n {
            if let Ok(mut m) = self.measure.lock() {
                if let Some(m) = m.as_mut() {
                    m.last_message();
                }
            }
        }
        result
    }

    fn all_done(&self) -> impl std::future::Future<Output = ()> + use<> {
        let (handled, n) = (std::sync::Arc::clone(&self.handled), self.n);
        async move {
            while handled.load(std::sync::atomic::Ordering::Relaxed) < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    fn take(&self) -> Result<Measure, Failure> {
        Ok(self
            .measure
            .lock()
            .map_err(|_| "poisoned")?
            .take()
            .ok_or("no message handled")?)
    }
}

fn run_name(args: &Args) -> String {
    format!(
        "mqtrace-cost-{:?}-{:?}-{}-{}",
        args.role,
        args.variant,
        std::process::id(),
        fastrand::u32(..)
    )
    .to_lowercase()
}

fn env(name: &str) -> Result<String, Failure> {
    std::env::var(name).map_err(|_| {
        format!("{name} is not set: scripts/brokers.sh start, then source .mqtrace-test/env").into()
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Failure> {
    let args = Args::parse();
    if args.variant == Variant::ByHand
        && !matches!((args.broker, args.role), (Broker::Kafka, Role::Produce))
    {
        return Err("the by-hand variant is the Kafka producer's only".into());
    }
    let traced = telemetry(&args)?;
    let measure = match args.broker {
        Broker::Kafka if args.variant == Variant::ByHand => {
            let provider = traced
                .as_ref()
                .and_then(|(guard, _)| guard.provider())
                .ok_or("telemetry is off")?;
            kafka::by_hand(&args, provider).await?
        }
        Broker::Kafka => kafka::run(&args, traced.as_ref().map(|(_, i)| i)).await?,
        Broker::Rabbitmq => rabbit::run(&args, traced.as_ref().map(|(_, i)| i)).await?,
        Broker::Sqs => sqs::run(&args, traced.as_ref().map(|(_, i)| i)).await?,
    };
    if let Some((guard, _)) = traced {
        let stats = tokio::task::spawn_blocking(move || guard.shutdown()).await?;
        if matches!(args.variant, Variant::Exported | Variant::ByHand) && stats.not_exported() > 0 {
            return Err(format!("{} spans not exported", stats.not_exported()).into());
        }
    }
    measure.report(&args)
}

mod kafka {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::ClientConfig;

    use super::in_flight;
    use super::{env, handle, run_name, Args, Clocked, Failure, Instrumenter, Measure, Role};

    use mqtrace_rdkafka::{FutureProducerExt as _, TracedConsumer, TracedProducer};

    const BODY: &[u8] = &[b'x'; 100];

    /// `n` records, `IN_FLIGHT` at a time, each awaited to its delivery report.
    async fn send(producer: &FutureProducer, topic: &str, n: usize, traced: Option<&Instrumenter>) {
        in_flight(n, || async move {
            let record = FutureRecord::<(), [u8]>::to(topic).payload(BODY);
            let sent = match traced {
                Some(i) => producer.send_traced(i, record, None).await,
                None => producer.send(record, None).await,
            };
            sent.map(|_| ()).map_err(|(e, _)| e)
        })
        .await;
    }

    /// The client configuration, a new one-partition topic for this run, and a
    /// producer.
    async fn set_up(args: &Args) -> Result<(ClientConfig, String, FutureProducer), Failure> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", env("MQTRACE_TEST_KAFKA_BOOTSTRAP")?)
            .set("message.timeout.ms", "30000")
            .set("linger.ms", "5");
        let topic = run_name(args);
        let admin: AdminClient<DefaultClientContext> = config.create()?;
        let new = NewTopic::new(&topic, 1, TopicReplication::Fixed(1));
        for result in admin.create_topics([&new], &AdminOptions::new()).await? {
            result.map_err(|(t, code)| format!("cannot create {t}: {code}"))?;
        }
        let producer: FutureProducer = config.create()?;
        Ok((config, topic, producer))
    }

    /// Writes a header into a record's headers, for the SDK's propagator.
    struct HeadersInjector(Option<OwnedHeaders>);

    impl opentelemetry::propagation::Injector for HeadersInjector {
        fn set(&mut self, key: &str, value: String) {
            self.0 = self.0.take().map(|h| {
                h.insert(Header {
                    key,
                    value: Some(&value),
                })
            });
        }
    }

    /// The producer at full speed with the send spans written by hand: what a
    /// careful team pays for them without mqtrace. The span mqtrace makes for
    /// these records: `send <topic>` (PRODUCER), the system, operation and
    /// destination before the send, the partition and offset after its delivery
    /// report, `error.type` and an error status on failure.
    pub(super) async fn by_hand(
        args: &Args,
        provider: &opentelemetry_sdk::trace::SdkTracerProvider,
    ) -> Result<Measure, Failure> {
        use opentelemetry::propagation::TextMapPropagator as _;
        use opentelemetry::trace::TracerProvider as _;
        use opentelemetry::trace::{SpanKind, Status, TraceContextExt as _, Tracer as _};
        use opentelemetry::{Context, KeyValue};

        let (_, topic, producer) = set_up(args).await?;
        let tracer = provider.tracer("by-hand");
        let propagator = opentelemetry_sdk::propagation::TraceContextPropagator::new();
        let name = format!("send {topic}");
        let (tracer, propagator, name, topic, producer) =
            (&tracer, &propagator, &name, &topic, &producer);
        let mut measure = Measure::start()?;
        in_flight(args.messages, || async move {
            let span = tracer
                .span_builder(name.clone())
                .with_kind(SpanKind::Producer)
                .with_attributes(vec![
                    KeyValue::new("messaging.system.name", "kafka"),
                    KeyValue::new("messaging.operation.name", "send"),
                    KeyValue::new("messaging.operation.type", "send"),
                    KeyValue::new("messaging.destination.name", topic.clone()),
                ])
                .start(tracer);
            let cx = Context::current().with_span(span);
            let mut headers = HeadersInjector(Some(OwnedHeaders::new()));
            propagator.inject_context(&cx, &mut headers);
            let mut record = FutureRecord::<(), [u8]>::to(topic).payload(BODY);
            record.headers = headers.0;
            let sent = producer.send(record, None).await;
            let span = cx.span();
            match &sent {
                Ok(delivery) => {
                    span.set_attribute(KeyValue::new(
                        "messaging.destination.partition.id",
                        delivery.partition.to_string(),
                    ));
                    span.set_attribute(KeyValue::new("kafka.offset", delivery.offset));
                }
                Err((e, _)) => {
                    span.set_attribute(KeyValue::new("error.type", "kafka_error"));
                    span.set_status(Status::error(e.to_string()));
                }
            }
            span.end();
            sent.map(|_| ()).map_err(|(e, _)| e)
        })
        .await;
        measure.last_message();
        Ok(measure)
    }

    pub(super) async fn run(
        args: &Args,
        instrumenter: Option<&Instrumenter>,
    ) -> Result<Measure, Failure> {
        let (config, topic, producer) = set_up(args).await?;
        if args.role == Role::Produce {
            let mut measure = Measure::start()?;
            send(&producer, &topic, args.messages, instrumenter).await;
            measure.last_message();
            return Ok(measure);
        }
        // The records wait in the topic before the consumer starts.
        send(&producer, &topic, args.messages, None).await;
        let mut consumer_config = config.clone();
        consumer_config
            .set("group.id", &topic)
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false");
        let role = args.role;
        let n = args.messages;
        let Some(instrumenter) = instrumenter else {
            // The hand-written loop: commit each record, asynchronously.
            let consumer: StreamConsumer = consumer_config.create()?;
            consumer.subscribe(&[&topic])?;
            // The clock starts at the first record: group join is not the service's cost.
            let mut record = consumer.recv().await?;
            let mut measure = Measure::start()?;
            for done in 1..=n {
                let _ = handle(role).await;
                consumer.commit_message(&record, CommitMode::Async)?;
                if done < n {
                    record = consumer.recv().await?;
                }
            }
            measure.last_message();
            return Ok(measure);
        };
        // mqtrace's full consumer: stored offsets, committed every 200 ms.
        let consumer = TracedConsumer::from_config(
            &consumer_config,
            &[&topic],
            TracedProducer::new(producer.clone(), instrumenter.clone()),
            instrumenter.clone(),
        )?;
        let clocked = Clocked::new(n);
        let handler = clocked.clone();
        consumer
            .run_until(
                move |_| {
                    let handler = handler.clone();
                    async move { handler.handle(role).await }
                },
                clocked.all_done(),
            )
            .await?;
        let measure = clocked.take()?;
        // The run's topic stays: deleting it under live clients crashed librdkafka's
        // metadata cache against tansu.
        Ok(measure)
    }
}

mod rabbit {
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeleteOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
    use mqtrace_lapin::{ChannelExt as _, QueueSpec, TracedConsumer};

    /// Deliveries the broker pushes ahead, raw and traced.
    const PREFETCH: u16 = 20;

    use super::in_flight;
    use super::{env, handle, run_name, Args, Clocked, Failure, Instrumenter, Measure, Role};
    use futures_util::StreamExt as _;

    const BODY: &[u8] = &[b'x'; 100];

    /// `n` messages, `IN_FLIGHT` at a time, each awaited to its publisher confirm.
    async fn send(channel: &Channel, name: &str, n: usize, traced: Option<&Instrumenter>) {
        in_flight(n, || async move {
            match traced {
                Some(i) => channel
                    .publish_traced(
                        i,
                        "".into(),
                        name.into(),
                        BasicPublishOptions::default(),
                        BODY,
                        BasicProperties::default(),
                    )
                    .await
                    .map(|_| ()),
                None => match channel
                    .basic_publish(
                        "".into(),
                        name.into(),
                        BasicPublishOptions::default(),
                        BODY,
                        BasicProperties::default(),
                    )
                    .await
                {
                    Ok(confirm) => confirm.await.map(|_| ()),
                    Err(e) => Err(e),
                },
            }
        })
        .await;
    }

    pub(super) async fn run(
        args: &Args,
        instrumenter: Option<&Instrumenter>,
    ) -> Result<Measure, Failure> {
        let url = env("MQTRACE_TEST_RABBITMQ_URL")?;
        let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let name = run_name(args);
        let queue = QueueSpec::new(&name);
        queue.declare(&channel).await?;
        if args.role == Role::Produce {
            let mut measure = Measure::start()?;
            send(&channel, &name, args.messages, instrumenter).await;
            measure.last_message();
            let _ = channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await;
            return Ok(measure);
        }
        send(&channel, &name, args.messages, None).await;
        let role = args.role;
        if let Some(instrumenter) = instrumenter {
            // mqtrace's full consumer: coalesced acks.
            let clocked = Clocked::new(args.messages);
            let handler = clocked.clone();
            TracedConsumer::new(&url, queue, instrumenter.clone())
                .prefetch(PREFETCH)
                .run_until(
                    move |_| {
                        let handler = handler.clone();
                        async move { handler.handle(role).await }
                    },
                    clocked.all_done(),
                )
                .await?;
            let measure = clocked.take()?;
            let _ = channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = connection.close(200, "done".into()).await;
            return Ok(measure);
        }
        // The hand-written loop: ack each delivery.
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await?;
        let mut deliveries = channel
            .basic_consume(
                name.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut measure: Option<Measure> = None;
        for _ in 0..args.messages {
            let delivery = deliveries.next().await.ok_or("the consumer stopped")??;
            // The clock starts at the first delivery.
            if measure.is_none() {
                measure = Some(Measure::start()?);
            }
            let _ = handle(role).await;
            delivery.ack(BasicAckOptions::default()).await?;
        }
        let mut measure = measure.ok_or("no delivery")?;
        measure.last_message();
        let _ = channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = connection.close(200, "done".into()).await;
        Ok(measure)
    }
}

mod sqs {
    use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
    use aws_sdk_sqs::Client;
    use mqtrace_aws_sqs::{TracedConsumer, TracedSqs};

    use super::in_flight;
    use super::{env, handle, run_name, Args, Clocked, Failure, Instrumenter, Measure, Role};

    const BODY: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

    fn client(endpoint: &str) -> Client {
        let config = aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(endpoint)
            .credentials_provider(Credentials::new("test", "test", None, None, "service-cost"))
            .build();
        Client::from_conf(config)
    }

    /// `n` messages, `IN_FLIGHT` at a time, each awaited to SQS's answer.
    async fn send(client: &Client, url: &str, n: usize, traced: Option<&Instrumenter>) {
        let sqs = traced.map(|i| TracedSqs::new(client.clone(), i.clone()));
        in_flight(n, || {
            let request = client.send_message().queue_url(url).message_body(BODY);
            let sqs = sqs.as_ref();
            async move {
                match sqs {
                    Some(sqs) => sqs.send(request).await.map(drop),
                    None => request.send().await.map(drop),
                }
            }
        })
        .await;
    }

    pub(super) async fn run(
        args: &Args,
        instrumenter: Option<&Instrumenter>,
    ) -> Result<Measure, Failure> {
        let client = client(&env("MQTRACE_TEST_SQS_ENDPOINT")?);
        let url = client
            .create_queue()
            .queue_name(run_name(args))
            .send()
            .await?
            .queue_url
            .ok_or("no queue URL")?;
        let measure = measured(args, instrumenter, &client, &url).await;
        let _ = client.delete_queue().queue_url(&url).send().await;
        measure
    }

    async fn measured(
        args: &Args,
        instrumenter: Option<&Instrumenter>,
        client: &Client,
        url: &str,
    ) -> Result<Measure, Failure> {
        if args.role == Role::Produce {
            let mut measure = Measure::start()?;
            send(client, url, args.messages, instrumenter).await;
            measure.last_message();
            return Ok(measure);
        }
        send(client, url, args.messages, None).await;
        let role = args.role;
        if let Some(instrumenter) = instrumenter {
            // mqtrace's full consumer: a receive's deletes in one batch call.
            let clocked = Clocked::new(args.messages);
            let handler = clocked.clone();
            TracedConsumer::new(client.clone(), url, instrumenter)
                .wait_time_seconds(1)
                .run_until(
                    move |_| {
                        let handler = handler.clone();
                        async move { handler.handle(role).await }
                    },
                    clocked.all_done(),
                )
                .await?;
            return clocked.take();
        }
        // The hand-written loop: receive ten, delete each.
        let mut measure: Option<Measure> = None;
        let mut done = 0;
        while done < args.messages {
            let out = client
                .receive_message()
                .queue_url(url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .send()
                .await?;
            for message in out.messages.unwrap_or_default() {
                if measure.is_none() {
                    measure = Some(Measure::start()?);
                }
                let _ = handle(role).await;
                client
                    .delete_message()
                    .queue_url(url)
                    .set_receipt_handle(message.receipt_handle)
                    .send()
                    .await?;
                done += 1;
            }
        }
        let mut measure = measure.ok_or("no message")?;
        measure.last_message();
        Ok(measure)
    }
}
