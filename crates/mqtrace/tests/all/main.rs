//! Integration tests of the core: spans exported over real OTLP to the in-process
//! collector, asserted as normalised trees.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

mod helpers;

mod batch;
mod concurrency;
mod delivery;
mod exceptions;
mod metrics;
mod parenting;
mod propagation;
mod recipes;
mod retries;
mod telemetry;
mod tracing_integration;
