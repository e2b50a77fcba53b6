//! RabbitMQ stopped and started again while messages are in flight: the consumer
//! reconnects and every message is processed or waiting, none lost.
//!
//! A test binary of its own: cargo runs test binaries one after another, so the
//! restart cannot pull the broker from under the other tests.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

#[path = "all/helpers/mod.rs"]
#[allow(dead_code, unused_imports)]
mod helpers;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::BasicProperties;
use mqtrace::HandlerResult;
use mqtrace_lapin::{QueueSpec, TracedConsumer, TracedPublisher};
use mqtrace_testing::brokers::rabbitmqctl;
use mqtrace_testing::delivery::{Contract, Ledger};

use helpers::{drain, within, Harness};

const MESSAGES: u32 = 80;

/// A `publish_json` body (a number) as the ledger's id.
fn id_of(d: &lapin::message::Delivery) -> String {
    String::from_utf8_lossy(&d.data).into_owned()
}

// RabbitMQ promises no order across a redelivery: in these tests each message
// is its own order scope.

/// One restart at a time: the tests of this binary run side by side otherwise.
static BROKER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_survives_a_broker_restart_and_loses_nothing() {
    let _restart = BROKER.lock().await;
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let queue = QueueSpec::new(h.name("restart")).dead_letter(h.name("r.dlx"), h.name("r.dead"));
    let ledger = Ledger::new();
    {
        let (_connection, channel) = h.channel().await;
        queue.declare(&channel).await.unwrap();
        let publisher = TracedPublisher::new(channel, instrumenter.clone());
        for id in 0..MESSAGES {
            ledger.sent(id.to_string(), id.to_string());
            // Persistent (publish_json): the restart must not lose them.
            let c = publisher
                .publish_json("", queue.name(), &id, BasicProperties::default())
                .await
                .unwrap();
            assert!(c.is_ack());
        }
    }

    let recording = ledger.clone();
    let consumer = TracedConsumer::new(&h.url, queue.clone(), instrumenter)
        .prefetch(5)
        .backoff(Duration::from_millis(100), Duration::from_millis(500));
    // How many were done when the broker went away: the restart must hit
    // mid-stream, not after the end.
    let restarted = Arc::new(Mutex::new(None::<u64>));
    let restart_done = Arc::clone(&restarted);
    let watched = ledger.clone();
    let stats = within(
        120,
        consumer.run_until(
            move |message| {
                let ledger = recording.clone();
                async move {
                    let id: u32 = message.json()?;
                    let call = ledger.started(id.to_string());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    call.finished(true);
                    HandlerResult::Ok(())
                }
            },
            async move {
                let distinct = || watched.accounting().processed;
                while distinct() < 10 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                // Mid-stream: stop the broker's application (closing every
                // connection), wait, and start it again.
                tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]))
                    .await
                    .unwrap();
                *restart_done.lock().unwrap() = Some(distinct());
                tokio::time::sleep(Duration::from_secs(1)).await;
                tokio::task::spawn_blocking(|| {
                    rabbitmqctl(&["start_app"]);
                    rabbitmqctl(&["await_startup"]);
                })
                .await
                .unwrap();
                while distinct() < u64::from(MESSAGES) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        ),
    )
    .await
    .unwrap();
    let done_at_stop = restarted.lock().unwrap().unwrap();
    assert!(
        done_at_stop < u64::from(MESSAGES),
        "the broker stopped after {done_at_stop} messages"
    );
    assert!(stats.connections >= 2, "reconnected: {stats:?}");

    let (_connection, channel) = h.channel().await;
    ledger.waiting(drain(&channel, queue.name()).await.iter().map(id_of));
    ledger.dead_lettered(drain(&channel, &h.name("r.dead")).await.iter().map(id_of));
    let a = ledger.check(
        "rabbitmq broker restart under the consumer",
        Contract::at_least_once(),
    );
    println!(
        "rabbitmq broker restart under the consumer: {done_at_stop} processed when it stopped; \
         connections {}, failed settlements {}",
        stats.connections, stats.settle_failures
    );
    assert_eq!(a.dead_lettered, 0);
}

