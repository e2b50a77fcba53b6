//! The OTLP collector unreachable, then hanging (accepts connections, never
//! answers), then back, while records flow through Kafka. Telemetry exports
//! through a proxy in front of the in-process collector. Every record is
//! processed; the spans that could not be exported are counted; export resumes
//! when the collector is back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mqtrace::{HandlerResult, Instrumenter};
use mqtrace_rdkafka::{TracedConsumer, TracedProducer};
use mqtrace_telemetry::TelemetryBuilder;
use mqtrace_testing::delivery::Contract;
use mqtrace_testing::faults::{
    check_collector_run, collector_fault_run, messages_per_phase, Deliveries, Proxy,
};
use opentelemetry_sdk::trace::BatchConfigBuilder;
use rdkafka::producer::FutureRecord;
use tokio::sync::Notify;

use crate::helpers::{when_count, within, Harness};

/// The id of the record sent before the phases, so that the consumer has joined
/// its group before anything is timed.
const WARM_UP: usize = usize::MAX;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_unreachable_then_hanging_then_back() {
    let h = Harness::start_alone().await;
    let proxy = Proxy::start(h.collector.grpc_addr()).await.unwrap();
    let guard = TelemetryBuilder::default()
        .service_name("mqtrace-rdkafka-collector-faults")
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
    let topic = h.name("clicks");
    h.topics(&[&topic]).await;
    let producer = TracedProducer::from_config(&h.config(), instrumenter.clone()).unwrap();

    let deliveries = Arc::new(Deliveries::default());
    let warmed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(Notify::new());
    let consumer = {
        let (deliveries, warmed, stop) = (
            Arc::clone(&deliveries),
            Arc::clone(&warmed),
            Arc::clone(&stop),
        );
        let consumer = TracedConsumer::from_config(
            &h.consumer_config(),
            &[&topic],
            TracedProducer::from_config(&h.config(), instrumenter.clone()).unwrap(),
            instrumenter.clone(),
        )
        .unwrap();
        tokio::spawn(async move {
            consumer
                .run_until(
                    move |record| {
                        let (deliveries, warmed) = (Arc::clone(&deliveries), Arc::clone(&warmed));
                        async move {
                            let id: usize = record.json()?;
                            if id == WARM_UP {
                                warmed.fetch_add(1, Ordering::SeqCst);
                            } else {
                                deliveries.record(id);
                            }
                            HandlerResult::Ok(())
                        }
                    },
                    async move { stop.notified().await },
                )
                .await
        })
    };
    let send = |id: usize| {
        let (producer, topic) = (&producer, &topic);
        async move {
            let payload = id.to_string();
            producer
                .send(
                    FutureRecord::<str, str>::to(topic).payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    };
    send(WARM_UP).await;
    within(60, when_count(&warmed, 1)).await;

    let per_phase = messages_per_phase(300);
    let reports = collector_fault_run(
        "kafka",
        &proxy,
        per_phase,
        |first, n| {
            let (send, deliveries) = (&send, Arc::clone(&deliveries));
            async move {
                // Sent side by side, as a producer does, not one delivery at a time.
                futures_util::future::join_all((first..first + n).map(send)).await;
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
    let stats = within(30, consumer).await.unwrap().unwrap();

    let sent = per_phase * reports.len();
    let processed = deliveries.all();
    let lost = deliveries.lost(0..sent);
    let spans = tokio::task::spawn_blocking(move || guard.shutdown())
        .await
        .unwrap();
    println!(
        "kafka collector faults: sent {sent}, processed {}, commit failures {}, \
         dead-lettered {}, lost {lost}; spans ended {}, exported {}, dropped (counted) {}",
        processed.len(),
        stats.settle_failures,
        stats.dead_lettered,
        spans.ended,
        spans.exported,
        spans.not_exported()
    );
    assert_eq!(lost, 0);
    assert_eq!(stats.settled as usize, sent + 1);
    assert_eq!(stats.settle_failures, 0);
    // The same run through the delivery checker: nothing lost (waiting is
    // asserted empty above), none handled that was not sent.
    deliveries.ledger(0..sent).check(
        "kafka collector faults, the delivery checker",
        Contract::at_least_once(),
    );
    check_collector_run(&reports, spans.exported, spans.not_exported());
}
