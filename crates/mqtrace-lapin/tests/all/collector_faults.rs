//! The OTLP collector unreachable, then hanging (accepts connections, never
//! answers), then back, while messages flow through RabbitMQ. Telemetry exports
//! through a proxy in front of the in-process collector. Every message is
//! processed; the spans that could not be exported are counted; export resumes
//! when the collector is back.

use std::sync::Arc;
use std::time::Duration;

use lapin::BasicProperties;
use mqtrace::{HandlerResult, Instrumenter};
use mqtrace_lapin::{QueueSpec, TracedConsumer, TracedPublisher};
use mqtrace_telemetry::TelemetryBuilder;
use mqtrace_testing::delivery::Contract;
use mqtrace_testing::faults::{
    check_collector_run, collector_fault_run, messages_per_phase, Deliveries, Proxy,
};
use opentelemetry_sdk::trace::BatchConfigBuilder;
use tokio::sync::Notify;

use crate::helpers::{drain, when_count, within, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_unreachable_then_hanging_then_back() {
    let h = Harness::start_alone().await;
    let proxy = Proxy::start(h.collector.grpc_addr()).await.unwrap();
    let guard = TelemetryBuilder::default()
        .service_name("mqtrace-lapin-collector-faults")
        .endpoint(format!("http://{}", proxy.addr()))
        .install_global(false)
        .export_timeout(Duration::from_secs(1))
        .shutdown_timeout(Duration::from_secs(3))
        .batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(Duration::from_millis(100))
                .build(),
        )
        .build()
        .unwrap();
    let instrumenter = Instrumenter::builder()
        .tracer_provider(guard.provider().unwrap())
        .build();
    let queue = QueueSpec::new(h.name("events"));
    let (_connection, channel) = h.channel().await;
    queue.declare(&channel).await.unwrap();
    let publisher = TracedPublisher::new(channel.clone(), instrumenter.clone());

    let deliveries = Arc::new(Deliveries::default());
    let stop = Arc::new(Notify::new());
    let consumer = {
        let (deliveries, stop) = (Arc::clone(&deliveries), Arc::clone(&stop));
        let consumer = TracedConsumer::new(&h.url, queue.clone(), instrumenter.clone());
        tokio::spawn(async move {
            consumer
                .run_until(
                    move |message| {
                        let deliveries = Arc::clone(&deliveries);
                        async move {
                            deliveries.record(message.json()?);
                            HandlerResult::Ok(())
                        }
                    },
                    async move { stop.notified().await },
                )
                .await
        })
    };

    let per_phase = messages_per_phase(300);
    let reports = collector_fault_run(
        "rabbitmq",
        &proxy,
        per_phase,
        |first, n| {
            let (publisher, queue, deliveries) = (&publisher, &queue, Arc::clone(&deliveries));
            async move {
                for id in first..first + n {
                    let c = publisher
                        .publish_json("", queue.name(), &id, BasicProperties::default())
                        .await
                        .unwrap();
                    assert!(c.is_ack());
                }
                within(60, when_count(deliveries.distinct(), first + n)).await;
            }
        },
        || {
            let s = guard.stats();
            (s.ended, s.exported)
        },
    )
    .await;
    stop.notify_one();
    within(30, consumer).await.unwrap().unwrap();

    let sent = per_phase * reports.len();
    // Every delivery as a handled message, what is left on the queue as
    // waiting: nothing lost, none handled that was not sent.
    let ledger = deliveries.ledger(0..sent);
    ledger.waiting(
        drain(&channel, queue.name())
            .await
            .iter()
            .map(|d| String::from_utf8_lossy(&d.data).into_owned()),
    );
    let spans = tokio::task::spawn_blocking(move || guard.shutdown())
        .await
        .unwrap();
    let a = ledger.check(
        "rabbitmq collector faults, the delivery checker",
        Contract::at_least_once(),
    );
    println!(
        "rabbitmq collector faults: spans ended {}, exported {}, dropped (counted) {}",
        spans.ended,
        spans.exported,
        spans.not_exported()
    );
    assert_eq!(a.waiting, 0);
    check_collector_run(&reports, spans.exported, spans.not_exported());
}
