//! Test support for mqtrace.
//!
//! - [`Collector`]: an in-process OTLP receiver (gRPC and HTTP) so tests export spans
//!   and metrics over real OTLP and assert on what arrived ([`RecordedMetric`]).
//! - [`Forest`] and [`TreeOptions`]: spans grouped into traces and rendered as
//!   normalised trees (names, kinds, parents, links, attributes, status; no ids or
//!   times) to compare with the expected text.
//! - [`semconv`]: the independent conventions check of a run's spans and metrics.
//! - [`brokers`]: the endpoints of the brokers the test script started, failing with
//!   instructions when there are none.
//! - [`examples`]: running an example binary against the brokers, and the span
//!   tree the own-loop examples share.
//! - [`delivery`]: the delivery-guarantee checker: a ledger of every message of a
//!   run (sent, each handler invocation, settled, committed, waiting, dead-lettered)
//!   checked against the broker's contract.
//! - [`faults`]: a proxy that refuses, hangs or forwards connections, and a
//!   Kafka-protocol broker with durable storage that a test kills and restarts.
//! - [`turns`]: timed tests run alone in their test binary, the rest share it.
#![forbid(unsafe_code)]

pub mod bench;
pub mod brokers;
mod collector;
pub mod delivery;
pub mod examples;
pub mod faults;
pub mod metric;
pub mod semconv;
mod span;
mod tree_assert;
pub mod turns;

pub use collector::{spans_of, Collector, CollectorConfig};
pub use metric::{MetricKind, MetricValue, RecordedMetric};
pub use span::{
    format_micros, AttrValue, Forest, Kind, RecordedEvent, RecordedLink, RecordedSpan, SpanStatus,
    TreeOptions,
};
pub use tree_assert::{assert_golden, assert_tree, unindent};
