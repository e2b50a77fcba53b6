//! The cluster unreachable while a consumer settles records it had already
//! fetched. Every connection to the broker, the group coordinator's included,
//! goes through a proxy that the test switches to refusing them. The full
//! consumer's commits are librdkafka's own, whose answers reach it as events.
//!
//! - A short outage, and the cluster back while the consumer stops: librdkafka
//!   keeps the commits until the coordinator returns, and the stop waits until
//!   the cluster confirms one covering every settled record (read from the
//!   consumer before it is closed), then the consumer closes in time.
//! - The cluster gone for good: the stop gives up on its bound, and the
//!   consumer's thread, runtime and drop all end promptly (before, a commit on a
//!   blocking thread held the runtime's shutdown, and the drop waited for
//!   librdkafka's close: the thread had not ended a minute after the stop).
//! - An outage longer than the group's session: the commits kept for the
//!   coordinator are answered refused, and counted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqtrace::settle::ConsumerStats;
use mqtrace::HandlerResult;
use mqtrace_testing::delivery::{Contract, Ledger};
use mqtrace_testing::faults::{free_port, Mode, Proxy, Tansu};
use tokio::sync::{oneshot, watch, Notify};

use crate::helpers::{committed_offset, send_numbered, when_count, within, Harness};

const RECORDS: usize = 20;

/// A cluster behind a proxy, a topic of [`RECORDS`] records, and a consumer on
/// a thread and runtime of its own whose handler holds the first record until
/// `go`: were its stop to hang (a blocking commit, a close that never
/// completes), the test fails on time instead of hanging with it.
struct Outage {
    proxy: Proxy,
    // Kept running until the test ends.
    _tansu: Tansu,
    h: Harness,
    topic: String,
    ledger: Ledger,
    count: Arc<AtomicUsize>,
    go: watch::Sender<bool>,
    stop: Arc<Notify>,
    /// When the consumer's thread ended (its runtime and the consumer dropped
    /// or closed), what `run_until` returned, the partition's committed offset
    /// the consumer knew confirmed when it returned, and whether the close
    /// (when asked for) ended in time.
    finished: oneshot::Receiver<Ended>,
}

/// How the consumer's thread ended.
struct Ended {
    at: Instant,
    stats: ConsumerStats,
    confirmed: Option<i64>,
    closed_in_time: bool,
}

impl Outage {
    /// Starts it all; the consumer's thread drops the consumer after the stop,
    /// or closes it waiting up to `close_within`.
    async fn start(session_timeout_ms: u64, close_within: Option<Duration>) -> Self {
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

        let (go, going) = watch::channel(false);
        let count = Arc::new(AtomicUsize::new(0));
        let ledger = Ledger::new();
        for i in 0..RECORDS {
            ledger.sent(i.to_string(), "0");
        }
        let stop = Arc::new(Notify::new());
        let mut config = h.consumer_config();
        // Reconnect soon after the outage. librdkafka keeps a commit that finds
        // no coordinator for `session.timeout.ms`, then answers it refused.
        config
            .set("reconnect.backoff.max.ms", "500")
            .set("session.timeout.ms", session_timeout_ms.to_string());
        let consumer = h.consumer_with(&config, &[&topic], &instrumenter);
        let (done, finished) = oneshot::channel();
        {
            let (count, stop, ledger) = (Arc::clone(&count), Arc::clone(&stop), ledger.clone());
            let partition = topic.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let (stats, confirmed, closed_in_time) = runtime.block_on(async move {
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
                    let confirmed = rdkafka::consumer::Consumer::context(consumer.inner())
                        .committed(&partition, 0);
                    let closed_in_time = match close_within {
                        Some(within) => consumer.close(within).await,
                        None => {
                            drop(consumer);
                            true
                        }
                    };
                    (stats, confirmed, closed_in_time)
                });
                drop(runtime);
                let _ = done.send(Ended {
                    at: Instant::now(),
                    stats,
                    confirmed,
                    closed_in_time,
                });
            });
        }
        within(60, when_count(&count, 1)).await;
        // tansu answers a fetch when its wait runs out: give the rest time to arrive.
        tokio::time::sleep(Duration::from_secs(2)).await;
        Self {
            proxy,
            _tansu: tansu,
            h,
            topic,
            ledger,
            count,
            go,
            stop,
            finished,
        }
    }

    /// Cuts the cluster off, then lets the handler go: every record is settled
    /// during the outage, and their commits are refused for `refused`.
    async fn settle_during_outage(&self, refused: Duration) {
        self.proxy.set(Mode::Refuse);
        self.go.send(true).unwrap();
        within(30, when_count(&self.count, RECORDS)).await;
        tokio::time::sleep(refused).await;
    }

    /// Tells the consumer to stop; returns when it was told.
    fn stop(&self) -> Instant {
        self.stop.notify_one();
        Instant::now()
    }

    /// Waits for the consumer's thread to end.
    async fn finished(&mut self) -> Ended {
        tokio::time::timeout(Duration::from_secs(60), &mut self.finished)
            .await
            .expect("the consumer stopped, and was dropped, within 60 s of being told to")
            .expect("the consumer's thread reports its end")
    }

    /// The group's committed offset goes into the ledger, what it has not
    /// committed is waiting (the group reads it again), and the ledger is
    /// checked (its line printed). Returns the offset.
    async fn account(&self, label: &str) -> i64 {
        let committed = committed_offset(&self.h, &self.topic).await;
        self.ledger.committed("0", committed);
        self.ledger
            .waiting((committed.max(0)..RECORDS as i64).map(|i| i.to_string()));
        self.ledger.check(label, Contract::ordered());
        committed
    }
}

