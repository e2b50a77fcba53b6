//! The messaging metrics, recorded once, in the core's lifecycle.
//!
//! | metric | instrument | unit | recorded |
//! |---|---|---|---|
//! | `messaging.client.operation.duration` | histogram | `s` | when a send, receive, forward or settle call ends (settle calls are timed whether or not settle spans are on) |
//! | `messaging.process.duration` | histogram | `s` | when a message's process span ends (handler, forward and settlement) |
//! | `messaging.client.sent.messages` | counter | `{message}` | per message sent (a batch send counts its entries; forwards count) |
//! | `messaging.client.consumed.messages` | counter | `{message}` | per delivery, once: at the receive span it arrived under (operation `receive` or `poll`), else when its processing starts |
//! | `mqtrace.message.queue.duration` | histogram | `s` | per delivery with a broker timestamp: publish to the start of processing |
//! | `mqtrace.message.dispositions` | counter | `{message}` | per delivery, with `mqtrace.message.disposition` (`settled`, `retried`, `dead_lettered`, `dropped`) |
//!
//! Attributes: the system, `messaging.operation.name` and `.type`, the
//! destination name (left out for temporary and anonymous destinations, whose
//! names are unique) or template, the partition, the consumer group,
//! `server.address` and `server.port`, and `error.type` on failures, named by the
//! [`Conventions`] in force; under `Dup` both metric sets are
//! recorded. Both duration histograms use the conventions' bucket advice. Consumed
//! messages are counted once per delivery, as the conventions ask: by the receive
//! span where there is one (the SQS consumer's receives, Kafka's opt-in `poll`
//! spans), else when processing starts. Under legacy names (v1.24) receives count
//! `messaging.receive.messages` and processing `messaging.process.messages`.
//!
//! Attribute sets are built once per stream and cached, with the sets derived
//! from them (per disposition, settle call and error type) cached inside; recording
//! a measurement on the success path does not allocate. With the
//! `bound-instruments` feature (on through `mqtrace-telemetry`'s defaults) each
//! cached set is bound to its instruments at its first measurement, and the SDK
//! then records without hashing the attributes; without it, the SDK hashes each
//! measurement's set. Failures (sets with `error.type`) are recorded unbound.
//!
//! Durations come from the clock readings their spans use: a measured span's
//! start is read once, for the span's start time, its measurement and the queue
//! time, and its end once, for the span's end time and the measurement (a settle
//! call's end is its process span's end too). A span that is ended (not just
//! dropped) and its metric so agree to the nanosecond, and a processed and
//! settled message reads the clock three times: its start, the settle call's
//! start, and the end of both.
//! These are wall-clock readings, as span times are: a duration across a step of
//! the system clock back in time is recorded as 0.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::SystemTime;

use opentelemetry::metrics::{Counter, Histogram, Meter};
use opentelemetry::KeyValue;

use crate::conventions::{attr, Conventions, MetricNames};
use crate::describe::{MessageDescription, MessagingSystem, OperationType, Text};
use crate::forward::Disposition;

/// The histogram bucket advice of the messaging conventions, in seconds.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// mqtrace's queue-time histogram: publish to the start of processing.
pub const QUEUE_DURATION: &str = "mqtrace.message.queue.duration";
/// mqtrace's counter of deliveries by what happened to them.
pub const DISPOSITIONS: &str = "mqtrace.message.dispositions";

/// Streams kept per instrumenter, and error types kept per stream; past these,
/// sets are built per measurement instead of cached (a guard against unbounded
/// destinations or error types).
const MAX_CACHED_SETS: usize = 4096;
const MAX_ERROR_TYPES: usize = 64;