/// The producer side: publishes go on through a restart. The traced publisher
/// hands lapin's errors back unchanged and marks those `send` spans as errors; the
/// application reconnects and publishes again. Every message ends on the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_through_a_broker_restart_loses_nothing() {
    let _restart = BROKER.lock().await;
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let queue = QueueSpec::new(h.name("publish-restart"));
    let (_connection, channel) = h.channel().await;
    queue.declare(&channel).await.unwrap();
    let mut publisher = TracedPublisher::new(channel, instrumenter.clone());
    let ledger = Ledger::new();
    let mut failed_attempts = 0u32;
    let mut restart = None;
    // Connections opened after the restart, kept open until the test ends.
    let mut connections = Vec::new();
    within(120, async {
        for id in 0..MESSAGES {
            ledger.sent(id.to_string(), id.to_string());
            if id == 20 {
                // Mid-stream: the broker goes away and comes back while we publish.
                restart = Some(tokio::task::spawn_blocking(|| {
                    rabbitmqctl(&["stop_app"]);
                    std::thread::sleep(Duration::from_secs(1));
                    rabbitmqctl(&["start_app"]);
                    rabbitmqctl(&["await_startup"]);
                }));
            }
            loop {
                let sent = publisher
                    .publish_json("", queue.name(), &id, BasicProperties::default())
                    .await;
                if matches!(&sent, Ok(c) if c.is_ack()) {
                    break;
                }
                failed_attempts += 1;
                // Reconnect (the broker may still be starting) and try again.
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Ok(connection) =
                    lapin::Connection::connect(&h.url, lapin::ConnectionProperties::default()).await
                {
                    if let Ok(channel) = connection.create_channel().await {
                        let confirms = channel
                            .confirm_select(lapin::options::ConfirmSelectOptions::default())
                            .await;
                        if confirms.is_ok() {
                            publisher = TracedPublisher::new(channel, instrumenter.clone());
                            connections.push(connection);
                        }
                    }
                }
            }
            // Slower while the restart is under way, so that it happens while
            // messages are still being published, however slow the machine is.
            let restarting = restart.as_ref().is_some_and(|r| !r.is_finished());
            tokio::time::sleep(Duration::from_millis(if restarting { 100 } else { 20 })).await;
        }
    })
    .await;
    if let Some(r) = restart {
        r.await.unwrap();
    }
    assert!(failed_attempts > 0, "the restart happened while publishing");

    let (_connection, channel) = h.channel().await;
    // What the queue holds, read back, is what counts as handled here.
    let stored = drain(&channel, queue.name()).await;
    for d in &stored {
        ledger.started(id_of(d)).finished(true);
    }
    ledger.check(
        "rabbitmq broker restart under the publisher",
        Contract::at_least_once(),
    );
    println!(
        "rabbitmq broker restart under the publisher: failed publish attempts {failed_attempts}, \
         stored {}",
        stored.len()
    );
    // Each failed attempt is an error on its send span.
    let errors = h
        .collector
        .exactly(
            h.guard.provider().unwrap(),
            MESSAGES as usize + failed_attempts as usize,
        )
        .await
        .iter()
        .filter(|s| matches!(s.status, mqtrace_testing::SpanStatus::Error(_)))
        .count();
    assert_eq!(errors, failed_attempts as usize);
}

