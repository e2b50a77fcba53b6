//! Raw rdkafka against mqtrace-rdkafka on the local Kafka-protocol broker, in the
//! same run.
//!
//! Needs `MQTRACE_TEST_KAFKA_BOOTSTRAP` (`scripts/brokers.sh start` and
//! `source .mqtrace-test/env`). Spans are exported over OTLP gRPC to the
//! in-process collector. Rounds alternate raw and traced; figures are medians over
//! the rounds, CPU is the whole process's (client, exporter and collector; not the
//! broker's) averaged over all rounds of a side.
//!
//! ```sh
//! cargo bench -p mqtrace-rdkafka --bench kafka
//! ```
//!
//! - produce: 100-byte records at full speed (500 in flight), each awaited to its
//!   delivery report;
//! - consume: a pre-filled topic read from the start by a new group, empty
//!   handler, commit after each record;
//! - worker: the same with a handler doing about 50 µs of work (busy loop).
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::needless_range_loop
)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt as _};
use mqtrace::{HandlerResult, Instrumenter};
use mqtrace_rdkafka::{TracedConsumer, TracedProducer};
use mqtrace_telemetry::{TelemetryBuilder, TelemetryGuard};
use mqtrace_testing::bench::{cpu_time as cpu, median, spin};
use opentelemetry_sdk::trace::{BatchConfigBuilder, Sampler};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
use tokio::sync::Notify;

const ROUNDS: usize = 6;
const PRODUCES: usize = 5_000;
const IN_FLIGHT: usize = 500;
const CONSUMES: usize = 5_000;
const WORKS: usize = 2_000;
const WORK: Duration = Duration::from_micros(50);

fn config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("message.timeout.ms", "30000")
        .set("linger.ms", "1");
    c
}

fn consumer_config(bootstrap: &str) -> ClientConfig {
    let mut c = config(bootstrap);
    c.set("group.id", format!("bench-{:08x}", fastrand::u32(..)))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false");
    c
}

