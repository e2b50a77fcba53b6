//! Integration tests against the RabbitMQ started by `scripts/test.sh`, exporting
//! over OTLP to the in-process collector.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

mod collector_faults;
mod delivery;
mod failures;
mod flows;
mod helpers;
mod own_loop;
mod payloads;
mod plain;
mod process_kill;