/// One metric stream's attribute set, with the sets derived from it.
pub(crate) struct Stream {
    /// What the stream was looked up by (`None` for derived streams).
    key: Option<StreamKey>,
    base: Arc<[KeyValue]>,
    /// By [`Disposition`] (settled, retried, dead-lettered, dropped).
    dispositions: [OnceLock<Arc<[KeyValue]>>; 4],
    /// The first settle call's stream (the one a consumer uses for nearly
    /// every message), then the others by name.
    first_settle: OnceLock<(&'static str, Arc<Stream>)>,
    settles: Mutex<Vec<(&'static str, Arc<Stream>)>>,
    /// By `error.type`.
    errors: Mutex<Vec<(Box<str>, Set)>>,
    /// Whether the stream is kept (in the instrumenter's cache, or inside a kept
    /// stream), so that binding instruments to its set once pays off.
    kept: bool,
    /// The instruments bound to `base`, each at its first measurement.
    #[cfg(feature = "bound-instruments")]
    bound: bound::Handles,
}

/// A cached attribute set.
type Set = Arc<[KeyValue]>;

impl Stream {
    fn new(key: Option<StreamKey>, base: Arc<[KeyValue]>, kept: bool) -> Self {
        Self {
            key,
            base,
            dispositions: Default::default(),
            first_settle: OnceLock::new(),
            settles: Mutex::new(Vec::new()),
            errors: Mutex::new(Vec::new()),
            kept,
            #[cfg(feature = "bound-instruments")]
            bound: bound::Handles::default(),
        }
    }

    fn with_error(&self, error_type: &str) -> Arc<[KeyValue]> {
        let mut errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, set)) = errors.iter().find(|(e, _)| &**e == error_type) {
            return Arc::clone(set);
        }
        let set: Arc<[KeyValue]> = self
            .base
            .iter()
            .cloned()
            .chain(std::iter::once(KeyValue::new(
                attr::ERROR_TYPE,
                error_type.to_owned(),
            )))
            .collect();
        if errors.len() < MAX_ERROR_TYPES {
            errors.push((error_type.into(), Arc::clone(&set)));
        }
        set
    }

    fn disposition_index(disposition: Disposition) -> usize {
        match disposition {
            Disposition::Settle => 0,
            Disposition::Retry => 1,
            Disposition::DeadLetter => 2,
            Disposition::Drop => 3,
        }
    }

    fn disposition(&self, disposition: Disposition) -> &[KeyValue] {
        self.dispositions[Self::disposition_index(disposition)].get_or_init(|| {
            self.base
                .iter()
                .cloned()
                .chain(std::iter::once(KeyValue::new(
                    attr::DISPOSITION,
                    disposition.as_str(),
                )))
                .collect()
        })
    }

    /// The stream of a settle call named `name` on this (process) stream: the
    /// operation renamed, without v1.24's operation attribute (it had no settle).
    fn settle(&self, name: &'static str) -> Arc<Stream> {
        let (first, stream) = self
            .first_settle
            .get_or_init(|| (name, Arc::new(self.settle_stream(name))));
        if *first == name {
            return Arc::clone(stream);
        }
        let mut settles = self.settles.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, stream)) = settles.iter().find(|(n, _)| *n == name) {
            return Arc::clone(stream);
        }
        let stream = Arc::new(self.settle_stream(name));
        settles.push((name, Arc::clone(&stream)));
        stream
    }

    fn settle_stream(&self, name: &'static str) -> Stream {
        let base: Arc<[KeyValue]> = self
            .base
            .iter()
            .filter(|kv| kv.key.as_str() != attr::LEGACY_OPERATION)
            .map(|kv| match kv.key.as_str() {
                attr::MESSAGING_OPERATION_NAME => {
                    KeyValue::new(attr::MESSAGING_OPERATION_NAME, name)
                }
                attr::MESSAGING_OPERATION_TYPE => {
                    KeyValue::new(attr::MESSAGING_OPERATION_TYPE, "settle")
                }
                _ => kv.clone(),
            })
            .collect();
        Stream::new(None, base, self.kept)
    }

    fn matches(&self, d: &MessageDescription) -> bool {
        self.key.as_ref().is_some_and(|k| k.matches(d))
    }

    #[cfg(test)]
    fn attributes(&self) -> &[KeyValue] {
        &self.base
    }
}

/// Instruments bound to a kept stream's attribute set: the SDK resolves the set
/// to its data point once, at the first measurement, and every later one skips
/// the per-call hashing. Each instrument is bound only when first used, so a
/// stream has no data points on instruments it never records to.
#[cfg(feature = "bound-instruments")]
mod bound {
    use std::sync::OnceLock;

