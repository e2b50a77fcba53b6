//! The messaging metrics, recorded once, in the core's lifecycle.
//!
//! | metric | instrument | unit | recorded |
//! |---|---|---|---|
//! | `messaging.client.operation.duration` | histogram | `s` | when a send, receive, forward or settle call ends (settle calls are timed whether or not settle spans are on) |
//! | `messaging.process.duration` | histogram | `s` | when a message's process span ends (handler, forward and settlement) |
//! | `messaging.client.sent.messages` | counter | `{message}` | per message sent (a batch send counts its entries; forwards count) |
//! | `messaging.client.consumed.messages` | counter | `{message}` | per delivery, when its processing starts |
//! | `mqtrace.message.queue.duration` | histogram | `s` | per delivery with a broker timestamp: publish to the start of processing |
//! | `mqtrace.message.dispositions` | counter | `{message}` | per delivery, with `mqtrace.message.disposition` (`settled`, `retried`, `dead_lettered`, `dropped`) |
//!
//! Attributes: the system, `messaging.operation.name` and `.type`, the
//! destination name (left out for temporary and anonymous destinations, whose
//! names are unique) or template, the partition, the consumer group,
//! `server.address` and `server.port`, and `error.type` on failures, named by the
//! [`Conventions`](crate::Conventions) in force; under `Dup` both metric sets are
//! recorded. Both duration histograms use the conventions' bucket advice. Consumed
//! messages are counted when processing starts rather than at a receive span, so
//! each delivery is counted once whichever of the two an adapter instruments.
//!
//! Attribute sets are built once per stream and cached; recording a measurement
//! on the success path does not allocate.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use opentelemetry::metrics::{Counter, Histogram, Meter};
use opentelemetry::{KeyValue, Value};

use crate::conventions::{attr, Conventions, MetricNames};

/// The histogram bucket advice of the messaging conventions, in seconds.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// mqtrace's queue-time histogram: publish to the start of processing.
pub const QUEUE_DURATION: &str = "mqtrace.message.queue.duration";
/// mqtrace's counter of deliveries by what happened to them.
pub const DISPOSITIONS: &str = "mqtrace.message.dispositions";

/// Attribute sets kept per instrumenter; past this many, sets are built per
/// measurement instead of cached (a guard against unbounded error types).
const MAX_CACHED_SETS: usize = 4096;

/// One version's instruments.
struct Instruments {
    send_duration: Histogram<f64>,
    client_duration: Histogram<f64>,
    process_duration: Histogram<f64>,
    sent: Counter<u64>,
    consumed: Counter<u64>,
}

impl Instruments {
    fn new(meter: &Meter, names: &MetricNames) -> Self {
        let histogram = |name: &'static str, what: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(what)
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build()
        };
        let send_duration = histogram(names.send_duration, "Duration of messaging operations.");
        let client_duration = if names.client_duration == names.send_duration {
            send_duration.clone()
        } else {
            histogram(names.client_duration, "Duration of messaging operations.")
        };
        Self {
            send_duration,
            client_duration,
            process_duration: histogram(names.process_duration, "Duration of processing."),
            sent: meter
                .u64_counter(names.sent_messages)
                .with_unit("{message}")
                .with_description("Messages the producer attempted to send.")
                .build(),
            consumed: meter
                .u64_counter(names.processed_messages)
                .with_unit("{message}")
                .with_description("Messages delivered to the consumer.")
                .build(),
        }
    }
}

struct Meters {
    versions: Vec<Instruments>,
    queue_duration: Histogram<f64>,
    dispositions: Counter<u64>,
}

impl Meters {
    fn new(meter: &Meter, conventions: Conventions) -> Self {
        Self {
            versions: conventions
                .metric_names()
                .map(|names| Instruments::new(meter, names))
                .collect(),
            queue_duration: meter
                .f64_histogram(QUEUE_DURATION)
                .with_unit("s")
                .with_description("Time between publication and the start of processing.")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            dispositions: meter
                .u64_counter(DISPOSITIONS)
                .with_unit("{message}")
                .with_description("Deliveries by what happened to them after processing.")
                .build(),
        }
    }
}

/// Where the meter comes from: given, or the global provider at the first
/// measurement (so an instrumenter built before the application's set-up records
/// to the provider installed by then).
pub(crate) enum MeterSource {
    Given(Meter),
    Global,
}

/// The metrics of one instrumenter: instruments and cached attribute sets.
pub(crate) struct Metrics {
    source: MeterSource,
    conventions: Conventions,
    meters: OnceLock<Meters>,
    sets: RwLock<HashMap<u64, Vec<Arc<[KeyValue]>>>>,
    cached: std::sync::atomic::AtomicUsize,
}

/// What a measured span is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Measured {
    /// A send of this many messages.
    Send(u64),
    /// A receive or settle call.
    Client,
    /// Processing one delivery.
    Process,
}

