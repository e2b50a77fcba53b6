//! W3C Trace Context (`traceparent`, `tracestate`) and W3C Baggage, on the
//! OpenTelemetry API alone.
//!
//! opentelemetry-rust ships these propagators only inside its SDK's trace
//! pipeline; the core stays on the API (see `docs/adr/0003-w3c-propagators-in-core.md`).
//! They behave as the SDK's do, byte for byte on inject and value for value on
//! extract: the tests compare the two on arbitrary input. One difference, on
//! inject: an empty `tracestate` is not written (the SDK writes the header with
//! an empty value; the Java, Go and Python propagators leave it out).

use std::str::FromStr;

use opentelemetry::baggage::{BaggageExt, KeyValueMetadata};
use opentelemetry::propagation::text_map_propagator::FieldIter;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";
const BAGGAGE: &str = "baggage";
/// Versions above this one are invalid; version 0 has exactly four fields.
const HIGHEST_VERSION: u8 = 254;
/// W3C Baggage: at most this many bytes and members are read.
const BAGGAGE_MAX_LEN: usize = 8192;
const BAGGAGE_MAX_MEMBERS: usize = 64;
/// Characters escaped in baggage names and values.
const ESCAPED: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b';').add(b',').add(b'=');

static TRACE_FIELDS: std::sync::LazyLock<[String; 2]> =
    std::sync::LazyLock::new(|| [TRACEPARENT.to_owned(), TRACESTATE.to_owned()]);
static BAGGAGE_FIELDS: std::sync::LazyLock<[String; 1]> =
    std::sync::LazyLock::new(|| [BAGGAGE.to_owned()]);

/// W3C Trace Context: `traceparent` and `tracestate`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextFormat;

impl TraceContextFormat {
    /// The remote span context in `traceparent` (and `tracestate`), if valid.
    pub fn parse(extractor: &dyn Extractor) -> Option<SpanContext> {
        let header = extractor.get(TRACEPARENT).unwrap_or("").trim();
        let (trace_id, span_id, flags) = match canonical(header) {
            Some(fields) => fields,
            None => general(header)?,
        };
        let flags = TraceFlags::new(flags) & TraceFlags::SAMPLED;
        let state = extractor
            .get(TRACESTATE)
            .and_then(|s| TraceState::from_str(s).ok())
            .unwrap_or_default();
        let sc = SpanContext::new(trace_id, span_id, flags, true, state);
        sc.is_valid().then_some(sc)
    }

    /// `traceparent` for a span context.
    pub fn traceparent(sc: &SpanContext) -> String {
        // Written into a fixed buffer: the formatting machinery cost about 2,000
        // instructions per message (callgrind), pushing characters one by one
        // about 550, this about a third of that.
        let mut out = [0u8; 55];
        out[..3].copy_from_slice(b"00-");
        hex_into(&mut out[3..35], &sc.trace_id().to_bytes());
        out[35] = b'-';
        hex_into(&mut out[36..52], &sc.span_id().to_bytes());
        out[52] = b'-';
        hex_into(
            &mut out[53..],
            &[(sc.trace_flags() & TraceFlags::SAMPLED).to_u8()],
        );
        // Only hexadecimal digits and dashes were written: always UTF-8.
        String::from_utf8(out.to_vec()).unwrap_or_default()
    }
}

/// A `traceparent` as every producer writes it: version, ids and flags in
/// lower-case hexadecimal, 55 bytes. Read without splitting or allocating; it
/// gives what [`general`] gives for the same header.
fn canonical(header: &str) -> Option<(TraceId, SpanId, u8)> {
    let b = header.as_bytes();
    if b.len() != 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let [version] = lower_hex::<1>(&b[..2])?;
    if version > HIGHEST_VERSION {
        return None;
    }
    let trace_id = TraceId::from_bytes(lower_hex(&b[3..35])?);
    let span_id = SpanId::from_bytes(lower_hex(&b[36..52])?);
    let [flags] = lower_hex::<1>(&b[53..])?;
    Some((trace_id, span_id, flags))
}

/// Each byte's value as a lower-case hexadecimal digit; 0xff for any other byte.
const LOWER_HEX: [u8; 256] = {
    let mut table = [0xff; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

/// The `N` bytes that `2 * N` lower-case hexadecimal digits spell, if they all
/// are such digits.
fn lower_hex<const N: usize>(digits: &[u8]) -> Option<[u8; N]> {
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    // A digit's value is below 16, the mark of any other byte is 0xff: one test
    // at the end covers every digit.
    let mut seen = 0u8;
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let (high, low) = (
            LOWER_HEX[usize::from(pair[0])],
            LOWER_HEX[usize::from(pair[1])],
        );
        seen |= high | low;
        *byte = high << 4 | (low & 0x0f);
    }
    (seen < 16).then_some(out)
}

/// Any other `traceparent`, read field by field as the SDK's propagator reads
/// it (what it accepts, this accepts).
fn general(header: &str) -> Option<(TraceId, SpanId, u8)> {
    let fields: Vec<&str> = header.split_terminator('-').collect();
    let [version, trace_id, span_id, flags, ..] = fields[..] else {
        return None;
    };
    let version = u8::from_str_radix(version, 16).ok()?;
    if version > HIGHEST_VERSION || (version == 0 && fields.len() != 4) {
        return None;
    }
    // Ids and flags are lower-case hexadecimal.
    let lower = |s: &str| !s.bytes().any(|b| b.is_ascii_uppercase());
    if !(lower(trace_id) && lower(span_id) && lower(flags)) {
        return None;
    }
    Some((
        TraceId::from_hex(trace_id).ok()?,
        SpanId::from_hex(span_id).ok()?,
        u8::from_str_radix(flags, 16).ok()?,
    ))
}

/// Writes `bytes` as lower-case hexadecimal into `out` (twice their length).
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
}