    use opentelemetry::metrics::{BoundCounter, BoundHistogram, Counter, Histogram};
    use opentelemetry::KeyValue;

    /// One conventions version's instruments (two under `Dup`).
    #[derive(Default)]
    pub(super) struct Version {
        pub(super) send_duration: OnceLock<BoundHistogram<f64>>,
        pub(super) client_duration: OnceLock<BoundHistogram<f64>>,
        pub(super) process_duration: OnceLock<BoundHistogram<f64>>,
        pub(super) sent: OnceLock<BoundCounter<u64>>,
        pub(super) consumed: OnceLock<BoundCounter<u64>>,
        pub(super) received: OnceLock<BoundCounter<u64>>,
    }

    #[derive(Default)]
    pub(super) struct Handles {
        pub(super) versions: [Version; 2],
        pub(super) queue_duration: OnceLock<BoundHistogram<f64>>,
        pub(super) dispositions: [OnceLock<BoundCounter<u64>>; 4],
    }

    pub(super) fn histogram<'a>(
        slot: &'a OnceLock<BoundHistogram<f64>>,
        instrument: &Histogram<f64>,
        attributes: &[KeyValue],
    ) -> &'a BoundHistogram<f64> {
        slot.get_or_init(|| instrument.bind(attributes))
    }

    pub(super) fn counter<'a>(
        slot: &'a OnceLock<BoundCounter<u64>>,
        instrument: &Counter<u64>,
        attributes: &[KeyValue],
    ) -> &'a BoundCounter<u64> {
        slot.get_or_init(|| instrument.bind(attributes))
    }
}

/// A word-at-a-time hash (the multiply-rotate scheme of rustc's FxHasher) for
/// the stream lookup: the attribute sets are ours, not an attacker's, and SipHash
/// cost more than the rest of a measurement.
#[derive(Default)]
struct StreamHasher(u64);

impl Hasher for StreamHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(K);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(K);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type Streams = HashMap<u64, Vec<Arc<Stream>>, BuildHasherDefault<StreamHasher>>;

thread_local! {
    /// The stream this thread used last, with its instrumenter's id and key.
    static LAST_STREAM: std::cell::RefCell<Option<(u64, Arc<Stream>)>> =
        const { std::cell::RefCell::new(None) };
}

/// The fields of a description that metric attributes come from.
#[derive(Debug, PartialEq, Eq)]
struct StreamKey {
    system: MessagingSystem,
    operation: OperationType,
    /// The adapter's own name for the operation, if any (else the type's).
    operation_name: Option<Cow<'static, str>>,
    destination: Option<Text>,
    legacy_name: Option<Text>,
    template: Option<Text>,
    unique: bool,
    partition: Option<Text>,
    group: Option<Text>,
    server: Option<Text>,
    port: Option<u16>,
}

impl StreamKey {
    fn of(d: &MessageDescription) -> Self {
        Self {
            system: d.system,
            operation: d.operation,
            operation_name: d.operation_name.clone(),
            destination: d.destination.name.clone(),
            legacy_name: d.destination.legacy_name.clone(),
            template: d.destination.template.clone(),
            unique: d.destination.temporary || d.destination.anonymous,
            partition: d.partition.clone(),
            group: d.consumer_group.clone(),
            server: d.server_address.clone(),
            port: d.server_port,
        }
    }

    fn hash_of(d: &MessageDescription, h: &mut StreamHasher) {
        d.system.hash(h);
        d.operation.hash(h);
        d.operation_name().hash(h);
        d.destination.name.hash(h);
        d.destination.legacy_name.hash(h);
        d.destination.template.hash(h);
        d.partition.hash(h);
        d.consumer_group.hash(h);
        d.server_address.hash(h);
        d.server_port.hash(h);
    }

