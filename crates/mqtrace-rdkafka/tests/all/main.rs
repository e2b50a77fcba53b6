//! Integration tests against the Kafka-protocol broker started by
//! `scripts/test.sh`, exporting over OTLP to the in-process collector.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

mod broker_restart;
mod collector_faults;
mod commit_outage;
mod failures;
mod flows;
mod helpers;
mod own_loop;
mod payloads;
mod process_kill;
mod restart;
mod settlement;