impl TextMapPropagator for TraceContextFormat {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        let span = cx.span();
        let sc = span.span_context();
        if sc.is_valid() {
            injector.set(TRACEPARENT, Self::traceparent(sc));
            // An empty `tracestate` says nothing: it is left out, as the Java,
            // Go and Python propagators leave it out (the Rust SDK's writes it),
            // so a message carries one header fewer.
            let state = sc.trace_state().header();
            if !state.is_empty() {
                injector.set(TRACESTATE, state);
            }
        }
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        match Self::parse(extractor) {
            Some(sc) => cx.with_remote_span_context(sc),
            None => cx.clone(),
        }
    }

    fn fields(&self) -> FieldIter<'_> {
        FieldIter::new(&TRACE_FIELDS[..])
    }
}

/// W3C Baggage: the `baggage` header.
#[derive(Debug, Clone, Copy, Default)]
pub struct BaggageFormat;

impl TextMapPropagator for BaggageFormat {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        let baggage = cx.baggage();
        if baggage.is_empty() {
            return;
        }
        let mut header = String::new();
        for (i, (name, (value, metadata))) in baggage.iter().enumerate() {
            if i > 0 {
                header.push(',');
            }
            header.extend(utf8_percent_encode(name.as_str().trim(), ESCAPED));
            header.push('=');
            header.extend(utf8_percent_encode(value.as_str().trim(), ESCAPED));
            let metadata = metadata.as_str().trim();
            if !metadata.is_empty() {
                header.push(';');
                header.push_str(metadata);
            }
        }
        injector.set(BAGGAGE, header);
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        let Some(header) = extractor.get(BAGGAGE) else {
            return cx.clone();
        };
        if header.len() > BAGGAGE_MAX_LEN {
            return cx.clone();
        }
        let members = header
            .split(',')
            .take(BAGGAGE_MAX_MEMBERS)
            .filter_map(baggage_member);
        cx.with_baggage(members)
    }

    fn fields(&self) -> FieldIter<'_> {
        FieldIter::new(&BAGGAGE_FIELDS[..])
    }
}

