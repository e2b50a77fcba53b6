//! The delivery contract on the embedded broker, over random schedules: proptest
//! draws each message's handler outcomes (success, transient or permanent
//! failure, panic, slow), the consumer's concurrency, the retry budget, and the
//! faults (the retry or dead-letter queue missing, the consumer stopped in the
//! middle and a new one taking over), then the delivery ledger checks the run:
//! every message processed, dead-lettered or still waiting (so none was acked or
//! rejected without its handler succeeding or its copy being stored); nothing
//! dead-lettered where the dead-letter queue is missing; no duplicates without a
//! stop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use mqtrace::embedded::{Broker, Message, QueueOptions, StoredMessage, TracedConsumer};
use mqtrace::{HandlerError, HandlerResult, Instrumenter, RetryPolicy};
use mqtrace_testing::delivery::{Contract, Ledger};
use proptest::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Slow,
    Transient,
    Permanent,
    Panic,
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        4 => Just(Outcome::Ok),
        2 => Just(Outcome::Slow),
        3 => Just(Outcome::Transient),
        1 => Just(Outcome::Permanent),
        1 => Just(Outcome::Panic),
    ]
}

#[derive(Debug, Clone)]
struct Schedule {
    /// Per message, the outcome of each invocation in turn; success after.
    messages: Vec<Vec<Outcome>>,
    concurrency: usize,
    attempts: u32,
    /// Retries go through a queue of their own, which may be missing.
    retry_queue: Option<bool>,
    /// The dead-letter queue is declared (else a dead letter's forward fails).
    dead_letter_declared: bool,
    /// The first consumer stops after this many invocations.
    stop_after: Option<usize>,
}

fn schedule() -> impl Strategy<Value = Schedule> {
    (
        prop::collection::vec(prop::collection::vec(outcome(), 0..4), 1..16),
        1usize..5,
        1u32..4,
        prop::option::of(any::<bool>()),
        any::<bool>(),
        prop::option::of(1usize..20),
    )
        .prop_map(
            |(messages, concurrency, attempts, retry_queue, dead_letter_declared, stop_after)| {
                Schedule {
                    messages,
                    concurrency,
                    attempts,
                    retry_queue,
                    dead_letter_declared,
                    stop_after,
                }
            },
        )
}

/// What the handler of a run shares: the schedule, invocations so far.
#[derive(Clone)]
struct Handler {
    ledger: Ledger,
    plan: Arc<Vec<Vec<Outcome>>>,
    calls: Arc<Mutex<HashMap<usize, usize>>>,
    total: Arc<std::sync::atomic::AtomicUsize>,
}

impl Handler {
    fn call(&self, m: &StoredMessage) -> impl std::future::Future<Output = HandlerResult> {
        let id: usize = std::str::from_utf8(&m.body)
            .ok()
            .and_then(|b| b.parse().ok())
            .unwrap_or(usize::MAX);
        let n = {
            let mut calls = self.calls.lock().unwrap();
            let n = calls.entry(id).or_default();
            *n += 1;
            *n - 1
        };
        self.total.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let outcome = self
            .plan
            .get(id)
            .and_then(|p| p.get(n))
            .copied()
            .unwrap_or(Outcome::Ok);
        let call = self.ledger.started(id.to_string());
        async move {
            match outcome {
                Outcome::Slow => {
                    for _ in 0..3 {
                        tokio::task::yield_now().await;
                    }
                    call.finished(true);
                    Ok(())
                }
                Outcome::Ok => {
                    call.finished(true);
                    Ok(())
                }
                Outcome::Transient => {
                    call.finished(false);
                    Err(HandlerError::transient("flaky"))
                }
                Outcome::Permanent => {
                    call.finished(false);
                    Err(HandlerError::permanent("bad"))
                }
                Outcome::Panic => {
                    call.finished(false);
                    panic!("handler panicked on purpose")
                }
            }
        }
    }
}

fn ids(messages: Vec<mqtrace::embedded::StoredMessage>) -> Vec<String> {
    messages
        .into_iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect()
}

