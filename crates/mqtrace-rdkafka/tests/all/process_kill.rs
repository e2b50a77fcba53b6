//! The consumer process killed (SIGKILL) after its handler has done a record's
//! work and before the offset is committed. The test binary runs itself again as
//! the consumer; the handler records each id in a file, synced, and holds on the
//! chosen record, where the parent kills it. A consumer in the same group then takes
//! over: the held record is processed again (a duplicate), none is lost, and
//! the partition's order holds (the delivery checker's line).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use mqtrace::HandlerResult;
use mqtrace_rdkafka::TracedConsumer;
use mqtrace_testing::delivery::Contract;
use mqtrace_testing::faults::{child_role, record_and_hold, run_and_kill_child, Killed};
use tokio::sync::Notify;

use crate::helpers::{committed_offset, send_numbered, within, Harness};

const TEST: &str = "process_kill::consumer_killed_between_handler_and_commit";
const RECORDS: usize = 20;
const HOLD_AT: usize = 7;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_killed_between_handler_and_commit() {
    if child_role().is_some() {
        return child().await;
    }
    let h = Harness::start().await;
    let topic = h.name("invoices");
    h.topics(&[&topic]).await;
    let instrumenter = h.instrumenter(|b| b);
    let producer = h.producer(&instrumenter);
    send_numbered(&producer, &topic, RECORDS).await;
    let group = h.name("group");
    let env = [
        ("MQTRACE_KILL_TOPIC", topic.to_owned()),
        ("MQTRACE_KILL_GROUP", group.to_owned()),
    ];
    let killed =
        tokio::task::spawn_blocking(move || run_and_kill_child(TEST, "kafka-consumer", &env))
            .await
            .unwrap();
    let ledger = killed.ledger(0..RECORDS, |_| "0".to_owned());
    let Killed {
        held,
        done: by_killed,
    } = killed;
    // The group's next consumer (same group id as the child's).
    let processed = Arc::new(Mutex::new(Vec::<usize>::new()));
    let done = Arc::new(Notify::new());
    let seen = by_killed.iter().copied().collect::<BTreeSet<_>>();
    let stats = {
        let (processed, notifier, ledger) =
            (Arc::clone(&processed), Arc::clone(&done), ledger.clone());
        let consumer = h.consumer(&[&topic], &instrumenter);
        within(
            90,
            consumer.run_until(
                move |record| {
                    let (processed, done, seen) =
                        (Arc::clone(&processed), Arc::clone(&notifier), seen.clone());
                    let ledger = ledger.clone();
                    async move {
                        let id: usize = record.json()?;
                        ledger.started(id.to_string()).finished(true);
                        let mut p = processed.lock().unwrap();
                        p.push(id);
                        let all: BTreeSet<usize> = p.iter().chain(&seen).copied().collect();
                        // Every record seen, and the held one again.
                        if all.len() == RECORDS && p.contains(&held) {
                            done.notify_one();
                        }
                        HandlerResult::Ok(())
                    }
                },
                async move { done.notified().await },
            ),
        )
        .await
        .unwrap()
    };
    let after = processed.lock().unwrap().clone();
    let committed = committed_offset(&h, &topic).await;
    ledger.committed("0", committed);
    ledger.waiting((committed.max(0)..RECORDS as i64).map(|i| i.to_string()));
    let a = ledger.check("kafka consumer process killed", Contract::ordered());
    println!(
        "kafka consumer process killed before committing record {held}: sent {RECORDS}; \
         the killed process did {}, the next consumer {} ({} duplicates), waiting {}, \
         dead-lettered {}, lost {}",
        by_killed.len(),
        after.len(),
        a.duplicates,
        a.waiting,
        a.dead_lettered,
        a.lost.len()
    );
    assert_eq!(a.waiting, 0);
    assert_eq!(held, HOLD_AT);
    assert!(
        by_killed.contains(&held),
        "the work was done before the kill"
    );
    assert!(after.contains(&held), "the uncommitted record came back");
    assert_eq!(stats.settled as usize, after.len());
}

/// The consumer process: records each id, then holds on [`HOLD_AT`] after its work,
/// before the consumer can commit it, until killed.
async fn child() {
    let var = |k: &str| std::env::var(k).unwrap();
    let (topic, group) = (var("MQTRACE_KILL_TOPIC"), var("MQTRACE_KILL_GROUP"));
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let mut config = h.consumer_config();
    config.set("group.id", &group);
    let consumer =
        TracedConsumer::from_config(&config, &[&topic], h.producer(&instrumenter), instrumenter)
            .unwrap();
    consumer
        .run_until(
            move |record| async move {
                let id: usize = record.json()?;
                record_and_hold(id, HOLD_AT).await;
                HandlerResult::Ok(())
            },
            std::future::pending::<()>(),
        )
        .await
        .unwrap();
}