/// One `name=value;properties` member, decoded; `None` when malformed.
fn baggage_member(member: &str) -> Option<KeyValueMetadata> {
    let mut parts = member.split(';');
    let mut pair = parts.next()?.split('=');
    let (name, value) = (pair.next()?, pair.next()?);
    let name = percent_decode_str(name).decode_utf8().ok()?;
    let value = percent_decode_str(value).decode_utf8().ok()?;
    // The properties, each decoded (those that are not UTF-8 left out) and
    // trimmed, joined again without the separator before the first.
    let properties = parts
        .filter_map(|p| percent_decode_str(p).decode_utf8().ok())
        .map(|p| p.trim().to_owned())
        .collect::<Vec<String>>()
        .join(";");
    Some(KeyValueMetadata::new(
        name.trim().to_owned(),
        value.trim().to_owned(),
        properties.as_str(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::propagation::SimpleCarrier;
    use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
    use proptest::prelude::*;

    fn carrier(pairs: &[(&str, &str)]) -> SimpleCarrier {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn same_extraction(c: &SimpleCarrier) {
        let ours = TraceContextFormat.extract(c);
        let sdk = TraceContextPropagator::new().extract(c);
        assert_eq!(
            ours.span().span_context(),
            sdk.span().span_context(),
            "{c:?}"
        );
        let ours = BaggageFormat.extract(c);
        let sdk = BaggagePropagator::new().extract(c);
        let list = |cx: &Context| {
            let mut v: Vec<String> = cx
                .baggage()
                .iter()
                .map(|(k, (v, m))| format!("{k}={v};{}", m.as_str()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(list(&ours), list(&sdk), "{c:?}");
    }

    #[test]
    fn known_headers_read_as_the_sdk_reads_them() {
        for tp in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "",
            "garbage",
        ] {
            for ts in ["", "vendor=abc,other=x", "bad state!"] {
                same_extraction(&carrier(&[
                    ("traceparent", tp),
                    ("tracestate", ts),
                    ("baggage", "user=ada%20l,tier=gold;ttl=60;x,=novalue,broken"),
                ]));
            }
        }
    }

    #[test]
    fn injection_writes_what_the_sdk_writes() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let input = carrier(&[("traceparent", tp), ("tracestate", "vendor=abc")]);
        let cx = TraceContextPropagator::new()
            .extract(&input)
            .with_baggage(vec![
                KeyValueMetadata::new("user", "ada l", ""),
                KeyValueMetadata::new("tier", "gold=1", "ttl=60"),
            ]);
        let (mut ours, mut sdk) = (SimpleCarrier::new(), SimpleCarrier::new());
        TraceContextFormat.inject_context(&cx, &mut ours);
        BaggageFormat.inject_context(&cx, &mut ours);
        TraceContextPropagator::new().inject_context(&cx, &mut sdk);
        BaggagePropagator::new().inject_context(&cx, &mut sdk);
        assert_eq!(ours, sdk);
        assert_eq!(ours["traceparent"], tp);
        // An empty `tracestate` is left out.
        let bare = carrier(&[("traceparent", tp)]);
        let mut written = SimpleCarrier::new();
        TraceContextFormat
            .inject_context(&TraceContextPropagator::new().extract(&bare), &mut written);
        assert_eq!(written.keys().collect::<Vec<_>>(), ["traceparent"]);
        // Nothing for a context without a span or baggage.
        let mut empty = SimpleCarrier::new();
        TraceContextFormat.inject_context(&Context::new(), &mut empty);
        BaggageFormat.inject_context(&Context::new(), &mut empty);
        assert!(empty.is_empty());
    }

    proptest! {
        /// Any header values: both read them the same.
        #[test]
        fn arbitrary_headers_read_as_the_sdk_reads_them(
            tp in "(0[0-9a-f]|[0-9a-fA-F]{0,3})-[0-9a-fA-F]{0,34}-[0-9a-fA-F]{0,18}-[0-9a-fA-F]{0,3}(-[a-z]{0,3})?",
            ts in "[ -~]{0,40}",
            baggage in "[ -~]{0,80}",
        ) {
            same_extraction(&carrier(&[("traceparent", &tp), ("tracestate", &ts), ("baggage", &baggage)]));
        }

        /// Headers of the canonical shape, lower case and any case: the fast
        /// reading agrees with the general one, and both with the SDK.
        #[test]
        fn canonical_headers_read_as_the_sdk_reads_them(
            lower in "[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}",
            any in "[0-9a-fA-F]{2}-[0-9a-fA-F]{32}-[0-9a-fA-F]{16}-[0-9a-fA-F]{2}",
            // The bytes just outside the digits' ranges, now and then.
            near in "[/0-9:`a-gF-G]{2}-[/0-9:`a-gF-G]{32}-[/0-9:`a-gF-G]{16}-[/0-9:`a-gF-G]{2}",
        ) {
            for tp in [&lower, &any, &near] {
                prop_assert_eq!(canonical(tp).or_else(|| general(tp)), general(tp));
                same_extraction(&carrier(&[("traceparent", tp)]));
            }
            prop_assert!(canonical(&lower).is_some() || lower.starts_with("ff"));
        }

        /// Any span context: both write the same `traceparent`.
        #[test]
        fn arbitrary_contexts_are_written_as_the_sdk_writes_them(
            trace_id in any::<u128>(),
            span_id in any::<u64>(),
            flags in any::<u8>(),
        ) {
            let sc = SpanContext::new(
                TraceId::from(trace_id),
                SpanId::from(span_id),
                TraceFlags::new(flags),
                true,
                TraceState::default(),
            );
            let cx = Context::new().with_remote_span_context(sc);
            let (mut ours, mut sdk) = (SimpleCarrier::new(), SimpleCarrier::new());
            TraceContextFormat.inject_context(&cx, &mut ours);
            TraceContextPropagator::new().inject_context(&cx, &mut sdk);
            // The SDK writes the empty `tracestate`; mqtrace leaves it out.
            if cx.span().span_context().is_valid() {
                let state = sdk.remove("tracestate");
                prop_assert_eq!(state.as_deref(), Some(""));
            }
            prop_assert_eq!(ours, sdk);
        }

        /// Any baggage: both write the same header.
        #[test]
        fn arbitrary_baggage_is_written_as_the_sdk_writes_it(
            entries in proptest::collection::vec(("[a-z][a-z0-9]{0,8}", "[ -~]{0,12}", "[a-z=;]{0,8}"), 1..6),
        ) {
            let cx = Context::new().with_baggage(
                entries.iter().map(|(k, v, m)| KeyValueMetadata::new(k.clone(), v.clone(), m.as_str())),
            );
            let (mut ours, mut sdk) = (SimpleCarrier::new(), SimpleCarrier::new());
            BaggageFormat.inject_context(&cx, &mut ours);
            BaggagePropagator::new().inject_context(&cx, &mut sdk);
            prop_assert_eq!(ours, sdk);
        }
    }
}
