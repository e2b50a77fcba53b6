//! Integration tests against the SQS emulator started by `scripts/test.sh`,
//! exporting over OTLP to the in-process collector.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

mod batch;
mod collector_faults;
mod delivery;
mod failures;
mod flows;
mod helpers;
mod outage;
mod own_loop;
mod payloads;
mod process_kill;
