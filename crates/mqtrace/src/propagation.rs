//! Context propagation through message headers.
//!
//! [`Propagation`] is a [`TextMapPropagator`] made of an ordered list of trace-context
//! formats and, optionally, W3C baggage:
//!
//! - **Inject** writes every format (so consumers that understand only one still
//!   connect) and the baggage.
//! - **Extract** starts from an empty [`Context`], never from the current one, and
//!   tries the formats **in the order they were added: the first one that yields a
//!   valid remote span context wins**. Baggage is extracted independently.
//! - Untrusted input is bounded before any propagator sees it: values longer than
//!   [`MAX_HEADER_VALUE_LEN`] are ignored, a `tracestate` over 32 members or 512
//!   characters is dropped (the `traceparent` is kept), a `baggage` header over 8192
//!   bytes or 64 members is dropped.
//! - Nothing here fails: bad input yields "no remote context", logged at debug level
//!   under the `mqtrace` target with the header keys seen.
//!
//! Carriers are OpenTelemetry's own [`Injector`] / [`Extractor`] traits implemented
//! on borrowing newtypes by each adapter.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use opentelemetry::baggage::BaggageExt;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;

pub use crate::w3c::{BaggageFormat, TraceContextFormat};

/// Longest header value any propagator is shown. Longer values are treated as absent.
pub const MAX_HEADER_VALUE_LEN: usize = 8192;
/// W3C trace context: at most 32 `tracestate` members.
pub const MAX_TRACESTATE_MEMBERS: usize = 32;
/// W3C trace context: at most 512 characters of `tracestate`.
pub const MAX_TRACESTATE_LEN: usize = 512;
/// W3C baggage: at most 8192 bytes.
pub const MAX_BAGGAGE_LEN: usize = 8192;
/// W3C baggage: at most 64 members.
pub const MAX_BAGGAGE_MEMBERS: usize = 64;

type DynPropagator = Arc<dyn TextMapPropagator + Send + Sync>;

/// One trace-context format of a set.
#[derive(Clone)]
enum Format {
    /// W3C trace context, read straight into a span context.
    W3c,
    Other(DynPropagator),
}

impl Format {
    fn propagator(&self) -> &dyn TextMapPropagator {
        match self {
            Format::W3c => &TraceContextFormat,
            Format::Other(p) => p.as_ref(),
        }
    }

    /// The valid remote span context this format finds, if any.
    fn extract(&self, extractor: &dyn Extractor) -> Option<SpanContext> {
        match self {
            // No context built only to take the span context out of it again.
            Format::W3c => TraceContextFormat::parse(extractor),
            Format::Other(p) => {
                let found = p.extract_with_context(&Context::new(), extractor);
                let sc = found.span().span_context().clone();
                sc.is_valid().then_some(sc)
            }
        }
    }
}

/// The value stored under `key` among a carrier's `(key, value)` entries, keys
/// compared without regard to ASCII case: what every adapter's extractor does. A
/// key present under several spellings (or several times) counts only when all
/// its values agree; otherwise it reads as absent, so a damaged header yields no
/// context rather than a wrong one.
pub fn lookup<'a, V: PartialEq + Copy>(
    entries: impl IntoIterator<Item = (&'a str, V)>,
    key: &str,
) -> Option<V> {
    let mut found = None;
    for (k, v) in entries {
        if !k.eq_ignore_ascii_case(key) {
            continue;
        }
        match found {
            None => found = Some(v),
            Some(prev) if prev == v => {}
            Some(_) => return None,
        }
    }
    found
}

/// An extractor that answers the X-Ray format's key with a message's
/// `AWSTraceHeader` system attribute, when it has one, and every other key from
/// `inner`. This is how SQS and Lambda adapters read both places in one extraction,
/// with the inner formats first and X-Ray last
/// ([`Propagation::with_xray_fallback`]).
#[cfg(feature = "xray")]
#[derive(Debug, Clone, Copy)]
pub struct WithTraceHeader<'a, E> {
    /// The message's other carrier (its attributes).
    pub inner: E,
    /// The `AWSTraceHeader` value, if present.
    pub trace_header: Option<&'a str>,
}

