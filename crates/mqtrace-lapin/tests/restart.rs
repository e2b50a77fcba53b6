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

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::BasicProperties;
use mqtrace::HandlerResult;
use mqtrace_lapin::{QueueSpec, TracedConsumer, TracedPublisher};
use mqtrace_testing::brokers::rabbitmqctl;

use helpers::{drain, within, Harness};

const MESSAGES: u32 = 80;

/// One restart at a time: the tests of this binary run side by side otherwise.
static BROKER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_survives_a_broker_restart_and_loses_nothing() {
    let _restart = BROKER.lock().await;
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let queue = QueueSpec::new(h.name("restart")).dead_letter(h.name("r.dlx"), h.name("r.dead"));
    {
        let (_connection, channel) = h.channel().await;
        queue.declare(&channel).await.unwrap();
        let publisher = TracedPublisher::new(channel, instrumenter.clone());
        for id in 0..MESSAGES {
            // Persistent (publish_json): the restart must not lose them.
            let c = publisher
                .publish_json("", queue.name(), &id, BasicProperties::default())
                .await
                .unwrap();
            assert!(c.is_ack());
        }
    }

    let processed = Arc::new(Mutex::new(Vec::<u32>::new()));
    let seen = Arc::clone(&processed);
    let consumer = TracedConsumer::new(&h.url, queue.clone(), instrumenter)
        .prefetch(5)
        .backoff(Duration::from_millis(100), Duration::from_millis(500));
    // How many were done when the broker went away: the restart must hit
    // mid-stream, not after the end.
    let restarted = Arc::new(Mutex::new(None::<usize>));
    let restart_done = Arc::clone(&restarted);
    let watched = Arc::clone(&processed);
    let stats = within(
        120,
        consumer.run_until(
            move |message| {
                let seen = Arc::clone(&seen);
                async move {
                    let id: u32 = message.json()?;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    seen.lock().unwrap().push(id);
                    HandlerResult::Ok(())
                }
            },
            async move {
                let distinct = || {
                    watched
                        .lock()
                        .unwrap()
                        .iter()
                        .collect::<BTreeSet<_>>()
                        .len()
                };
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
                while distinct() < MESSAGES as usize {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        ),
    )
    .await
    .unwrap();
    let done_at_stop = restarted.lock().unwrap().unwrap();
    assert!(
        done_at_stop < MESSAGES as usize,
        "the broker stopped after {done_at_stop} messages"
    );
    assert!(stats.connections >= 2, "reconnected: {stats:?}");

    let (_connection, channel) = h.channel().await;
    let waiting: Vec<u32> = drain(&channel, queue.name())
        .await
        .iter()
        .map(|d| serde_json::from_slice(&d.data).unwrap())
        .collect();
    let dead = drain(&channel, &h.name("r.dead")).await.len();
    let processed = processed.lock().unwrap().clone();
    let accounted: BTreeSet<u32> = processed.iter().chain(&waiting).copied().collect();
    let lost = (0..MESSAGES).filter(|id| !accounted.contains(id)).count();
    println!(
        "rabbitmq restart: sent {MESSAGES}, {done_at_stop} done when it stopped; processed {} ({} duplicates), waiting {}, dead-lettered {dead}, lost {lost}",
        processed.len(),
        processed.len() - processed.iter().collect::<BTreeSet<_>>().len(),
        waiting.len(),
    );
    assert_eq!(lost, 0);
    assert_eq!(dead, 0);
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
    let mut failed_attempts = 0u32;
    let mut restart = None;
    // Connections opened after the restart, kept open until the test ends.
    let mut connections = Vec::new();
    within(120, async {
        for id in 0..MESSAGES {
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
    let stored: BTreeSet<u32> = drain(&channel, queue.name())
        .await
        .iter()
        .map(|d| serde_json::from_slice(&d.data).unwrap())
        .collect();
    let lost = (0..MESSAGES).filter(|id| !stored.contains(id)).count();
    println!(
        "rabbitmq restart while publishing: sent {MESSAGES}, failed attempts {failed_attempts}, stored {}, lost {lost}",
        stored.len()
    );
    assert_eq!(lost, 0);
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
