//! Raw lapin against mqtrace-lapin on the local RabbitMQ, in the same run.
//!
//! Needs `MQTRACE_TEST_RABBITMQ_URL` (`scripts/brokers.sh start` and
//! `source .mqtrace-test/env`). Spans are exported over OTLP gRPC to the
//! in-process collector. Rounds alternate raw and traced so drift in the machine
//! hits both alike; figures are medians over the rounds.
//!
//! ```sh
//! cargo bench -p mqtrace-lapin --bench rabbitmq
//! ```
//!
//! - publish: sequential publishes of 100-byte messages, each confirmed;
//! - consume: a queue pre-filled, consumed and acked (empty handler);
//! - worker: the same with a handler doing about 50 µs of work (busy loop).
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr
)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use mqtrace::{HandlerResult, Instrumenter};
use mqtrace_lapin::{QueueSpec, TracedConsumer, TracedPublisher};
use mqtrace_telemetry::{TelemetryBuilder, TelemetryGuard};
use mqtrace_testing::bench::{cpu_time as cpu, median, spin};
use opentelemetry_sdk::trace::{BatchConfigBuilder, Sampler};

const PUBLISH_ROUNDS: usize = 40;
const PUBLISHES: usize = 200;
const CONSUME_ROUNDS: usize = 12;
const CONSUMES: usize = 1_000;
const WORK: Duration = Duration::from_micros(50);
const PREFETCH: u16 = 20;

fn body() -> Vec<u8> {
    vec![b'x'; 100]
}

async fn channel(url: &str) -> (Connection, Channel) {
    let c = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = c.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (c, ch)
}

async fn fill(ch: &Channel, queue: &str, n: usize) {
    let payload = body();
    for _ in 0..n {
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            &payload,
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    ch.wait_for_confirms().await.unwrap();
}

/// Confirmed publishes, plain lapin.
async fn publish_raw(ch: &Channel, queue: &str) {
    let payload = body();
    for _ in 0..PUBLISHES {
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            &payload,
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
}

async fn publish_traced(p: &TracedPublisher, queue: &str) {
    let payload = body();
    for _ in 0..PUBLISHES {
        p.publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            &payload,
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
}

/// Messages consumed and acked by plain lapin.
async fn consume_raw(url: &str, queue: &str, work: Duration) {
    let (_c, ch) = channel(url).await;
    ch.basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..CONSUMES {
        let d = consumer.next().await.unwrap().unwrap();
        spin(work);
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    ch.close(200, "done".into()).await.unwrap();
}

async fn consume_traced(url: &str, spec: &QueueSpec, i: &Instrumenter, work: Duration) {
    let done = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(Notify::new());
    let (counted, notify) = (Arc::clone(&done), Arc::clone(&all_done));
    let stats = TracedConsumer::new(url, spec.clone(), i.clone())
        .prefetch(PREFETCH)
        .run_until(
            move |_| {
                let (counted, notify) = (Arc::clone(&counted), Arc::clone(&notify));
                async move {
                    spin(work);
                    if counted.fetch_add(1, Ordering::Relaxed) + 1 == CONSUMES {
                        notify.notify_one();
                    }
                    HandlerResult::Ok(())
                }
            },
            // Waits without polling: a busy shutdown future would steal a core.
            async move { all_done.notified().await },
        )
        .await
        .unwrap();
    assert_eq!(stats.settled, CONSUMES as u64);
}

/// Wall and CPU nanoseconds per message of `f`.
async fn measure<F: std::future::Future<Output = ()>>(n: usize, f: F) -> (f64, f64) {
    let (wall, cpu0) = (Instant::now(), cpu());
    f.await;
    let per = |d: Duration| d.as_nanos() as f64 / n as f64;
    (per(wall.elapsed()), per(cpu().saturating_sub(cpu0)))
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
    let url = mqtrace_testing::brokers::rabbitmq_url();
    let collector = mqtrace_testing::Collector::start().await.unwrap();
    let (_c, ch) = channel(&url).await;
    let queue = format!("bench-{:08x}", fastrand::u32(..));
    let spec = QueueSpec::new(&queue);
    spec.declare(&ch).await.unwrap();

    println!("| sampler | step | raw | traced | added per message | traced/raw throughput | CPU per message raw → traced |");
    println!("|---|---|---|---|---|---|---|");
    for (label, sampler) in [
        ("always on", Sampler::AlwaysOn),
        ("off", Sampler::AlwaysOff),
    ] {
        let guard = telemetry(collector.grpc_endpoint(), sampler);
        let instrumenter = Instrumenter::builder()
            .tracer_provider(guard.provider().unwrap())
            .build();
        let publisher = TracedPublisher::new(ch.clone(), instrumenter.clone());
        // [publish, consume, worker] x [raw, traced] x (wall, cpu) per round.
        let mut samples: [[Vec<(f64, f64)>; 2]; 3] = Default::default();
        for _ in 0..PUBLISH_ROUNDS {
            samples[0][0].push(measure(PUBLISHES, publish_raw(&ch, &queue)).await);
            samples[0][1].push(measure(PUBLISHES, publish_traced(&publisher, &queue)).await);
        }
        ch.queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
            .await
            .unwrap();
        for _ in 0..CONSUME_ROUNDS {
            for (step, work) in [(1, Duration::ZERO), (2, WORK)] {
                fill(&ch, &queue, CONSUMES).await;
                samples[step][0].push(measure(CONSUMES, consume_raw(&url, &queue, work)).await);
                fill(&ch, &queue, CONSUMES).await;
                samples[step][1].push(
                    measure(CONSUMES, consume_traced(&url, &spec, &instrumenter, work)).await,
                );
            }
        }
        let steps = [
            "publish + confirm",
            "consume + ack",
            "worker (50 µs handler) + ack",
        ];
        for (step, [raw, traced]) in steps.iter().zip(samples) {
            let wall = |v: &[(f64, f64)]| median(v.iter().map(|s| s.0).collect());
            // CPU over all rounds of a side: a round is too short for the 10 ms tick.
            let cpu = |v: &[(f64, f64)]| v.iter().map(|s| s.1).sum::<f64>() / v.len() as f64;
            let (r, t) = (wall(&raw), wall(&traced));
            println!(
                "| {label} | {step} | {:.1} µs | {:.1} µs | {:+.1} µs | {:.3} | {:.1} µs → {:.1} µs |",
                r / 1e3,
                t / 1e3,
                (t - r) / 1e3,
                r / t,
                cpu(&raw) / 1e3,
                cpu(&traced) / 1e3,
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
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}