#[cfg(feature = "xray")]
impl<E: Extractor> Extractor for WithTraceHeader<'_, E> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.trace_header {
            Some(h) if key.eq_ignore_ascii_case(XRAY_FIELD) => Some(h),
            _ => self.inner.get(key),
        }
    }

    fn keys(&self) -> Vec<&str> {
        let mut keys = self.inner.keys();
        if self.trace_header.is_some() {
            keys.push("AWSTraceHeader");
        }
        keys
    }
}

/// The header key of the X-Ray format.
#[cfg(feature = "xray")]
pub const XRAY_FIELD: &str = "x-amzn-trace-id";

/// An ordered set of trace-context formats plus optional baggage. See the
/// [module docs](self) for the rules.
#[derive(Clone)]
pub struct Propagation {
    trace: Vec<Format>,
    baggage: Option<Arc<BaggageFormat>>,
    fields: Vec<String>,
}

impl fmt::Debug for Propagation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Propagation")
            .field("formats", &self.trace.len())
            .field("baggage", &self.baggage.is_some())
            .field("fields", &self.fields)
            .finish()
    }
}

impl Default for Propagation {
    /// W3C trace context and W3C baggage.
    fn default() -> Self {
        Self::builder().w3c().baggage().build()
    }
}

/// Builds a [`Propagation`]; formats are tried on extraction in the order added.
#[derive(Default)]
pub struct PropagationBuilder {
    trace: Vec<Format>,
    baggage: bool,
}

impl fmt::Debug for PropagationBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PropagationBuilder")
            .field("formats", &self.trace.len())
            .field("baggage", &self.baggage)
            .finish()
    }
}

impl PropagationBuilder {
    /// W3C trace context (`traceparent`, `tracestate`).
    pub fn w3c(mut self) -> Self {
        self.trace.push(Format::W3c);
        self
    }

    /// AWS X-Ray (`X-Amzn-Trace-Id`; SQS adapters map it to `AWSTraceHeader`).
    #[cfg(feature = "xray")]
    pub fn xray(self) -> Self {
        self.format(opentelemetry_aws::trace::XrayPropagator::new())
    }

    /// Underscore keys (`trace_id`, `span_id`, `trace_flags`, `trace_state`), for
    /// systems that reject hyphenated header names.
    pub fn underscore(self) -> Self {
        self.format(UnderscorePropagator::new())
    }

    /// Any other trace-context format.
    pub fn format(mut self, propagator: impl TextMapPropagator + Send + Sync + 'static) -> Self {
        self.trace.push(Format::Other(Arc::new(propagator)));
        self
    }

    /// W3C baggage.
    pub fn baggage(mut self) -> Self {
        self.baggage = true;
        self
    }

    /// Finishes the set.
    pub fn build(self) -> Propagation {
        let baggage = self.baggage.then(|| Arc::new(BaggageFormat));
        let mut fields: Vec<String> = Vec::new();
        let trace_fields = self.trace.iter().flat_map(|p| {
            p.propagator()
                .fields()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        });
        let baggage_fields = baggage
            .iter()
            .flat_map(|b| b.fields().map(str::to_owned).collect::<Vec<_>>());
        for f in trace_fields.chain(baggage_fields) {
            if !fields.contains(&f) {
                fields.push(f);
            }
        }
        Propagation {
            trace: self.trace,
            baggage,
            fields,
        }
    }
}

/// The process's default formats, set by the telemetry set-up.
static DEFAULT: std::sync::RwLock<Option<Propagation>> = std::sync::RwLock::new(None);
/// Whether [`DEFAULT`] was ever set: the lock is not touched until then.
static DEFAULT_SET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// W3C trace context and baggage, while no default is set.
static BUILTIN: std::sync::LazyLock<Propagation> = std::sync::LazyLock::new(Propagation::default);

