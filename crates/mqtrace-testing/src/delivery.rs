//! The delivery-guarantee checker: a ledger of what happened to every message of a
//! run, and the contract it is checked against.
//!
//! A test records each message it sends ([`Ledger::sent`], with the scope in
//! which the broker keeps order: a Kafka partition, an SQS FIFO group), each
//! handler invocation ([`Ledger::started`], then [`Invocation::finished`]), each
//! settlement the test can see ([`Ledger::settled`]), each committed offset
//! ([`Ledger::committed`]), and at the end where the messages are: still on the
//! broker ([`Ledger::waiting`]) or in the dead-letter destination
//! ([`Ledger::dead_lettered`]). [`Ledger::check`] then asserts the contract and
//! prints the run's accounting line:
//!
//! - **nothing lost**: every message sent was handled successfully, found in the
//!   dead-letter destination, or found still waiting on the broker;
//! - **no dead letter unhandled**: every message found in the dead-letter
//!   destination had at least one handler invocation (a dead letter the handler
//!   never saw was not given its attempts);
//! - **nothing settled early**: no message was settled (acked, committed,
//!   deleted) by the test's own loop before a handler invocation of it had
//!   succeeded, unless it was settled as a forward (a retry or dead letter the
//!   broker accepted);
//! - **order** within each order scope: a message never first succeeds before an
//!   earlier message of its scope (not dead-lettered) first succeeds or has its
//!   retry copy forwarded ([`Settled::Forwarded`]: the copy goes to the tail,
//!   where the broker's order promise ends);
//! - **offsets never backwards**, per partition;
//! - **duplicates** (successful invocations beyond the first) within the bound
//!   the contract allows.
//!
//! Events are ordered by one counter, not by clocks, so the order checks hold on
//! a loaded machine.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// How a test saw a message settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Acked, committed past, or deleted after its handler.
    Done,
    /// Acked after a copy (a retry or dead letter) was accepted by the broker.
    Forwarded,
}

/// What a run may show and still keep the broker's contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contract {
    /// Successful invocations beyond the first, in all (at-least-once allows
    /// some after a fault; `None`: any number).
    pub max_duplicates: Option<u64>,
    /// Whether order within a scope is promised (a Kafka partition, an SQS
    /// FIFO group).
    pub ordered: bool,
}

impl Contract {
    /// At-least-once, no order promised, any number of duplicates.
    pub fn at_least_once() -> Self {
        Self {
            max_duplicates: None,
            ordered: false,
        }
    }

    /// At-least-once with order kept within each scope.
    pub fn ordered() -> Self {
        Self {
            max_duplicates: None,
            ordered: true,
        }
    }

    /// At most `n` duplicates.
    pub fn duplicates(mut self, n: u64) -> Self {
        self.max_duplicates = Some(n);
        self
    }
}

/// A run's figures, as [`Ledger::check`] computed them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accounting {
    /// Messages sent.
    pub sent: u64,
    /// Messages handled successfully at least once.
    pub processed: u64,
    /// Successful invocations beyond each message's first.
    pub duplicates: u64,
    /// Failed invocations (each retried, dead-lettered or waiting).
    pub failed_attempts: u64,
    /// Messages found still on the broker at the end.
    pub waiting: u64,
    /// Messages found in the dead-letter destination.
    pub dead_lettered: u64,
    /// Messages sent and found nowhere.
    pub lost: Vec<String>,
    /// Messages settled by the test's loop before any invocation succeeded.
    pub settled_early: Vec<String>,
    /// Messages found in the dead-letter destination that no invocation handled.
    pub dead_unhandled: Vec<String>,
    /// Pairs (earlier, later) of one scope where the later succeeded first.
    pub reordered: Vec<(String, String)>,
    /// Commits below an earlier commit of the same partition: (partition, from, to).
    pub backwards: Vec<(String, i64, i64)>,
}

