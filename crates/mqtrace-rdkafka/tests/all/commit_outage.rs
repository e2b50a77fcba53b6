//! The cluster unreachable while a consumer settles records it had already
//! fetched, and the consumer told to stop before the cluster is back: the
//! consumer's final commit, tried again until the cluster answers, stores the
//! progress, and the consumer stops and closes in bounded time. (A synchronous
//! final commit blocked here for good: librdkafka waited on a group that only
//! the blocked thread could have served.) Every connection to the broker, the
//! group coordinator's included, goes through a proxy that the test switches to
//! refusing them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mqtrace::HandlerResult;
use mqtrace_testing::delivery::{Contract, Ledger};
use mqtrace_testing::faults::{free_port, Mode, Proxy, Tansu};
use tokio::sync::{watch, Notify};

use crate::helpers::{committed_offset, send_numbered, when_count, within, Harness};

const RECORDS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_stopped_while_the_cluster_is_away_commits_and_stops() {
    let port = free_port().unwrap();
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap();
    let advertised = proxy.addr();
    let tansu = tokio::task::spawn_blocking(move || Tansu::start_behind(port, advertised))
        .await
        .unwrap();
    let h = Harness::start_at(tansu.bootstrap()).await;
    let topic = h.name("invoices");
    h.topics(&[&topic]).await;
    let instrumenter = h.instrumenter(|b| b);
    let producer = h.producer(&instrumenter);
    send_numbered(&producer, &topic, RECORDS).await;

    // The handler holds the first record until the test lets it go; by then the
    // consumer has fetched the rest.
    let (go, going) = watch::channel(false);
    let count = Arc::new(AtomicUsize::new(0));
    let ledger = Ledger::new();
    for i in 0..RECORDS {
        ledger.sent(i.to_string(), "0");
    }
    let stop = Arc::new(Notify::new());
    let mut config = h.consumer_config();
    // Reconnect soon after the outage, within the final commit's retries.
    config.set("reconnect.backoff.max.ms", "500");
    let consumer = mqtrace_rdkafka::TracedConsumer::from_config(
        &config,
        &[&topic],
        h.producer(&instrumenter),
        instrumenter.clone(),
    )
    .unwrap();
    // The consumer runs on a thread and runtime of its own: were its stop to hang
    // (a blocking commit, a close that never completes), the test fails on time
    // instead of hanging with it.
    let (done, finished) = std::sync::mpsc::channel();
    {
        let (count, stop, ledger) = (Arc::clone(&count), Arc::clone(&stop), ledger.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let stats = runtime.block_on(async move {
                let stats = consumer
                    .run_until(
                        move |record| {
                            let (count, mut going) = (Arc::clone(&count), going.clone());
                            let ledger = ledger.clone();
                            async move {
                                let id: usize = record.json()?;
                                let call = ledger.started(id.to_string());
                                count.fetch_add(1, Ordering::SeqCst);
                                let _ = going.wait_for(|go| *go).await;
                                call.finished(true);
                                HandlerResult::Ok(())
                            }
                        },
                        async move { stop.notified().await },
                    )
                    .await
                    .unwrap();
                drop(consumer);
                stats
            });
            let _ = done.send(stats);
        });
    }
    within(60, when_count(&count, 1)).await;
    // tansu answers a fetch when its wait runs out: give the rest time to arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;

    proxy.set(Mode::Refuse);
    go.send(true).unwrap();
    within(30, when_count(&count, RECORDS)).await;
    // Let the failed commits report back, then stop; the cluster returns while the
    // final commit is being retried.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.notify_one();
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set(Mode::Forward);
    let stats = tokio::task::spawn_blocking(move || finished.recv_timeout(Duration::from_secs(60)))
        .await
        .unwrap()
        .expect("the consumer stopped, and was dropped, within 60 s of being told to");

    let committed = committed_offset(&h, &topic).await;
    // What the group has not committed is waiting: it comes again.
    ledger.committed("0", committed);
    ledger.waiting((committed.max(0)..RECORDS as i64).map(|i| i.to_string()));
    let a = ledger.check("kafka commits during an outage", Contract::ordered());
    println!(
        "kafka commits during an outage: sent {RECORDS}, processed {}, failed commits reported {}, \
         committed offset after the final commit {committed}, waiting {}, lost {}",
        stats.settled,
        stats.settle_failures,
        a.waiting,
        a.lost.len()
    );
    assert_eq!(stats.settled as usize, RECORDS);
    assert_eq!(
        committed, RECORDS as i64,
        "the final commit stored every settled record's progress"
    );
}