/// An outage shorter than the group's session: librdkafka keeps the commits
/// until the coordinator is back rather than refuse them, and the stop waits for
/// the one the cluster confirms. (It passed before too: the regression guard.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_stopped_while_the_cluster_is_away_commits_and_stops() {
    let mut outage = Outage::start(6_000, Some(Duration::from_secs(10))).await;
    outage.settle_during_outage(Duration::from_secs(2)).await;
    // The cluster returns while the stop waits for a confirmed commit.
    let _ = outage.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    outage.proxy.set(Mode::Forward);
    let Ended {
        stats,
        confirmed,
        closed_in_time,
        ..
    } = outage.finished().await;

    let committed = outage.account("kafka commits during an outage").await;
    println!(
        "kafka commits during an outage: failed commits reported {}, committed offset after \
         the stop {committed} (the checker's line above has the messages)",
        stats.settle_failures
    );
    assert_eq!(stats.settled as usize, RECORDS);
    assert_eq!(
        confirmed,
        Some(RECORDS as i64),
        "the stop returned once the cluster had confirmed every settled record's commit"
    );
    assert!(closed_in_time, "the consumer closed within 10 s");
    assert_eq!(
        committed, RECORDS as i64,
        "the commit kept through the outage stored every settled record's progress"
    );
}

/// The cluster gone for good, and the consumer told to stop while it still
/// holds its partition: the stop waits its bound for a confirmed commit, and
/// the consumer's thread ends soon after the bound. Before, it had not ended a
/// minute later: the runtime's shutdown waited for the synchronous commit on
/// its blocking thread, and the drop for librdkafka's close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_stopped_with_the_cluster_gone_returns_promptly() {
    let mut outage = Outage::start(6_000, None).await;
    outage.settle_during_outage(Duration::from_secs(2)).await;
    let told = outage.stop();
    let Ended { at, stats, .. } = outage.finished().await;
    let took = at.duration_since(told);
    // The cluster back, for the count only: what the group committed (the
    // closing consumer may still get its last commit through now, or not: the
    // ledger holds either way).
    outage.proxy.set(Mode::Forward);
    let committed = outage.account("kafka stop with the cluster gone").await;
    println!(
        "kafka stop with the cluster gone: the consumer's thread ended {took:?} after the stop; \
         failed commits reported {}, committed offset {committed}",
        stats.settle_failures
    );
    assert_eq!(stats.settled as usize, RECORDS);
    assert!(
        took < Duration::from_secs(8),
        "run_until gives up within its 5 s bound, and neither the runtime nor the drop waits \
         for the absent coordinator: {took:?}"
    );
}

/// An outage longer than the group's session (3 s), the consumer running
/// through it: librdkafka answers the commits it kept waiting for the
/// coordinator as refused once the session is over, and the consumer counts
/// them. The partition is lost with the session, so the records whose commits
/// were refused wait for the group, and the stop does not wait for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_refused_in_a_long_outage_are_reported() {
    let mut outage = Outage::start(3_000, None).await;
    outage.settle_during_outage(Duration::from_secs(5)).await;
    let _ = outage.stop();
    let Ended { stats, .. } = outage.finished().await;
    outage.proxy.set(Mode::Forward);
    let committed = outage
        .account("kafka commits refused in a long outage")
        .await;
    println!(
        "kafka commits refused in a long outage: failed commits reported {}, committed offset \
         {committed}",
        stats.settle_failures
    );
    assert_eq!(stats.settled as usize, RECORDS);
    assert!(
        stats.settle_failures >= 1,
        "the commits refused during the outage are reported"
    );
}