impl Propagation {
    /// Makes `propagation` the formats of every [`crate::Instrumenter`] not told
    /// otherwise: each takes it at its first inject or extract once a default is
    /// set, and keeps it (until then, W3C trace context and baggage). `mqtrace-telemetry` calls
    /// this when it installs its propagator globally, so the headers mqtrace writes
    /// and reads are those the rest of the process uses.
    pub fn set_default(propagation: Propagation) {
        let mut slot = DEFAULT
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *slot = Some(propagation);
        DEFAULT_SET.store(true, std::sync::atomic::Ordering::Release);
    }

    /// The default given to [`Propagation::set_default`], if any.
    pub(crate) fn installed_default() -> Option<Propagation> {
        if !DEFAULT_SET.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        DEFAULT
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// W3C trace context and baggage, shared.
    pub(crate) fn builtin() -> &'static Propagation {
        &BUILTIN
    }

    /// The process's default formats: those given to [`Propagation::set_default`],
    /// else W3C trace context and baggage.
    pub fn current_default() -> Propagation {
        Self::installed_default().unwrap_or_default()
    }

    /// Starts an empty set.
    pub fn builder() -> PropagationBuilder {
        PropagationBuilder::default()
    }

    /// Extracts the remote context of a message, starting from an empty context. A
    /// message without a usable context yields a context whose span context is
    /// invalid.
    pub fn extract(&self, carrier: &dyn Extractor) -> Context {
        let bounded = Bounded(carrier);
        let cx = self.extract_with_context(&Context::new(), &bounded);
        if tracing::enabled!(target: "mqtrace", tracing::Level::DEBUG) {
            let sc = cx.span().span_context().clone();
            tracing::debug!(
                target: "mqtrace",
                valid = sc.is_valid(),
                trace_id = %sc.trace_id(),
                span_id = %sc.span_id(),
                keys = ?carrier.keys(),
                "extract"
            );
        }
        cx
    }

    /// Injects a context into a message's headers.
    pub fn inject(&self, cx: &Context, carrier: &mut dyn Injector) {
        self.inject_context(cx, carrier);
        log_inject(cx, &self.fields);
    }

    /// Injects as many formats as fit in `budget` header entries, each format whole
    /// or not at all (a consumer never sees half a context). Formats are considered
    /// in order, then baggage; empty values are not written. Returns the number of
    /// entries written.
    pub fn inject_within(&self, cx: &Context, carrier: &mut dyn Injector, budget: usize) -> usize {
        let mut written = 0;
        let mut staged = Staged::default();
        let trace = self.trace.iter().map(Format::propagator);
        let baggage = self
            .baggage
            .iter()
            .map(|b| b.as_ref() as &dyn TextMapPropagator);
        for propagator in trace.chain(baggage) {
            staged.0.clear();
            propagator.inject_context(cx, &mut staged);
            if staged.0.is_empty() {
                continue;
            }
            if written + staged.0.len() > budget {
                tracing::debug!(
                    target: "mqtrace",
                    fields = ?staged.0.iter().map(|(k, _)| k).collect::<Vec<_>>(),
                    budget,
                    written,
                    "header budget exhausted: format not injected"
                );
                continue;
            }
            written += staged.0.len();
            for (k, v) in staged.0.drain(..) {
                carrier.set(&k, v);
            }
        }
        log_inject(cx, &self.fields);
        written
    }

    /// This set with X-Ray appended as the last format to try, unless it has it:
    /// extraction falls back to `X-Amzn-Trace-Id` when the others find nothing.
    #[cfg(feature = "xray")]
    pub fn with_xray_fallback(&self) -> Propagation {
        if self
            .fields
            .iter()
            .any(|f| f.eq_ignore_ascii_case(XRAY_FIELD))
        {
            return self.clone();
        }
        let mut p = self.clone();
        p.trace.push(Format::Other(Arc::new(
            opentelemetry_aws::trace::XrayPropagator::new(),
        )));
        p.fields.push(XRAY_FIELD.to_owned());
        p
    }

    /// Every header key this set may write.
    pub fn header_fields(&self) -> &[String] {
        &self.fields
    }
}