/// Runs a schedule through the delivery checker; `label` prints its accounting
/// line (a fixed schedule), none checks silently (the thousand random ones).
async fn run(s: Schedule, label: Option<&str>) -> mqtrace_testing::delivery::Accounting {
    let broker = Broker::new();
    broker.declare_queue("work", QueueOptions::default().dead_letter("work.dlq"));
    if s.dead_letter_declared {
        broker.declare_queue("work.dlq", QueueOptions::default());
    }
    if s.retry_queue == Some(true) {
        broker.declare_queue(
            "work.retry",
            QueueOptions::default().dead_letter("work.dlq"),
        );
    }
    let ledger = Ledger::new();
    for i in 0..s.messages.len() {
        broker
            .publish("work", Message::new(Bytes::from(i.to_string())))
            .unwrap();
        // The embedded broker promises no order: each message is its own scope.
        ledger.sent(i.to_string(), i.to_string());
    }
    let instrumenter = Instrumenter::builder()
        .retry_policy(RetryPolicy::attempts(s.attempts))
        .build();
    let mut consumer = TracedConsumer::new(broker.clone(), "work", instrumenter);
    if s.retry_queue.is_some() {
        consumer = consumer.retry_queue("work.retry");
    }
    let handler = Handler {
        ledger: ledger.clone(),
        plan: Arc::new(s.messages.clone()),
        calls: Arc::default(),
        total: Arc::default(),
    };
    // The first consumer, stopped after `stop_after` invocations (its deliveries
    // in flight dropped unsettled), then consumers until the queues are idle.
    if let Some(stop) = s.stop_after {
        let total = Arc::clone(&handler.total);
        let h = handler.clone();
        let first = consumer.run_concurrent(s.concurrency, move |m| h.call(&m));
        tokio::select! {
            _ = first => {}
            () = async {
                while total.load(std::sync::atomic::Ordering::SeqCst) < stop {
                    tokio::task::yield_now().await;
                }
            } => {}
        }
    }
    // Each pass ends when its queue is idle; a forward that failed requeued its
    // message, and each schedule ends in success, so a few passes drain it.
    for _ in 0..64 {
        let h = handler.clone();
        consumer
            .run_concurrent(s.concurrency, move |m| h.call(&m))
            .await
            .unwrap();
        if s.retry_queue == Some(true) {
            let h = handler.clone();
            TracedConsumer::new(
                broker.clone(),
                "work.retry",
                Instrumenter::builder()
                    .retry_policy(RetryPolicy::attempts(s.attempts))
                    .build(),
            )
            .retry_queue("work.retry")
            .run_concurrent(s.concurrency, move |m| h.call(&m))
            .await
            .unwrap();
        }
        // Deliveries of the stopped consumer's tasks go back to the queue when
        // the runtime drops those tasks: wait for them too.
        let depth = |q: &str| broker.depth(q).map_or(0, |d| d.ready + d.unacked);
        let mut outstanding = depth("work") + depth("work.retry");
        for _ in 0..100 {
            if broker.depth("work").map_or(0, |d| d.unacked) == 0 {
                break;
            }
            tokio::task::yield_now().await;
            outstanding = depth("work") + depth("work.retry");
        }
        if outstanding == 0 {
            break;
        }
    }
    ledger.waiting(ids(broker.drain("work").unwrap()));
    if s.retry_queue == Some(true) {
        ledger.waiting(ids(broker.drain("work.retry").unwrap()));
    }
    if s.dead_letter_declared {
        ledger.dead_lettered(ids(broker.drain("work.dlq").unwrap()));
    }
    let contract = if s.stop_after.is_some() {
        Contract::at_least_once()
    } else {
        Contract::at_least_once().duplicates(0)
    };
    match label {
        Some(label) => ledger.check(label, contract),
        None => ledger.verify(&format!("embedded {s:?}"), contract),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    /// Random schedules over the embedded broker's full consumer: nothing lost,
    /// no duplicates unless a consumer was stopped mid-flight.
    #[test]
    fn random_schedules_keep_the_delivery_contract(s in schedule()) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let a = runtime.block_on(run(s.clone(), None));
        prop_assert!(a.lost.is_empty());
        // Where the dead-letter queue is missing, nothing is dead-lettered: the
        // messages a dead letter could not reach are handled again instead.
        if !s.dead_letter_declared {
            prop_assert_eq!(a.dead_lettered, 0);
        }
    }
}

/// One fixed schedule with every handler behaviour (fast, slow, transient,
/// permanent, panicking), concurrent handlers, the retry queue and the
/// dead-letter queue in place, and the first consumer stopped mid-flight: the
/// embedded broker's line of the delivery matrix, printed.
#[tokio::test]
async fn a_schedule_with_every_behaviour_prints_its_accounting() {
    use Outcome::{Ok, Panic, Permanent, Slow, Transient};
    let s = Schedule {
        messages: vec![
            vec![],
            vec![Slow],
            vec![Transient],
            vec![Permanent],
            vec![Panic],
            vec![Transient, Transient, Transient],
            vec![Ok],
            vec![Slow, Transient],
        ],
        concurrency: 3,
        attempts: 3,
        retry_queue: Some(true),
        dead_letter_declared: true,
        stop_after: Some(4),
    };
    let a = run(s, Some("embedded, every behaviour, stopped mid-flight")).await;
    // Message 3 fails permanently; message 5 spends its three attempts.
    assert_eq!(a.dead_lettered, 2);
    assert_eq!(a.processed + a.dead_lettered + a.waiting, 8);
}