/// `rabbitmqctl eval` of `expr`, its output trimmed.
fn eval(expr: &str) -> Result<String, String> {
    let ctl =
        std::env::var(mqtrace_testing::brokers::RABBITMQCTL_ENV).map_err(|e| e.to_string())?;
    let out = std::process::Command::new(&ctl)
        .args(["eval", expr])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The node's `consumer_timeout` (ms) and `channel_tick_interval` (ms, how
/// often a channel checks it) set for a test, put back as they were when
/// dropped, on failure too. Both are node-wide and read by each channel as it
/// opens: set them before the consumer connects, and hold [`BROKER`] so that
/// no other test of this binary opens a channel meanwhile.
struct ConsumerTimeout {
    before: Vec<(&'static str, String)>,
}

impl ConsumerTimeout {
    const KEYS: [&'static str; 2] = ["consumer_timeout", "channel_tick_interval"];

    fn set(timeout_ms: u32, tick_ms: u32) -> Self {
        let before = Self::KEYS
            .iter()
            .map(|key| {
                let value = eval(&format!("application:get_env(rabbit, {key}).")).unwrap();
                (*key, value)
            })
            .collect();
        // Restores on drop from here on, should the set below fail half-way.
        let guard = Self { before };
        eval(&format!(
            "application:set_env(rabbit, consumer_timeout, {timeout_ms}), \
             application:set_env(rabbit, channel_tick_interval, {tick_ms})."
        ))
        .unwrap();
        guard
    }

    /// The node's current setting of `key`, as `application:get_env` prints it.
    fn now(key: &str) -> String {
        eval(&format!("application:get_env(rabbit, {key}).")).unwrap()
    }

    /// The value in `{ok,Value}`, if set.
    fn value(printed: &str) -> Option<&str> {
        printed.strip_prefix("{ok,")?.strip_suffix('}')
    }
}

impl Drop for ConsumerTimeout {
    fn drop(&mut self) {
        for (key, before) in &self.before {
            // `{ok,1800000}` back to its value, `undefined` to unset.
            let restore = match Self::value(before) {
                Some(value) => format!("application:set_env(rabbit, {key}, {value})."),
                None => format!("application:unset_env(rabbit, {key})."),
            };
            let restored =
                eval(&restore).and_then(|_| eval(&format!("application:get_env(rabbit, {key}).")));
            if restored.as_deref() != Ok(before.as_str()) {
                let failure = format!(
                    "could not put rabbit's {key} back to {before} ({restored:?}): \
                     restart the test broker"
                );
                // A second panic while a failed test unwinds would abort the
                // binary: say it on stdout then, which the failure shows.
                if std::thread::panicking() {
                    println!("{failure}");
                } else {
                    panic!("{failure}");
                }
            }
        }
    }
}

/// A handler slower than RabbitMQ's `consumer_timeout` (issue 24's slow cell):
/// the broker closes the consumer's channel with a 406 (PRECONDITION_FAILED)
/// while the handler still runs, and requeues every unacknowledged delivery of
/// the channel. The handler finishes, its ack fails on the closed channel, the
/// consumer reconnects and the slow message comes again, flagged redelivered.
/// The deliveries prefetched behind it are handled too once it returns (the
/// consumer takes them from lapin's buffer before it sees the channel gone);
/// their acks fail as well and they come again. Duplicates, nothing lost. The
/// timeout is the node's own (1 s here, checked every 100 ms; RabbitMQ 3.10
/// applies it to classic queues on the channel), put back afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_the_consumer_timeout_loses_nothing() {
    const SLOW: u32 = 1;
    const COUNT: u32 = 5;
    let _node = BROKER.lock().await;
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let dead = h.name("slow.dead");
    let queue = QueueSpec::new(h.name("slow")).dead_letter(h.name("slow.dlx"), &dead);
    let (_connection, channel) = h.channel().await;
    queue.declare(&channel).await.unwrap();
    let ledger = Ledger::new();
    let publisher = TracedPublisher::new(channel.clone(), instrumenter.clone());
    for id in 0..COUNT {
        ledger.sent(id.to_string(), id.to_string());
        let c = publisher
            .publish_json("", queue.name(), &id, BasicProperties::default())
            .await
            .unwrap();
        assert!(c.is_ack());
    }

    // Before the consumer's channel opens: it reads the setting then.
    let _timeout = ConsumerTimeout::set(1_000, 100);
    let setting = ConsumerTimeout::now("consumer_timeout");
    let timeout_ms = ConsumerTimeout::value(&setting).expect("consumer_timeout set");
    // The slow invocation's length, and whether each invocation of the slow
    // message was a redelivery.
    let slow_took = Arc::new(Mutex::new(None::<Duration>));
    let slow_redelivered = Arc::new(Mutex::new(Vec::<bool>::new()));
    let (recording, took, redelivered) = (
        ledger.clone(),
        Arc::clone(&slow_took),
        Arc::clone(&slow_redelivered),
    );
    let watched = ledger.clone();
    let consumer = TracedConsumer::new(&h.url, queue.clone(), instrumenter)
        .backoff(Duration::from_millis(100), Duration::from_millis(500));
    let stats = within(
        60,
        consumer.run_until(
            move |message| {
                let (ledger, took, redelivered) = (
                    recording.clone(),
                    Arc::clone(&took),
                    Arc::clone(&redelivered),
                );
                async move {
                    let id: u32 = message.json()?;
                    let call = ledger.started(id.to_string());
                    if id == SLOW {
                        let first = {
                            let mut seen = redelivered.lock().unwrap();
                            seen.push(message.redelivered());
                            seen.len() == 1
                        };
                        if first {
                            // Three times the timeout, thirty ticks.
                            let start = std::time::Instant::now();
                            tokio::time::sleep(Duration::from_secs(3)).await;
                            *took.lock().unwrap() = Some(start.elapsed());
                        }
                    }
                    call.finished(true);
                    HandlerResult::Ok(())
                }
            },
            async move {
                // Every message done, and the slow one done again (or 15 s
                // gone: the asserts below say what is missing).
                let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
                while (watched.accounting().processed < u64::from(COUNT)
                    || watched.successes(&SLOW.to_string()) < 2)
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        ),
    )
    .await
    .unwrap();

    ledger.waiting(drain(&channel, queue.name()).await.iter().map(id_of));
    ledger.dead_lettered(drain(&channel, &dead).await.iter().map(id_of));
    let a = ledger.check(
        "rabbitmq handler slower than consumer_timeout",
        Contract::at_least_once(),
    );
    let took = slow_took
        .lock()
        .unwrap()
        .expect("the slow handler finished");
    let redelivered = slow_redelivered.lock().unwrap().clone();
    println!(
        "rabbitmq handler slower than consumer_timeout ({timeout_ms} ms): the slow handler took \
         {} ms; invocations of the slow message {} (redelivered: {redelivered:?}); \
         connections {}, failed settlements {}",
        took.as_millis(),
        redelivered.len(),
        stats.connections,
        stats.settle_failures
    );
    // The broker took the delivery back from under the handler: the channel
    // was closed (a new connection), the ack failed, and the message came
    // again as a redelivery.
    assert_eq!(
        redelivered.first(),
        Some(&false),
        "first delivery of the slow message"
    );
    assert_eq!(
        redelivered.get(1),
        Some(&true),
        "the broker redelivered the slow message after its timeout"
    );
    assert!(stats.connections >= 2, "reconnected: {stats:?}");
    assert!(stats.settle_failures >= 1, "the late ack failed: {stats:?}");
    assert!(a.duplicates >= 1, "the slow message was handled twice");
    assert_eq!((a.waiting, a.dead_lettered), (0, 0));
}