impl fmt::Display for Accounting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent {}, processed {} ({} duplicates), failed attempts {}, waiting {}, \
             dead-lettered {}, lost {}, settled early {}, reordered {}, backwards {}",
            self.sent,
            self.processed,
            self.duplicates,
            self.failed_attempts,
            self.waiting,
            self.dead_lettered,
            self.lost.len(),
            self.settled_early.len(),
            self.reordered.len(),
            self.backwards.len()
        )
    }
}

#[derive(Debug, Default)]
struct Message {
    scope: String,
    /// Position in its scope's send order.
    position: u64,
    /// Invocations started, finished or not.
    started: u64,
    successes: Vec<u64>,
    failures: u64,
    settled: Vec<(u64, Settled)>,
}

#[derive(Debug, Default)]
struct Inner {
    messages: BTreeMap<String, Message>,
    scopes: BTreeMap<String, u64>,
    unknown: BTreeSet<String>,
    waiting: BTreeSet<String>,
    dead: BTreeSet<String>,
    commits: BTreeMap<String, Vec<i64>>,
}

/// A message in its scope: send position, id, first success.
type InScope<'a> = (u64, &'a str, Option<u64>);

/// The record of one run; cheap to clone, clones record together.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    inner: Arc<Mutex<Inner>>,
    clock: Arc<AtomicU64>,
}

/// One handler invocation, from its start until [`Invocation::finished`].
#[derive(Debug)]
#[must_use = "say how the invocation finished"]
pub struct Invocation {
    ledger: Ledger,
    id: String,
}

impl Invocation {
    /// The handler returned: `ok` when it succeeded.
    pub fn finished(self, ok: bool) {
        let at = self.ledger.tick();
        let mut inner = self.ledger.lock();
        match inner.messages.get_mut(&self.id) {
            Some(m) if ok => m.successes.push(at),
            Some(m) => m.failures += 1,
            None => {
                inner.unknown.insert(self.id);
            }
        }
    }
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    /// A message was sent (accepted by the broker), in `scope`'s order (use one
    /// scope, say `""`, where the broker keeps no order).
    pub fn sent(&self, id: impl Into<String>, scope: impl Into<String>) {
        let scope = scope.into();
        let mut inner = self.lock();
        let next = inner.scopes.entry(scope.clone()).or_default();
        let position = *next;
        *next += 1;
        inner.messages.insert(
            id.into(),
            Message {
                scope,
                position,
                ..Message::default()
            },
        );
    }

    /// A handler invocation of `id` starts.
    pub fn started(&self, id: impl Into<String>) -> Invocation {
        self.tick();
        let id = id.into();
        if let Some(m) = self.lock().messages.get_mut(&id) {
            m.started += 1;
        }
        Invocation {
            ledger: self.clone(),
            id,
        }
    }

    /// The test's loop settled `id` at the broker.
    pub fn settled(&self, id: &str, how: Settled) {
        let at = self.tick();
        let mut inner = self.lock();
        match inner.messages.get_mut(id) {
            Some(m) => m.settled.push((at, how)),
            None => {
                inner.unknown.insert(id.to_owned());
            }
        }
    }

    /// An offset commit of `partition` up to `offset` (the next to read).
    pub fn committed(&self, partition: impl Into<String>, offset: i64) {
        self.lock()
            .commits
            .entry(partition.into())
            .or_default()
            .push(offset);
    }

    /// Messages found still on the broker at the end of the run.
    pub fn waiting<I: IntoIterator<Item = S>, S: Into<String>>(&self, ids: I) {
        let mut inner = self.lock();
        inner.waiting.extend(ids.into_iter().map(Into::into));
    }

    /// Messages found in the dead-letter destination.
    pub fn dead_lettered<I: IntoIterator<Item = S>, S: Into<String>>(&self, ids: I) {
        let mut inner = self.lock();
        inner.dead.extend(ids.into_iter().map(Into::into));
    }

    /// Successful invocations of `id` so far.
    pub fn successes(&self, id: &str) -> usize {
        self.lock()
            .messages
            .get(id)
            .map_or(0, |m| m.successes.len())
    }

