//! Issue 24, Kafka items 3, 4 and 7: settling never lets a group's committed
//! offset pass a record not handled, nor move backwards. Every test keeps a
//! `mqtrace_testing::delivery::Ledger` of what it saw and checks it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mqtrace_testing::delivery::{Contract, Ledger};
use rdkafka::consumer::Consumer;
use rdkafka::producer::FutureRecord;

use crate::helpers::{committed_offset_of, when_count, within, Harness};

/// Item 7. Two full consumers of one group on a topic of two partitions: A
/// handles both partitions' first records, B joins and takes one partition and
/// its next records, then stops, and the partition comes back to A, which
/// stops too. Before the fix A's final commit committed its old position of the
/// partition that had moved away and back (5), behind what B had committed
/// (10): the checker failed with `offsets committed backwards`. Now revoked
/// partitions leave A's positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_moved_away_and_back_is_never_committed_backwards() {
    let h = Harness::start_alone().await;
    let topic = h.name("moving");
    h.partitioned_topic(&topic, 2).await;
    let instrumenter = h.instrumenter(|b| b);
    let producer = h.producer(&instrumenter);
    let ledger = Ledger::new();
    let send = |from: usize| {
        let (producer, topic, ledger) = (&producer, &topic, &ledger);
        async move {
            for partition in 0..2 {
                for i in from..from + 5 {
                    let id = format!("p{partition}-{i}");
                    producer
                        .send(
                            FutureRecord::<str, str>::to(topic)
                                .partition(partition)
                                .payload(&id),
                            Duration::from_secs(10),
                        )
                        .await
                        .unwrap();
                    ledger.sent(id, partition.to_string());
                }
            }
        }
    };
    send(0).await;

    let handled = Arc::new(AtomicUsize::new(0));
    let start = |name: &'static str| {
        let consumer = Arc::new(h.consumer(&[&topic], &instrumenter));
        let stop = Arc::new(tokio::sync::Notify::new());
        let task = {
            let (consumer, stop) = (Arc::clone(&consumer), Arc::clone(&stop));
            let (ledger, handled) = (ledger.clone(), Arc::clone(&handled));
            tokio::spawn(async move {
                consumer
                    .run_until(
                        |record| {
                            let id = String::from_utf8_lossy(record.payload().unwrap_or_default())
                                .into_owned();
                            ledger.started(id).finished(true);
                            handled.fetch_add(1, Ordering::SeqCst);
                            async { Ok(()) }
                        },
                        stop.notified(),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{name}: {e}"))
            })
        };
        (consumer, stop, task)
    };
    let assigned = |c: &mqtrace_rdkafka::TracedConsumer| {
        c.inner().assignment().map(|a| a.count()).unwrap_or(0)
    };
    let observe = |label: &'static str| {
        let (h, topic, ledger) = (&h, &topic, &ledger);
        async move {
            for partition in 0..2 {
                let offset = committed_offset_of(h, topic, partition).await;
                println!("{label}: partition {partition} committed at {offset}");
                ledger.committed(partition.to_string(), offset);
            }
        }
    };

    let (a, stop_a, task_a) = start("A");
    within(60, when_count(&handled, 10)).await;
    // A's interval commit.
    tokio::time::sleep(Duration::from_millis(600)).await;
    observe("A alone").await;

    let (b, stop_b, task_b) = start("B");
    within(60, async {
        while !(assigned(&a) == 1 && assigned(&b) == 1) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    send(5).await;
    within(60, when_count(&handled, 20)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    observe("A and B").await;

    stop_b.notify_one();
    within(30, task_b).await.unwrap();
    // Closed: B leaves the group.
    tokio::task::block_in_place(|| drop(b));
    observe("B stopped").await;
    within(60, async {
        while assigned(&a) != 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    stop_a.notify_one();
    within(30, task_a).await.unwrap();
    observe("A stopped").await;

    let mut waiting = Vec::new();
    for partition in 0..2 {
        let committed = committed_offset_of(&h, &topic, partition).await;
        waiting.extend((committed.max(0)..10).map(|i| format!("p{partition}-{i}")));
    }
    ledger.waiting(waiting);
    ledger.check(
        "kafka full consumer, partition moved away and back",
        Contract::ordered(),
    );
}