fn log_inject(cx: &Context, fields: &[String]) {
    if tracing::enabled!(target: "mqtrace", tracing::Level::DEBUG) {
        let span = cx.span();
        let sc = span.span_context();
        tracing::debug!(
            target: "mqtrace",
            trace_id = %sc.trace_id(),
            span_id = %sc.span_id(),
            keys = ?fields,
            "inject"
        );
    }
}

impl TextMapPropagator for Propagation {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        for p in &self.trace {
            p.propagator().inject_context(cx, injector);
        }
        if let Some(b) = &self.baggage {
            b.inject_context(cx, injector);
        }
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        let mut out = cx.clone();
        if let Some(sc) = self.trace.iter().find_map(|p| p.extract(extractor)) {
            out = out.with_remote_span_context(sc);
        }
        if let Some(b) = &self.baggage {
            let found = b.extract_with_context(&Context::new(), extractor);
            if !found.baggage().is_empty() {
                out = out.with_baggage(found.baggage().iter().map(|(k, (v, m))| {
                    opentelemetry::baggage::KeyValueMetadata::new(k.clone(), v.clone(), m.clone())
                }));
            }
        }
        out
    }

    fn fields(&self) -> opentelemetry::propagation::text_map_propagator::FieldIter<'_> {
        opentelemetry::propagation::text_map_propagator::FieldIter::new(&self.fields)
    }
}

/// Collects one propagator's entries so they can be written all or none. Empty
/// values (an empty `tracestate`) carry nothing and are not worth a header slot;
/// some brokers (SQS) reject them outright.
#[derive(Default)]
struct Staged(Vec<(String, String)>);

impl Injector for Staged {
    fn set(&mut self, key: &str, value: String) {
        if !value.is_empty() {
            self.0.push((key.to_owned(), value));
        }
    }
}

/// Applies the size limits on untrusted input before a propagator reads it.
struct Bounded<'a>(&'a dyn Extractor);

impl Extractor for Bounded<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let value = self.0.get(key)?;
        if value.len() > MAX_HEADER_VALUE_LEN {
            tracing::debug!(target: "mqtrace", key, len = value.len(), "header value too long: ignored");
            return None;
        }
        if key.eq_ignore_ascii_case("tracestate") || key.eq_ignore_ascii_case("trace_state") {
            let members = value.split(',').filter(|m| !m.trim().is_empty()).count();
            if value.len() > MAX_TRACESTATE_LEN || members > MAX_TRACESTATE_MEMBERS {
                tracing::debug!(target: "mqtrace", key, len = value.len(), members, "tracestate over W3C limits: dropped");
                return None;
            }
        }
        if key.eq_ignore_ascii_case("baggage") {
            let members = value.split(',').count();
            if value.len() > MAX_BAGGAGE_LEN || members > MAX_BAGGAGE_MEMBERS {
                tracing::debug!(target: "mqtrace", len = value.len(), members, "baggage over W3C limits: dropped");
                return None;
            }
        }
        Some(value)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys()
    }
}

/// Trace context under underscore keys: `trace_id` (32 hex digits), `span_id` (16 hex
/// digits), `trace_flags` (decimal, `1` = sampled) and `trace_state` (W3C
/// `tracestate` syntax). For systems that reject hyphenated header names.
#[derive(Debug, Clone, Default)]
pub struct UnderscorePropagator {
    _private: (),
}

const TRACE_ID: &str = "trace_id";
const SPAN_ID: &str = "span_id";
const TRACE_FLAGS: &str = "trace_flags";
const TRACE_STATE: &str = "trace_state";

impl UnderscorePropagator {
    /// A new propagator.
    pub fn new() -> Self {
        Self::default()
    }