    /// The figures of the run so far, without asserting.
    pub fn accounting(&self) -> Accounting {
        let inner = self.lock();
        let mut a = Accounting {
            sent: inner.messages.len() as u64,
            ..Accounting::default()
        };
        for (id, m) in &inner.messages {
            let dead = inner.dead.contains(id);
            let waiting = inner.waiting.contains(id);
            if !m.successes.is_empty() {
                a.processed += 1;
                a.duplicates += m.successes.len() as u64 - 1;
            }
            a.failed_attempts += m.failures;
            a.waiting += u64::from(waiting);
            a.dead_lettered += u64::from(dead);
            if m.successes.is_empty() && !dead && !waiting {
                a.lost.push(id.clone());
            }
            if dead && m.started == 0 {
                a.dead_unhandled.push(id.clone());
            }
            let first_success = m.successes.first().copied().unwrap_or(u64::MAX);
            if m.settled
                .iter()
                .any(|(at, how)| *how == Settled::Done && *at < first_success)
            {
                a.settled_early.push(id.clone());
            }
        }
        // Within a scope, by send order: a message's first success never comes
        // before an earlier one (not dead-lettered) is resolved: its first
        // success, or its copy forwarded for a retry (the broker's order
        // promise ends there: the copy goes to the tail).
        let mut by_scope: BTreeMap<&str, Vec<InScope<'_>>> = BTreeMap::new();
        for (id, m) in &inner.messages {
            if inner.dead.contains(id) {
                continue;
            }
            let forwarded = m
                .settled
                .iter()
                .filter(|(_, how)| *how == Settled::Forwarded)
                .map(|(at, _)| *at)
                .min();
            let resolved = match (m.successes.first().copied(), forwarded) {
                (Some(s), Some(f)) => Some(s.min(f)),
                (s, f) => s.or(f),
            };
            by_scope
                .entry(&m.scope)
                .or_default()
                .push((m.position, id, resolved));
        }
        for list in by_scope.values_mut() {
            list.sort_unstable();
            for (i, (_, earlier, earlier_done)) in list.iter().enumerate() {
                for (_, later, _) in &list[i + 1..] {
                    let later_done = inner
                        .messages
                        .get(*later)
                        .and_then(|m| m.successes.first().copied());
                    let early_first = match (earlier_done, later_done) {
                        (Some(e), Some(l)) => l < *e,
                        // The later one succeeded; the earlier one was never
                        // resolved.
                        (None, Some(_)) => true,
                        _ => false,
                    };
                    if early_first {
                        a.reordered
                            .push(((*earlier).to_owned(), (*later).to_owned()));
                    }
                }
            }
        }
        for (partition, offsets) in &inner.commits {
            for w in offsets.windows(2) {
                if w[1] < w[0] {
                    a.backwards.push((partition.clone(), w[0], w[1]));
                }
            }
        }
        a
    }

    /// Prints `label: accounting` and asserts `contract`: nothing lost, no dead
    /// letter unhandled, nothing settled early, no commit backwards, order kept when promised, duplicates
    /// within the bound, and no invocation of a message that was never sent.
    pub fn check(&self, label: &str, contract: Contract) -> Accounting {
        let a = self.accounting();
        println!("{label}: {a}");
        self.assert_contract(&a, label, contract);
        a
    }

    /// [`Ledger::check`] without the printed line, for runs made by the
    /// thousand (a property test); a failure still names `label`.
    pub fn verify(&self, label: &str, contract: Contract) -> Accounting {
        let a = self.accounting();
        self.assert_contract(&a, label, contract);
        a
    }