    fn matches(&self, d: &MessageDescription) -> bool {
        self.system == d.system
            && self.operation == d.operation
            && same_name(&self.operation_name, &d.operation_name, d.operation)
            && self.destination == d.destination.name
            && self.legacy_name == d.destination.legacy_name
            && self.template == d.destination.template
            && self.unique == (d.destination.temporary || d.destination.anonymous)
            && self.partition == d.partition
            && self.group == d.consumer_group
            && self.server == d.server_address
            && self.port == d.server_port
    }
}

/// Whether two operation names (each `None` for the type's own) are the same:
/// without reading them when both are the type's.
fn same_name(
    a: &Option<Cow<'static, str>>,
    b: &Option<Cow<'static, str>>,
    operation: OperationType,
) -> bool {
    match (a, b) {
        (None, None) => true,
        _ => {
            a.as_deref().unwrap_or(operation.as_str()) == b.as_deref().unwrap_or(operation.as_str())
        }
    }
}

/// One version's instruments.
struct Instruments {
    send_duration: Histogram<f64>,
    client_duration: Histogram<f64>,
    process_duration: Histogram<f64>,
    sent: Counter<u64>,
    consumed: Counter<u64>,
    /// Messages counted at receive: `consumed` itself where one metric counts
    /// consumption once (v1.44 on), v1.24's `messaging.receive.messages` apart.
    received: Counter<u64>,
    /// Whether `received` is `consumed`: a message counted at receive is then
    /// not counted again at processing.
    counted_once: bool,
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
        let counter = |name: &'static str, what: &'static str| {
            meter
                .u64_counter(name)
                .with_unit("{message}")
                .with_description(what)
                .build()
        };
        let consumed = counter(
            names.processed_messages,
            "Messages delivered to the consumer.",
        );
        let counted_once = names.received_messages == names.processed_messages;
        let received = if counted_once {
            consumed.clone()
        } else {
            counter(
                names.received_messages,
                "Messages received by the consumer.",
            )
        };
        Self {
            send_duration,
            client_duration,
            process_duration: histogram(names.process_duration, "Duration of processing."),
            sent: counter(
                names.sent_messages,
                "Messages the producer attempted to send.",
            ),
            consumed,
            received,
            counted_once,
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
    /// Tells this instrumenter's entry in the per-thread cache from others'.
    id: u64,
    source: MeterSource,
    conventions: Conventions,
    meters: OnceLock<Meters>,
    streams: RwLock<Streams>,
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
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            source,
            conventions,
            meters: OnceLock::new(),
            streams: RwLock::new(Streams::default()),
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
        process: &Stream,
        name: &'static str,
        seconds: f64,
        error_type: Option<&str>,
    ) {
        self.record(Measured::Client, seconds, &process.settle(name), error_type);
    }

    /// The metric stream of an operation: looked up by the description's fields
    /// that metric attributes come from, built from the conventions' attributes
    /// the first time.
    pub(crate) fn stream(&self, d: &MessageDescription) -> Arc<Stream> {
        // A consumer's loop asks for the same stream message after message: the
        // thread's last one first, without hashing or locking.
        let last = LAST_STREAM.with(|last| {
            last.borrow()
                .as_ref()
                .filter(|(id, stream)| *id == self.id && stream.matches(d))
                .map(|(_, stream)| Arc::clone(stream))
        });
        if let Some(stream) = last {
            return stream;
        }
        let stream = self.lookup(d);
        LAST_STREAM.with(|last| {
            *last.borrow_mut() = Some((self.id, Arc::clone(&stream)));
        });
        stream
    }