async fn create_topic(bootstrap: &str, name: &str) {
    let admin: AdminClient<DefaultClientContext> = config(bootstrap).create().unwrap();
    for r in admin
        .create_topics(
            &[NewTopic::new(name, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap()
    {
        r.unwrap();
    }
}

/// Nanoseconds per delivered record, plain rdkafka or traced.
async fn produce(raw: &FutureProducer, traced: Option<&TracedProducer>, topic: &str) -> f64 {
    let payload = vec![b'x'; 100];
    let start = Instant::now();
    stream::iter(0..PRODUCES)
        .for_each_concurrent(IN_FLIGHT, |_| {
            let record = FutureRecord::<(), [u8]>::to(topic).payload(&payload);
            async move {
                match traced {
                    Some(t) => t.send(record, Duration::from_secs(30)).await.unwrap(),
                    None => raw.send(record, Duration::from_secs(30)).await.unwrap(),
                };
            }
        })
        .await;
    start.elapsed().as_nanos() as f64 / PRODUCES as f64
}

/// Wall and CPU nanoseconds per record, from the first record received to the
/// last commit (group join and start-up left out).
async fn consume_raw(bootstrap: &str, topic: &str, n: usize, work: Duration) -> (f64, f64) {
    let consumer: StreamConsumer = consumer_config(bootstrap).create().unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut start = None;
    for _ in 0..n {
        let m = consumer.recv().await.unwrap();
        start.get_or_insert_with(|| (Instant::now(), cpu()));
        spin(work);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(m.topic(), m.partition(), Offset::Offset(m.offset() + 1))
            .unwrap();
        consumer.commit(&tpl, CommitMode::Async).unwrap();
    }
    let (wall, cpu0) = start.unwrap();
    (
        wall.elapsed().as_nanos() as f64 / n as f64,
        (cpu() - cpu0).as_nanos() as f64 / n as f64,
    )
}

async fn consume_traced(
    bootstrap: &str,
    topic: &str,
    n: usize,
    work: Duration,
    instrumenter: &Instrumenter,
) -> (f64, f64) {
    let forwarder = TracedProducer::from_config(&config(bootstrap), instrumenter.clone()).unwrap();
    let consumer = TracedConsumer::from_config(
        &consumer_config(bootstrap),
        &[topic],
        forwarder,
        instrumenter.clone(),
    )
    .unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    // From the first record's handler to the last one's, as the raw loop counts:
    // the final synchronous commit at shutdown waits for every asynchronous
    // commit still queued, which the raw loop never waits for.
    type Mark = Option<(Instant, Duration)>;
    let span = Arc::new(Mutex::new((None::<(Instant, Duration)>, Mark::None)));
    let done = Arc::new(Notify::new());
    let (counted, timed, notify) = (Arc::clone(&count), Arc::clone(&span), Arc::clone(&done));
    let stats = consumer
        .run_until(
            move |_| {
                timed
                    .lock()
                    .unwrap()
                    .0
                    .get_or_insert_with(|| (Instant::now(), cpu()));
                spin(work);
                if counted.fetch_add(1, Ordering::Relaxed) + 1 == n {
                    timed.lock().unwrap().1 = Some((Instant::now(), cpu()));
                    notify.notify_one();
                }
                async { HandlerResult::Ok(()) }
            },
            async move { done.notified().await },
        )
        .await
        .unwrap();
    assert_eq!(stats.settled, n as u64);
    let (first, last) = *span.lock().unwrap();
    let ((w0, c0), (w1, c1)) = (first.unwrap(), last.unwrap());
    (
        (w1 - w0).as_nanos() as f64 / n as f64,
        (c1 - c0).as_nanos() as f64 / n as f64,
    )
}

fn telemetry(endpoint: String, sampler: Sampler) -> TelemetryGuard {
    TelemetryBuilder::default()
        .service_name("bench")
        .endpoint(endpoint)
        .install_global(false)
        .sampler(sampler)
        .batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(65_536)
                .build(),
        )
        .build()
        .unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let bootstrap = mqtrace_testing::brokers::kafka_bootstrap();
    let collector = mqtrace_testing::Collector::start().await.unwrap();
    let raw: FutureProducer = config(&bootstrap).create().unwrap();

    println!("| sampler | step | raw | traced | added per record | traced/raw throughput | CPU per record raw → traced |");
    println!("|---|---|---|---|---|---|---|");
    for (label, sampler) in [
        ("always on", Sampler::AlwaysOn),
        ("off", Sampler::AlwaysOff),
    ] {
        let guard = telemetry(collector.grpc_endpoint(), sampler);
        let instrumenter = Instrumenter::builder()
            .tracer_provider(guard.provider().unwrap())
            .build();
        let traced =
            TracedProducer::from_config(&config(&bootstrap), instrumenter.clone()).unwrap();
        let run = format!("{:08x}", fastrand::u32(..));
        let (sink, source) = (format!("bench-sink-{run}"), format!("bench-source-{run}"));
        create_topic(&bootstrap, &sink).await;
        create_topic(&bootstrap, &source).await;
        // The consume steps read this topic from the start, each with a new group.
        produce(&raw, None, &source).await;

        let mut samples: [[Vec<(f64, f64)>; 2]; 3] = Default::default();
        for _ in 0..ROUNDS {
            for side in 0..2 {
                let c0 = cpu();
                let wall = produce(&raw, (side == 1).then_some(&traced), &sink).await;
                samples[0][side].push((wall, (cpu() - c0).as_nanos() as f64 / PRODUCES as f64));
            }
            for (step, n, work) in [(1, CONSUMES, Duration::ZERO), (2, WORKS, WORK)] {
                samples[step][0].push(consume_raw(&bootstrap, &source, n, work).await);
                samples[step][1]
                    .push(consume_traced(&bootstrap, &source, n, work, &instrumenter).await);
            }
        }
        let steps = [
            "produce (full speed)",
            "consume + commit",
            "worker (50 µs handler) + commit",
        ];
        for (step, [r, t]) in steps.iter().zip(samples) {
            let wall = |v: &[(f64, f64)]| median(v.iter().map(|s| s.0).collect());
            let cpu = |v: &[(f64, f64)]| v.iter().map(|s| s.1).sum::<f64>() / v.len() as f64;
            let (rw, tw) = (wall(&r), wall(&t));
            println!(
                "| {label} | {step} | {:.2} µs | {:.2} µs | {:+.0} ns | {:.3} | {:.2} µs → {:.2} µs |",
                rw / 1e3,
                tw / 1e3,
                tw - rw,
                rw / tw,
                cpu(&r) / 1e3,
                cpu(&t) / 1e3,
            );
        }
        let stats = tokio::task::spawn_blocking(move || guard.shutdown())
            .await
            .unwrap();
        eprintln!(
            "{label}: spans ended {}, exported {}",
            stats.ended, stats.exported
        );
    }
}