    fn parse(extractor: &dyn Extractor) -> Option<SpanContext> {
        let trace_id = hex_id::<16>(extractor.get(TRACE_ID)?)?;
        let span_id = hex_id::<8>(extractor.get(SPAN_ID)?)?;
        let flags = match extractor.get(TRACE_FLAGS) {
            Some(f) => f.trim().parse::<u8>().ok()?,
            None => 0,
        };
        let state = extractor
            .get(TRACE_STATE)
            .and_then(|s| TraceState::from_str(s).ok())
            .unwrap_or_default();
        let sc = SpanContext::new(
            TraceId::from_bytes(trace_id),
            SpanId::from_bytes(span_id),
            TraceFlags::new(flags) & TraceFlags::SAMPLED,
            true,
            state,
        );
        sc.is_valid().then_some(sc)
    }
}

/// Parses exactly `2 * N` hex digits.
fn hex_id<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.trim().as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

impl TextMapPropagator for UnderscorePropagator {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        let span = cx.span();
        let sc = span.span_context();
        if !sc.is_valid() {
            return;
        }
        injector.set(TRACE_ID, sc.trace_id().to_string());
        injector.set(SPAN_ID, sc.span_id().to_string());
        injector.set(
            TRACE_FLAGS,
            (sc.trace_flags() & TraceFlags::SAMPLED).to_u8().to_string(),
        );
        let state = sc.trace_state().header();
        if !state.is_empty() {
            injector.set(TRACE_STATE, state);
        }
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        match Self::parse(extractor) {
            Some(sc) => cx.with_remote_span_context(sc),
            None => cx.clone(),
        }
    }

    fn fields(&self) -> opentelemetry::propagation::text_map_propagator::FieldIter<'_> {
        static FIELDS: std::sync::OnceLock<[String; 4]> = std::sync::OnceLock::new();
        let fields =
            FIELDS.get_or_init(|| [TRACE_ID, SPAN_ID, TRACE_FLAGS, TRACE_STATE].map(str::to_owned));
        opentelemetry::propagation::text_map_propagator::FieldIter::new(fields)
    }
}