    fn lookup(&self, d: &MessageDescription) -> Arc<Stream> {
        let mut hasher = StreamHasher::default();
        StreamKey::hash_of(d, &mut hasher);
        let hash = hasher.finish();
        if let Ok(streams) = self.streams.read() {
            if let Some(found) = streams
                .get(&hash)
                .and_then(|bucket| bucket.iter().find(|s| s.matches(d)))
            {
                return Arc::clone(found);
            }
        }
        let mut attributes = Vec::with_capacity(16);
        self.conventions.attributes(d, false, &mut attributes);
        let unique = d.destination.temporary || d.destination.anonymous;
        let base: Arc<[KeyValue]> = attributes
            .into_iter()
            .filter(|kv| is_metric_attribute(kv.key.as_str()))
            .filter(|kv| !(unique && kv.key.as_str() == attr::MESSAGING_DESTINATION_NAME))
            .collect();
        use std::sync::atomic::Ordering;
        let kept = self.cached.load(Ordering::Relaxed) < MAX_CACHED_SETS;
        let stream = Arc::new(Stream::new(Some(StreamKey::of(d)), base, kept));
        if kept {
            if let Ok(mut streams) = self.streams.write() {
                let bucket = streams.entry(hash).or_default();
                match bucket.iter().find(|s| s.matches(d)) {
                    Some(raced) => return Arc::clone(raced),
                    None => {
                        bucket.push(Arc::clone(&stream));
                        self.cached.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        stream
    }

    /// Records a measured operation that took `seconds`.
    pub(crate) fn record(
        &self,
        what: Measured,
        seconds: f64,
        stream: &Stream,
        error_type: Option<&str>,
    ) {
        let meters = self.meters();
        #[cfg(feature = "bound-instruments")]
        if error_type.is_none() && stream.kept {
            for (v, b) in meters.versions.iter().zip(&stream.bound.versions) {
                let base = &stream.base;
                match what {
                    Measured::Send(n) => {
                        bound::histogram(&b.send_duration, &v.send_duration, base).record(seconds);
                        bound::counter(&b.sent, &v.sent, base).add(n);
                    }
                    Measured::Client => {
                        bound::histogram(&b.client_duration, &v.client_duration, base)
                            .record(seconds);
                    }
                    Measured::Process => {
                        bound::histogram(&b.process_duration, &v.process_duration, base)
                            .record(seconds);
                    }
                }
            }
            return;
        }
        let failed;
        let attributes: &[KeyValue] = match error_type {
            Some(e) => {
                failed = stream.with_error(e);
                &failed
            }
            None => &stream.base,
        };
        for v in &meters.versions {
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

    /// Counts `n` messages received under a receive span, on its stream.
    pub(crate) fn received(&self, stream: &Stream, n: u64) {
        let meters = self.meters();
        #[cfg(feature = "bound-instruments")]
        if stream.kept {
            for (v, b) in meters.versions.iter().zip(&stream.bound.versions) {
                bound::counter(&b.received, &v.received, &stream.base).add(n);
            }
            return;
        }
        for v in &meters.versions {
            v.received.add(n, &stream.base);
        }
    }

    /// Counts a delivery whose processing starts, unless its receive counted it
    /// already (where one metric counts consumption once), and records its queue
    /// time.
    pub(crate) fn consumed(&self, stream: &Stream, queue_time: Option<f64>, received: bool) {
        let meters = self.meters();
        #[cfg(feature = "bound-instruments")]
        if stream.kept {
            let base = &stream.base;
            for (v, b) in meters.versions.iter().zip(&stream.bound.versions) {
                if !(received && v.counted_once) {
                    bound::counter(&b.consumed, &v.consumed, base).add(1);
                }
            }
            if let Some(waited) = queue_time {
                bound::histogram(&stream.bound.queue_duration, &meters.queue_duration, base)
                    .record(waited);
            }
            return;
        }
        for v in meters
            .versions
            .iter()
            .filter(|v| !(received && v.counted_once))
        {
            v.consumed.add(1, &stream.base);
        }
        if let Some(waited) = queue_time {
            meters.queue_duration.record(waited, &stream.base);
        }
    }

    /// Counts a delivery's disposition.
    pub(crate) fn disposition(&self, stream: &Stream, disposition: Disposition) {
        let meters = self.meters();
        #[cfg(feature = "bound-instruments")]
        if stream.kept {
            let slot = &stream.bound.dispositions[Stream::disposition_index(disposition)];
            bound::counter(slot, &meters.dispositions, stream.disposition(disposition)).add(1);
            return;
        }
        meters.dispositions.add(1, stream.disposition(disposition));
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
    pub(crate) stream: Arc<Stream>,
    /// The span's start time: one wall-clock reading serves the span and its
    /// measurement.
    pub(crate) started: SystemTime,
    pub(crate) error: OnceLock<String>,
}

/// Seconds from `start` to `end`, 0 if the wall clock stepped back between them.
pub(crate) fn seconds_between(start: SystemTime, end: SystemTime) -> f64 {
    end.duration_since(start).map_or(0.0, |d| d.as_secs_f64())
}

impl Measure {
    pub(crate) fn record(self) {
        self.record_at(SystemTime::now());
    }

    /// Records the measurement as ending at `now` (the span's end time).
    pub(crate) fn record_at(self, now: SystemTime) {
        let seconds = seconds_between(self.started, now);
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

    fn render(set: &[KeyValue]) -> Vec<String> {
        set.iter()
            .map(|kv| format!("{}={}", kv.key, kv.value))
            .collect()
    }

    fn kafka(offset: i64, topic: &str) -> MessageDescription {
        let mut d = MessageDescription::new(MessagingSystem::Kafka, OperationType::Process)
            .destination(topic)
            .message_id("m-1");
        d.offset = Some(offset);
        d
    }

    #[test]
    fn streams_keep_only_metric_attributes_and_are_cached() {
        let m = metrics();
        let a = m.stream(&kafka(41, "orders"));
        assert_eq!(
            render(a.attributes()),
            [
                "messaging.system.name=kafka",
                "messaging.operation.name=process",
                "messaging.operation.type=process",
                "messaging.destination.name=orders"
            ]
        );
        assert!(
            Arc::ptr_eq(&a, &m.stream(&kafka(42, "orders"))),
            "same stream, one entry"
        );
        assert!(!Arc::ptr_eq(&a, &m.stream(&kafka(41, "payments"))));
        // The type's own name, given or not, is one stream; another name is not.
        let named = kafka(43, "orders").operation_named("process");
        assert!(Arc::ptr_eq(&a, &m.stream(&named)));
        let polled = kafka(43, "orders").operation_named("poll");
        assert!(!Arc::ptr_eq(&a, &m.stream(&polled)));
    }

    #[test]
    fn unique_destination_names_stay_off_metrics() {
        let m = metrics();
        let mut d = MessageDescription::new(MessagingSystem::RabbitMq, OperationType::Process)
            .destination("amq.gen-x1");
        d.destination.anonymous = true;
        assert_eq!(
            render(m.stream(&d).attributes()),
            [
                "messaging.system.name=rabbitmq",
                "messaging.operation.name=process",
                "messaging.operation.type=process"
            ]
        );
    }

    #[test]
    fn derived_sets_are_built_once_per_stream() {
        let dup = Metrics::new(MeterSource::Global, Conventions::Dup);
        let d = MessageDescription::new(MessagingSystem::Embedded, OperationType::Process);
        let process = dup.stream(&d);
        let ack = process.settle("ack");
        assert!(Arc::ptr_eq(&ack, &process.settle("ack")));
        assert_eq!(
            render(&ack.with_error("io")),
            [
                "messaging.system.name=mqtrace",
                "messaging.operation.name=ack",
                "messaging.operation.type=settle",
                "messaging.system=mqtrace",
                "error.type=io"
            ]
        );
        assert!(Arc::ptr_eq(&ack.with_error("io"), &ack.with_error("io")));
        assert_eq!(
            render(process.disposition(Disposition::DeadLetter)),
            [
                "messaging.system.name=mqtrace",
                "messaging.operation.name=process",
                "messaging.operation.type=process",
                "messaging.system=mqtrace",
                "messaging.operation=deliver",
                "mqtrace.message.disposition=dead_lettered"
            ]
        );
    }

    #[test]
    fn the_stream_hash_reads_every_byte() {
        let hash = |bytes: &[u8]| {
            let mut h = StreamHasher::default();
            h.write(bytes);
            h.finish()
        };
        assert_ne!(hash(b"orders-1"), hash(b"orders-2"));
        assert_ne!(hash(b"orders.dlq1"), hash(b"orders.dlq2"));
        assert_ne!(hash(b"a"), hash(b"b"));
    }
}
