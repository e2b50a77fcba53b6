//! Turns for the tests of one test binary: most share the machine, a test that
//! judges time (a throughput bound, a stop deadline) takes it alone.
//!
//! The test harness runs a binary's tests on several threads. On a two-core
//! machine a throughput figure taken while other tests drive brokers and
//! collectors says more about them than about the code under test, so the
//! harnesses hold a [`Turn::shared`] for a test's whole run and the timed tests
//! a [`Turn::alone`]: the timed test waits for the running ones to end, and the
//! ones after it wait for it.

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

static TURNS: RwLock<()> = RwLock::const_new(());

/// A test's hold on the machine; released when dropped.
#[derive(Debug)]
pub enum Turn {
    /// Other shared turns run at the same time.
    Shared(RwLockReadGuard<'static, ()>),
    /// No other test of the binary runs meanwhile.
    Alone(RwLockWriteGuard<'static, ()>),
}

impl Turn {
    /// Waits until no test runs alone, then shares the machine.
    pub async fn shared() -> Self {
        Self::Shared(TURNS.read().await)
    }

    /// Waits until every running test has ended, and keeps the next ones waiting
    /// until this turn is dropped.
    pub async fn alone() -> Self {
        Self::Alone(TURNS.write().await)
    }

    /// [`Turn::shared`] for a test that is not async (never call it on an async
    /// thread).
    pub fn shared_blocking() -> Self {
        Self::Shared(TURNS.blocking_read())
    }

    /// [`Turn::alone`] for a test that is not async.
    pub fn alone_blocking() -> Self {
        Self::Alone(TURNS.blocking_write())
    }
}
