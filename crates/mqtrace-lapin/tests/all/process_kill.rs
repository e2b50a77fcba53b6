//! The consumer process killed (SIGKILL) after its handler has done a message's
//! work and before the message is acknowledged. The test binary runs itself again
//! as the consumer; the handler records each id in a file, synced, and holds on the
//! chosen message, where the parent kills it. RabbitMQ requeues what the dead
//! connection had not acknowledged; the next consumer processes it again (a
//! duplicate), nothing is lost.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use lapin::BasicProperties;
use mqtrace::HandlerResult;
use mqtrace_lapin::{QueueSpec, TracedConsumer, TracedPublisher};
use mqtrace_testing::delivery::Contract;
use mqtrace_testing::faults::{child_role, record_and_hold, run_and_kill_child, Killed};
use tokio::sync::Notify;

use crate::helpers::{drain, within, Harness};

const TEST: &str = "process_kill::consumer_killed_between_handler_and_ack";
const MESSAGES: usize = 20;
const HOLD_AT: usize = 7;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_killed_between_handler_and_ack() {
    if child_role().is_some() {
        return child().await;
    }
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let queue = QueueSpec::new(h.name("invoices"));
    let (_connection, channel) = h.channel().await;
    queue.declare(&channel).await.unwrap();
    let publisher = TracedPublisher::new(channel.clone(), instrumenter.clone());
    for id in 0..MESSAGES {
        let c = publisher
            .publish_json("", queue.name(), &id, BasicProperties::default())
            .await
            .unwrap();
        assert!(c.is_ack());
    }
    let env = [("MQTRACE_KILL_QUEUE", queue.name().to_owned())];
    let killed =
        tokio::task::spawn_blocking(move || run_and_kill_child(TEST, "rabbitmq-consumer", &env))
            .await
            .unwrap();
    // No order is promised here: each message is its own scope.
    let ledger = killed.ledger(0..MESSAGES, |id| id.to_string());
    let Killed {
        held,
        done: by_killed,
    } = killed;

    let processed = Arc::new(Mutex::new(Vec::<usize>::new()));
    let done = Arc::new(Notify::new());
    let seen: BTreeSet<usize> = by_killed.iter().copied().collect();
    let (recorder, notifier, recording) =
        (Arc::clone(&processed), Arc::clone(&done), ledger.clone());
    let stats = within(
        60,
        TracedConsumer::new(&h.url, queue.clone(), instrumenter).run_until(
            move |message| {
                let (processed, done, seen) =
                    (Arc::clone(&recorder), Arc::clone(&notifier), seen.clone());
                let ledger = recording.clone();
                async move {
                    let id: usize = message.json()?;
                    ledger.started(id.to_string()).finished(true);
                    let mut p = processed.lock().unwrap();
                    p.push(id);
                    // Every message seen, and the held one again.
                    if p.iter().chain(&seen).collect::<BTreeSet<_>>().len() == MESSAGES
                        && p.contains(&held)
                    {
                        done.notify_one();
                    }
                    HandlerResult::Ok(())
                }
            },
            async move { done.notified().await },
        ),
    )
    .await
    .unwrap();
    let after = processed.lock().unwrap().clone();
    ledger.waiting(
        drain(&channel, queue.name())
            .await
            .iter()
            .map(|d| String::from_utf8_lossy(&d.data).into_owned()),
    );
    let a = ledger.check(
        "rabbitmq consumer process killed",
        Contract::at_least_once(),
    );
    println!(
        "rabbitmq consumer process killed before acknowledging message {held}: sent {}; \
         the killed process did {}, the next consumer {}",
        a.sent,
        by_killed.len(),
        after.len(),
    );
    assert_eq!(a.waiting, 0);
    assert_eq!(held, HOLD_AT);
    assert!(
        by_killed.contains(&held),
        "the work was done before the kill"
    );
    assert!(
        after.contains(&held),
        "the unacknowledged message came back"
    );
    assert_eq!(stats.settled as usize, after.len());
}

/// The consumer process: records each id, then holds on [`HOLD_AT`] after its work,
/// before the consumer can acknowledge it, until killed.
async fn child() {
    let var = |k: &str| std::env::var(k).unwrap();
    let queue = var("MQTRACE_KILL_QUEUE");
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let _ = TracedConsumer::new(&h.url, QueueSpec::new(queue), instrumenter)
        .prefetch(5)
        .run_until(
            move |message| async move {
                let id: usize = message.json()?;
                record_and_hold(id, HOLD_AT).await;
                HandlerResult::Ok(())
            },
            std::future::pending::<()>(),
        )
        .await;
}
