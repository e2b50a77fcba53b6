//! The broker killed (SIGKILL) mid-stream and started again, on the consumer side
//! and on the producer side. Each test runs a tansu broker of its own whose log lives
//! in S3, so the restarted broker has every record and committed offset; the test
//! then accounts for every record sent through the delivery checker.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mqtrace::HandlerResult;
use mqtrace_testing::delivery::{Contract, Ledger};
use mqtrace_testing::faults::Tansu;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use rdkafka::Message;
use tokio::sync::Notify;

use crate::helpers::{committed_offset, send_numbered, when_count, within, Harness};

const RECORDS: usize = 60;

/// Kills the broker, keeps it down for a second, starts it again.
async fn kill_and_restart(tansu: Arc<Mutex<Tansu>>) {
    tokio::task::spawn_blocking(move || {
        let mut broker = tansu.lock().unwrap();
        broker.kill();
        std::thread::sleep(Duration::from_secs(1));
        broker.restart();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_side_broker_killed_and_restarted() {
    let tansu = Tansu::start();
    let h = Harness::start_at(tansu.bootstrap()).await;
    let tansu = Arc::new(Mutex::new(tansu));
    let topic = h.name("orders");
    h.topics(&[&topic]).await;
    let instrumenter = h.instrumenter(|b| b);
    let producer = h.producer(&instrumenter);
    send_numbered(&producer, &topic, RECORDS).await;
    let ledger = Ledger::new();
    for i in 0..RECORDS {
        ledger.sent(i.to_string(), "0");
    }

    let processed = Arc::new(Mutex::new(Vec::<usize>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(Notify::new());
    // Fetch little at a time, so that most records are still on the broker when it
    // is killed.
    let mut config = h.consumer_config();
    config
        .set("queued.min.messages", "1")
        .set("fetch.message.max.bytes", "64");
    let consumer = h.consumer_with(&config, &[&topic], &instrumenter);
    let run = {
        let (processed, count, stop, ledger) = (
            Arc::clone(&processed),
            Arc::clone(&count),
            Arc::clone(&stop),
            ledger.clone(),
        );
        tokio::spawn(async move {
            consumer
                .run_until(
                    move |record| {
                        let (processed, count) = (Arc::clone(&processed), Arc::clone(&count));
                        let ledger = ledger.clone();
                        async move {
                            let id: usize = record.json()?;
                            let call = ledger.started(id.to_string());
                            processed.lock().unwrap().push(id);
                            count.fetch_add(1, Ordering::SeqCst);
                            // Slow enough for the kill to land mid-stream.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            call.finished(true);
                            HandlerResult::Ok(())
                        }
                    },
                    async move { stop.notified().await },
                )
                .await
        })
    };
    within(60, when_count(&count, 15)).await;
    let done_at_kill = count.load(Ordering::SeqCst);
    kill_and_restart(Arc::clone(&tansu)).await;
    // Every id at least once: the consumer reconnects on its own.
    within(120, async {
        loop {
            let distinct: BTreeSet<usize> = processed.lock().unwrap().iter().copied().collect();
            if distinct.len() == RECORDS {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    stop.notify_one();
    let stats = within(30, run).await.unwrap().unwrap();
    assert_eq!(stats.settled as usize, processed.lock().unwrap().len());
    // Records whose commit the group does not hold are waiting: the next consumer
    // of the group gets them (duplicates allowed). The restarted tansu now and then
    // loses commits it acknowledged after the restart; they are counted here.
    let waiting = RECORDS - committed_offset(&h, &topic).await as usize;
    let again = Arc::new(AtomicUsize::new(0));
    if waiting > 0 {
        let (again, processed) = (Arc::clone(&again), Arc::clone(&processed));
        let next = h.consumer(&[&topic], &instrumenter);
        let reached = when_count(&again, waiting);
        let ledger = ledger.clone();
        within(
            60,
            next.run_until(
                move |record| {
                    let (processed, again) = (Arc::clone(&processed), Arc::clone(&again));
                    let ledger = ledger.clone();
                    async move {
                        let id: usize = record.json()?;
                        ledger.started(id.to_string()).finished(true);
                        processed.lock().unwrap().push(id);
                        again.fetch_add(1, Ordering::SeqCst);
                        HandlerResult::Ok(())
                    }
                },
                reached,
            ),
        )
        .await
        .unwrap();
    }
    let committed = committed_offset(&h, &topic).await;
    ledger.committed("0", committed);
    ledger.waiting((committed.max(0)..RECORDS as i64).map(|i| i.to_string()));
    let a = ledger.check(
        "kafka broker killed under the consumer",
        Contract::ordered(),
    );
    println!(
        "kafka broker killed under the consumer: sent {RECORDS}, {done_at_kill} done when it was \
         killed; processed {} ({} duplicates), waiting after the restart {waiting} (then \
         processed by the group's next consumer), dead-lettered {}, lost {}; failed commits \
         reported {}",
        a.processed,
        a.duplicates,
        a.dead_lettered,
        a.lost.len(),
        stats.settle_failures
    );
    assert_eq!(again.load(Ordering::SeqCst), waiting);
    assert_eq!(committed, RECORDS as i64, "nothing left waiting");
    assert_eq!(stats.dead_lettered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_side_broker_killed_and_restarted() {
    let tansu = Tansu::start();
    let h = Harness::start_at(tansu.bootstrap()).await;
    let tansu = Arc::new(Mutex::new(tansu));
    let topic = h.name("payments");
    h.topics(&[&topic]).await;
    let instrumenter = h.instrumenter(|b| b);
    let producer = Arc::new(h.producer(&instrumenter));
    let ledger = Ledger::new();
    for i in 0..RECORDS {
        ledger.sent(i.to_string(), "0");
    }
    let acked = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let send_all = {
        let (producer, topic, acked, failed) = (
            Arc::clone(&producer),
            topic.clone(),
            Arc::clone(&acked),
            Arc::clone(&failed),
        );
        tokio::spawn(async move {
            for i in 0..RECORDS {
                let payload = i.to_string();
                // A send that fails is an Error span and an error handed back; the
                // application sends again.
                while producer
                    .send(
                        FutureRecord::<str, str>::to(&topic).payload(&payload),
                        Duration::from_secs(10),
                    )
                    .await
                    .is_err()
                {
                    failed.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                acked.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    within(60, when_count(&acked, 20)).await;
    kill_and_restart(Arc::clone(&tansu)).await;
    within(120, send_all).await.unwrap();

    // Read the topic back from the restarted broker.
    let reader: StreamConsumer = h.consumer_config().create().unwrap();
    reader.subscribe(&[&topic]).unwrap();
    let mut stored = Vec::new();
    within(60, async {
        while BTreeSet::from_iter(stored.iter().copied()).len() < RECORDS {
            let m = reader.recv().await.unwrap();
            let id: usize = std::str::from_utf8(m.payload().unwrap())
                .unwrap()
                .parse()
                .unwrap();
            // Read back is what counts as handled here.
            ledger.started(id.to_string()).finished(true);
            stored.push(id);
        }
    })
    .await;
    let a = ledger.check(
        "kafka broker killed under the producer",
        Contract::at_least_once(),
    );
    println!(
        "kafka broker killed under the producer: sent {RECORDS}, failed attempts {}, stored {} \
         ({} duplicates), lost {}",
        failed.load(Ordering::SeqCst),
        stored.len(),
        a.duplicates,
        a.lost.len()
    );
    // Every failed attempt is an Error span: the spans of this test are the sends.
    let spans = h.spans(RECORDS + failed.load(Ordering::SeqCst)).await;
    let errors = spans
        .iter()
        .filter(|s| matches!(s.status, mqtrace_testing::SpanStatus::Error(_)))
        .count();
    assert_eq!(errors, failed.load(Ordering::SeqCst));
}