    fn assert_contract(&self, a: &Accounting, label: &str, contract: Contract) {
        let unknown = self.lock().unknown.clone();
        assert!(
            unknown.is_empty(),
            "{label}: handled or settled messages never sent: {unknown:?}"
        );
        assert!(a.lost.is_empty(), "{label}: lost {:?}", a.lost);
        assert!(
            a.dead_unhandled.is_empty(),
            "{label}: dead-lettered without ever being handled: {:?}",
            a.dead_unhandled
        );
        assert!(
            a.settled_early.is_empty(),
            "{label}: settled before their handler succeeded: {:?}",
            a.settled_early
        );
        assert!(
            a.backwards.is_empty(),
            "{label}: offsets committed backwards: {:?}",
            a.backwards
        );
        if contract.ordered {
            assert!(
                a.reordered.is_empty(),
                "{label}: later messages succeeded before earlier ones (earlier, later): {:?}",
                a.reordered
            );
        }
        if let Some(max) = contract.max_duplicates {
            assert!(
                a.duplicates <= max,
                "{label}: {} duplicates, at most {max} allowed",
                a.duplicates
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_run_passes_and_counts() {
        let l = Ledger::new();
        for id in ["a", "b", "c"] {
            l.sent(id, "p0");
        }
        l.started("a").finished(false);
        l.started("a").finished(true);
        l.settled("a", Settled::Done);
        l.started("b").finished(true);
        l.started("b").finished(true);
        l.started("c").finished(false);
        l.dead_lettered(["c"]);
        l.committed("p0", 1);
        l.committed("p0", 2);
        let a = l.check("clean", Contract::ordered().duplicates(1));
        assert_eq!(
            a.to_string(),
            "sent 3, processed 2 (1 duplicates), failed attempts 2, waiting 0, \
             dead-lettered 1, lost 0, settled early 0, reordered 0, backwards 0"
        );
    }

    #[test]
    fn each_breach_is_found() {
        let l = Ledger::new();
        for id in ["m1", "m2", "m3", "m4", "m5"] {
            l.sent(id, "g");
        }
        // m1 failed, m2 went ahead: reordered. m3 settled before its handler
        // finished. m4 found nowhere. m5 dead-lettered, never handled.
        l.started("m1").finished(false);
        l.started("m2").finished(true);
        let running = l.started("m3");
        l.settled("m3", Settled::Done);
        running.finished(true);
        l.started("m1").finished(true);
        l.committed("0", 5);
        l.committed("0", 3);
        l.dead_lettered(["m5"]);
        let a = l.accounting();
        assert_eq!(a.lost, ["m4"]);
        assert_eq!(a.dead_unhandled, ["m5"]);
        assert_eq!(a.settled_early, ["m3"]);
        assert_eq!(
            a.reordered,
            [
                ("m1".to_owned(), "m2".to_owned()),
                ("m1".to_owned(), "m3".to_owned())
            ]
        );
        assert_eq!(a.backwards, [("0".to_owned(), 5, 3)]);
        let caught = std::panic::catch_unwind(|| l.check("broken", Contract::ordered()));
        assert!(caught.is_err());
    }

    #[test]
    fn a_retry_forwarded_before_a_later_success_keeps_the_order() {
        let l = Ledger::new();
        for id in ["a", "b", "c"] {
            l.sent(id, "p0");
        }
        // a fails, its retry is forwarded (to the tail), then b succeeds, then a.
        l.started("a").finished(false);
        l.settled("a", Settled::Forwarded);
        l.started("b").finished(true);
        l.started("a").finished(true);
        l.started("c").finished(true);
        let a = l.accounting();
        assert!(a.reordered.is_empty(), "{:?}", a.reordered);
        let l2 = Ledger::new();
        for id in ["a", "b"] {
            l2.sent(id, "p0");
        }
        l2.started("a").finished(false);
        l2.started("b").finished(true);
        l2.settled("a", Settled::Forwarded);
        l2.started("a").finished(true);
        assert_eq!(
            l2.accounting().reordered,
            [("a".to_owned(), "b".to_owned())]
        );
    }

    #[test]
    fn a_forward_may_settle_before_success() {
        let l = Ledger::new();
        l.sent("x", "");
        l.started("x").finished(false);
        l.settled("x", Settled::Forwarded);
        l.waiting(["x"]);
        let a = l.check("forwarded", Contract::at_least_once());
        assert!(a.settled_early.is_empty());
        assert_eq!(a.waiting, 1);
    }
}