impl Metrics {
    pub(crate) fn new(source: MeterSource, conventions: Conventions) -> Self {
        Self {
            source,
            conventions,
            meters: OnceLock::new(),
            sets: RwLock::new(HashMap::new()),
            cached: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The meter: the given one, or the global provider's now.
    pub(crate) fn meter(&self) -> Meter {
        match &self.source {
            MeterSource::Given(meter) => meter.clone(),
            MeterSource::Global => {
                opentelemetry::global::meter_with_scope(crate::instrument::instrumentation_scope())
            }
        }
    }

    fn meters(&self) -> &Meters {
        self.meters
            .get_or_init(|| Meters::new(&self.meter(), self.conventions))
    }

    /// Records a settle call (timed by the lifecycle, with or without its span).
    pub(crate) fn settled(
        &self,
        process: &[KeyValue],
        name: &'static str,
        seconds: f64,
        error_type: Option<&str>,
    ) {
        let stream = self.derived_without(
            process,
            &[
                KeyValue::new(attr::MESSAGING_OPERATION_NAME, name),
                KeyValue::new(attr::MESSAGING_OPERATION_TYPE, "settle"),
            ],
            // v1.24 had no settle operation.
            attr::LEGACY_OPERATION,
        );
        self.record(Measured::Client, seconds, &stream, error_type);
    }

    /// The metric attribute set of a span's attributes.
    pub(crate) fn stream(&self, span_attributes: &[KeyValue]) -> Arc<[KeyValue]> {
        let unique_name = span_attributes.iter().any(|kv| {
            matches!(
                kv.key.as_str(),
                attr::MESSAGING_DESTINATION_TEMPORARY | attr::MESSAGING_DESTINATION_ANONYMOUS
            ) && kv.value == Value::Bool(true)
        });
        self.set(
            span_attributes
                .iter()
                .filter(|kv| is_metric_attribute(kv.key.as_str()))
                .filter(|kv| !(unique_name && kv.key.as_str() == attr::MESSAGING_DESTINATION_NAME)),
        )
    }

    /// A set derived from `base`: its entries with `replaced` keys overridden,
    /// then `added`.
    pub(crate) fn derived(
        &self,
        base: &[KeyValue],
        replaced: &[KeyValue],
        added: &[KeyValue],
    ) -> Arc<[KeyValue]> {
        self.set(
            base.iter()
                .map(|kv| replaced.iter().find(|r| r.key == kv.key).unwrap_or(kv))
                .chain(added.iter()),
        )
    }

    /// [`Metrics::derived`] with `replaced` and without the key `removed`.
    fn derived_without(
        &self,
        base: &[KeyValue],
        replaced: &[KeyValue],
        removed: &str,
    ) -> Arc<[KeyValue]> {
        self.set(
            base.iter()
                .filter(|kv| kv.key.as_str() != removed)
                .map(|kv| replaced.iter().find(|r| r.key == kv.key).unwrap_or(kv)),
        )
    }

    fn set<'a, I>(&self, items: I) -> Arc<[KeyValue]>
    where
        I: Iterator<Item = &'a KeyValue> + Clone,
    {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for kv in items.clone() {
            kv.key.as_str().hash(&mut hasher);
            hash_value(&kv.value, &mut hasher);
        }
        let hash = hasher.finish();
        if let Ok(sets) = self.sets.read() {
            if let Some(found) = sets
                .get(&hash)
                .and_then(|bucket| bucket.iter().find(|set| set.iter().eq(items.clone())))
            {
                return Arc::clone(found);
            }
        }
        let set: Arc<[KeyValue]> = items.cloned().collect();
        use std::sync::atomic::Ordering;
        if self.cached.load(Ordering::Relaxed) < MAX_CACHED_SETS {
            if let Ok(mut sets) = self.sets.write() {
                let bucket = sets.entry(hash).or_default();
                if !bucket.iter().any(|s| s[..] == set[..]) {
                    bucket.push(Arc::clone(&set));
                    self.cached.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        set
    }

    /// Records a measured operation that took `seconds`.
    pub(crate) fn record(
        &self,
        what: Measured,
        seconds: f64,
        stream: &Arc<[KeyValue]>,
        error_type: Option<&str>,
    ) {
        let failed;
        let attributes: &[KeyValue] = match error_type {
            Some(e) => {
                failed = self.derived(
                    stream,
                    &[],
                    &[KeyValue::new(attr::ERROR_TYPE, e.to_owned())],
                );
                &failed
            }
            None => stream,
        };
        for v in &self.meters().versions {
            match what {
                Measured::Send(n) => {
                    v.send_duration.record(seconds, attributes);
                    v.sent.add(n, attributes);
                }
                Measured::Client => v.client_duration.record(seconds, attributes),
                Measured::Process => v.process_duration.record(seconds, attributes),
            }
        }
    }

    /// Counts a delivery whose processing starts, with its queue time.
    pub(crate) fn consumed(&self, stream: &[KeyValue], queue_time: Option<f64>) {
        let meters = self.meters();
        for v in &meters.versions {
            v.consumed.add(1, stream);
        }
        if let Some(waited) = queue_time {
            meters.queue_duration.record(waited, stream);
        }
    }

    /// Counts a delivery's disposition.
    pub(crate) fn disposition(&self, stream: &[KeyValue], disposition: &'static str) {
        let set = self.derived(
            stream,
            &[],
            &[KeyValue::new(attr::DISPOSITION, disposition)],
        );
        self.meters().dispositions.add(1, &set);
    }
}

fn hash_value(value: &Value, hasher: &mut impl Hasher) {
    match value {
        Value::Bool(b) => b.hash(hasher),
        Value::I64(i) => i.hash(hasher),
        Value::F64(f) => f.to_bits().hash(hasher),
        Value::String(s) => s.as_str().hash(hasher),
        other => other.to_string().hash(hasher),
    }
}

/// Keys that identify a metric stream, under any conventions setting.
fn is_metric_attribute(key: &str) -> bool {
    matches!(
        key,
        attr::MESSAGING_SYSTEM
            | attr::MESSAGING_SYSTEM_NAME
            | attr::MESSAGING_OPERATION_NAME
            | attr::MESSAGING_OPERATION_TYPE
            | attr::LEGACY_OPERATION
            | attr::MESSAGING_DESTINATION_NAME
            | attr::MESSAGING_DESTINATION_TEMPLATE
            | attr::MESSAGING_DESTINATION_PARTITION_ID
            | attr::LEGACY_KAFKA_PARTITION
            | attr::MESSAGING_CONSUMER_GROUP_NAME
            | attr::LEGACY_KAFKA_CONSUMER_GROUP
            | attr::SERVER_ADDRESS
            | attr::SERVER_PORT
    )
}

/// A measurement in progress, carried by a [`crate::MessagingSpan`] and recorded
/// when the span ends.
pub(crate) struct Measure {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) what: Measured,
    pub(crate) stream: Arc<[KeyValue]>,
    pub(crate) started: Instant,
    pub(crate) error: OnceLock<String>,
}

impl Measure {
    pub(crate) fn record(self) {
        let seconds = self.started.elapsed().as_secs_f64();
        self.metrics.record(
            self.what,
            seconds,
            &self.stream,
            self.error.get().map(String::as_str),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::new(MeterSource::Global, Conventions::V1_45)
    }

    #[test]
    fn streams_keep_only_metric_attributes_and_are_cached() {
        let m = metrics();
        let span = [
            KeyValue::new(attr::MESSAGING_SYSTEM_NAME, "kafka"),
            KeyValue::new(attr::MESSAGING_OPERATION_NAME, "process"),
            KeyValue::new(attr::MESSAGING_DESTINATION_NAME, "orders"),
            KeyValue::new(attr::KAFKA_OFFSET, 41),
            KeyValue::new(attr::MESSAGING_MESSAGE_ID, "m-1"),
        ];
        let a = m.stream(&span);
        let keys: Vec<_> = a.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "messaging.system.name",
                "messaging.operation.name",
                "messaging.destination.name"
            ]
        );
        let mut other = span.to_vec();
        other[3] = KeyValue::new(attr::KAFKA_OFFSET, 42);
        let b = m.stream(&other);
        assert!(Arc::ptr_eq(&a, &b), "same stream, one cached set");
        other[2] = KeyValue::new(attr::MESSAGING_DESTINATION_NAME, "payments");
        assert!(!Arc::ptr_eq(&a, &m.stream(&other)));
    }

    #[test]
    fn unique_destination_names_stay_off_metrics() {
        let m = metrics();
        let span = [
            KeyValue::new(attr::MESSAGING_SYSTEM_NAME, "rabbitmq"),
            KeyValue::new(attr::MESSAGING_DESTINATION_NAME, "amq.gen-x1"),
            KeyValue::new(attr::MESSAGING_DESTINATION_ANONYMOUS, true),
        ];
        let keys: Vec<_> = m
            .stream(&span)
            .iter()
            .map(|kv| kv.key.as_str().to_owned())
            .collect();
        assert_eq!(keys, ["messaging.system.name"]);
    }

    #[test]
    fn derived_sets_replace_and_add() {
        let m = metrics();
        let base = m.stream(&[
            KeyValue::new(attr::MESSAGING_OPERATION_NAME, "process"),
            KeyValue::new(attr::MESSAGING_OPERATION_TYPE, "process"),
        ]);
        let settle = m.derived(
            &base,
            &[
                KeyValue::new(attr::MESSAGING_OPERATION_NAME, "ack"),
                KeyValue::new(attr::MESSAGING_OPERATION_TYPE, "settle"),
            ],
            &[KeyValue::new(attr::ERROR_TYPE, "io")],
        );
        let got: Vec<_> = settle
            .iter()
            .map(|kv| format!("{}={}", kv.key, kv.value))
            .collect();
        assert_eq!(
            got,
            [
                "messaging.operation.name=ack",
                "messaging.operation.type=settle",
                "error.type=io"
            ]
        );
        let again = m.derived(
            &base,
            &[
                KeyValue::new(attr::MESSAGING_OPERATION_NAME, "ack"),
                KeyValue::new(attr::MESSAGING_OPERATION_TYPE, "settle"),
            ],
            &[KeyValue::new(attr::ERROR_TYPE, "io")],
        );
        assert!(Arc::ptr_eq(&settle, &again));
    }
}