/// A header map for tests, examples and the embedded broker's unit tests:
/// `HashMap<String, String>` already implements both carrier traits.
pub type SimpleCarrier = std::collections::HashMap<String, String>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_ignores_case_and_refuses_disagreement() {
        let entries = [
            ("TraceParent", 1),
            ("x", 2),
            ("traceparent", 1),
            ("dup", 3),
            ("DUP", 4),
        ];
        assert_eq!(lookup(entries, "traceparent"), Some(1));
        assert_eq!(lookup(entries, "X"), Some(2));
        assert_eq!(lookup(entries, "dup"), None);
        assert_eq!(lookup(entries, "absent"), None);
    }
    use opentelemetry::trace::TraceContextExt;

    fn remote(flags: u8, state: &str) -> Context {
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap_or(TraceId::INVALID),
            SpanId::from_hex("00f067aa0ba902b7").unwrap_or(SpanId::INVALID),
            TraceFlags::new(flags),
            true,
            TraceState::from_str(state).unwrap_or_default(),
        ))
    }

    fn sc(cx: &Context) -> SpanContext {
        cx.span().span_context().clone()
    }

    #[test]
    fn underscore_round_trip() {
        let p = Propagation::builder().underscore().build();
        let cx = remote(1, "vendor=abc");
        let mut headers = SimpleCarrier::new();
        p.inject(&cx, &mut headers);
        assert_eq!(headers["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(headers["span_id"], "00f067aa0ba902b7");
        assert_eq!(headers["trace_flags"], "1");
        assert_eq!(headers["trace_state"], "vendor=abc");
        let back = sc(&p.extract(&headers));
        assert_eq!(back.trace_id(), sc(&cx).trace_id());
        assert_eq!(back.span_id(), sc(&cx).span_id());
        assert!(back.is_sampled());
        assert!(back.is_remote());
        assert_eq!(back.trace_state().get("vendor"), Some("abc"));
    }

    #[test]
    fn underscore_rejects_bad_ids() {
        let p = UnderscorePropagator::new();
        for (t, s) in [
            ("4bf92f3577b34da6a3ce929d0e0e473", "00f067aa0ba902b7"),
            ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902bz"),
            ("00000000000000000000000000000000", "00f067aa0ba902b7"),
            ("4bf92f3577b34da6a3ce929d0e0e4736", "0000000000000000"),
        ] {
            let mut h = SimpleCarrier::new();
            h.insert("trace_id".into(), t.into());
            h.insert("span_id".into(), s.into());
            assert!(UnderscorePropagator::parse(&h).is_none(), "{t} {s}");
            assert!(!sc(&p.extract_with_context(&Context::new(), &h)).is_valid());
        }
    }

    #[test]
    fn first_valid_format_wins() {
        let p = Propagation::builder().w3c().underscore().build();
        let mut h = SimpleCarrier::new();
        h.insert(
            "traceparent".into(),
            "00-11111111111111111111111111111111-2222222222222222-01".into(),
        );
        h.insert("trace_id".into(), "33333333333333333333333333333333".into());
        h.insert("span_id".into(), "4444444444444444".into());
        assert_eq!(
            sc(&p.extract(&h)).trace_id().to_string(),
            "11111111111111111111111111111111"
        );
        // A malformed first format falls through to the next.
        h.insert("traceparent".into(), "00-zz-22-01".into());
        assert_eq!(
            sc(&p.extract(&h)).trace_id().to_string(),
            "33333333333333333333333333333333"
        );
    }

    #[test]
    fn oversized_tracestate_is_dropped_but_traceparent_kept() {
        let p = Propagation::default();
        let mut h = SimpleCarrier::new();
        h.insert(
            "traceparent".into(),
            "00-11111111111111111111111111111111-2222222222222222-01".into(),
        );
        let members: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        h.insert("tracestate".into(), members.join(","));
        let got = sc(&p.extract(&h));
        assert!(got.is_valid());
        assert_eq!(got.trace_state().header(), "");
        let members: Vec<String> = (0..32).map(|i| format!("k{i}=v")).collect();
        h.insert("tracestate".into(), members.join(","));
        assert_eq!(sc(&p.extract(&h)).trace_state().header(), members.join(","));
    }

    #[test]
    fn oversized_baggage_is_dropped() {
        let p = Propagation::default();
        let mut h = SimpleCarrier::new();
        h.insert("baggage".into(), "a=1,b=2".into());
        assert_eq!(p.extract(&h).baggage().len(), 2);
        let big: Vec<String> = (0..65).map(|i| format!("k{i}=v")).collect();
        h.insert("baggage".into(), big.join(","));
        assert_eq!(p.extract(&h).baggage().len(), 0);
    }

    #[test]
    fn inject_within_never_writes_half_a_format() {
        let p = Propagation::builder().w3c().underscore().build();
        let cx = remote(1, "");
        let mut h = SimpleCarrier::new();
        // traceparent alone (1 entry) fits; underscore needs 3 and does not.
        assert_eq!(p.inject_within(&cx, &mut h, 2), 1);
        assert!(h.contains_key("traceparent"));
        assert!(!h.contains_key("trace_id") && !h.contains_key("span_id"));
        let mut h = SimpleCarrier::new();
        assert_eq!(p.inject_within(&cx, &mut h, 0), 0);
        assert!(h.is_empty());
    }

    #[cfg(feature = "xray")]
    #[test]
    fn xray_round_trip_and_precedence() {
        let p = Propagation::builder().xray().w3c().build();
        let cx = remote(1, "");
        let mut h = SimpleCarrier::new();
        p.inject(&cx, &mut h);
        let xray = h.get("x-amzn-trace-id").cloned().unwrap_or_default();
        assert!(
            xray.starts_with("Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7"),
            "{xray}"
        );
        assert_eq!(sc(&p.extract(&h)).trace_id(), sc(&cx).trace_id());
        // With only the W3C header present the second format is used.
        let mut only_w3c = SimpleCarrier::new();
        only_w3c.insert("traceparent".into(), h["traceparent"].clone());
        assert_eq!(sc(&p.extract(&only_w3c)).span_id(), sc(&cx).span_id());
    }
}
