//! The consumer process killed (SIGKILL) after its handler has done a message's
//! work and before the message is deleted. The test binary runs itself again as
//! the consumer; the handler records each id in a file, synced, and holds on the
//! chosen message, where the parent kills it. After the visibility timeout SQS
//! hands the message out again; the next consumer processes it (a duplicate),
//! nothing is lost.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use aws_sdk_sqs::types::QueueAttributeName;
use mqtrace::HandlerResult;
use mqtrace_aws_sqs::{TracedConsumer, TracedSqs};
use mqtrace_testing::delivery::Contract;
use mqtrace_testing::faults::{child_role, record_and_hold, run_and_kill_child, Killed};
use tokio::sync::Notify;

use crate::helpers::{within, Harness};

const TEST: &str = "process_kill::consumer_killed_between_handler_and_delete";
const MESSAGES: usize = 20;
const HOLD_AT: usize = 7;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_killed_between_handler_and_delete() {
    if child_role().is_some() {
        return child().await;
    }
    let h = Harness::start().await;
    let url = h
        .queue(
            "invoices",
            &[(QueueAttributeName::VisibilityTimeout, "2".into())],
        )
        .await;
    let instrumenter = h.instrumenter(|b| b);
    let producer = TracedSqs::new(h.client.clone(), instrumenter.clone());
    for id in 0..MESSAGES {
        producer
            .send(
                h.client
                    .send_message()
                    .queue_url(&url)
                    .message_body(id.to_string()),
            )
            .await
            .unwrap();
    }
    let env = [("MQTRACE_KILL_QUEUE", url.to_owned())];
    let killed =
        tokio::task::spawn_blocking(move || run_and_kill_child(TEST, "sqs-consumer", &env))
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
        TracedConsumer::new(h.client.clone(), &url, &instrumenter)
            .wait_time_seconds(1)
            .run_until(
                move |message| {
                    let (processed, done, seen) =
                        (Arc::clone(&recorder), Arc::clone(&notifier), seen.clone());
                    let ledger = recording.clone();
                    async move {
                        let id: usize = message.json()?;
                        ledger.started(id.to_string()).finished(true);
                        let mut p = processed.lock().unwrap();
                        p.push(id);
                        // Every message seen, and the held one again: it comes back
                        // only after the visibility timeout, maybe after all others.
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
        h.drain(&url)
            .await
            .iter()
            .filter_map(|m| m.body().map(str::to_owned)),
    );
    let a = ledger.check("sqs consumer process killed", Contract::at_least_once());
    println!(
        "sqs consumer process killed before deleting message {held}: sent {MESSAGES}; \
         the killed process did {}, the next consumer {}",
        by_killed.len(),
        after.len(),
    );
    assert_eq!(a.waiting, 0);
    assert_eq!(held, HOLD_AT);
    assert!(
        by_killed.contains(&held),
        "the work was done before the kill"
    );
    assert!(after.contains(&held), "the undeleted message came back");
    assert_eq!(stats.settled as usize, after.len());
}

/// The consumer process: records each id, then holds on [`HOLD_AT`] after its work,
/// before the consumer can delete it, until killed.
async fn child() {
    let var = |k: &str| std::env::var(k).unwrap();
    let url = var("MQTRACE_KILL_QUEUE");
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    TracedConsumer::new(h.client.clone(), &url, &instrumenter)
        .wait_time_seconds(1)
        .run_until(
            move |message| async move {
                let id: usize = message.json()?;
                record_and_hold(id, HOLD_AT).await;
                HandlerResult::Ok(())
            },
            std::future::pending::<()>(),
        )
        .await
        .unwrap();
}
