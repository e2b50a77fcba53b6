//! OTLP/gRPC span export that writes the protobuf request straight from the
//! SDK's span data.
//!
//! The SDK's OTLP exporter clones each batch (to retry it), converts every span
//! into the generated protobuf structs (a new `String` for every attribute key
//! and string value, vectors for the ids), encodes those (prost recomputes each
//! nested message's length at every level above it) and drops them. Counted
//! with callgrind, that was about two thirds of what a traced send cost the
//! service (`docs/benchmarks.md`). Here each span is measured once and written
//! once into one buffer: the same request on the wire, without the copies.
//!
//! A batch goes in as many requests as keep each under the collector's size
//! limit (4 MiB by default, gRPC's): a collector refuses an oversized request
//! whole, and 2,048 spans with both conventions' attributes, exception events
//! or captured headers pass 4 MiB. The answer's partial success is read, and
//! the spans it rejects are counted as rejected, not exported.
//!
//! It speaks plain OTLP/gRPC (`http://` endpoints, no compression, no extra
//! headers); [`crate::TelemetryBuilder`] keeps the SDK's exporter for any other
//! set-up, so every `OTEL_EXPORTER_OTLP_*` setting it reads keeps its effect. A
//! failed export is retried as the SDK's exporter retries by default: the codes
//! the OTLP specification calls retryable, three times at most, with backoff
//! from 100 ms to 1.6 s, within the export timeout (a `RESOURCE_EXHAUSTED`
//! answer's retry delay is not read: it is not retried).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf as _, BufMut as _};
use opentelemetry::trace::{SpanContext, SpanKind, Status};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

use crate::Tally;

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

// Wire types.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

// `SpanFlags` of the trace protocol: the parent's remoteness is known, and set.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

fn varint_len(v: u64) -> usize {
    // Seven bits a byte; at least one byte.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn key_len(tag: u32) -> usize {
    varint_len(u64::from(tag << 3))
}

fn put_key(buf: &mut Vec<u8>, tag: u32, wire: u32) {
    put_varint(buf, u64::from((tag << 3) | wire));
}

/// A length-delimited field whose payload is `n` bytes.
fn field_len(tag: u32, n: usize) -> usize {
    key_len(tag) + varint_len(n as u64) + n
}

fn put_len(buf: &mut Vec<u8>, tag: u32, n: usize) {
    put_key(buf, tag, LEN);
    put_varint(buf, n as u64);
}

/// A `string` or `bytes` field outside a `oneof`: absent when empty.
fn bytes_len(tag: u32, b: &[u8]) -> usize {
    if b.is_empty() {
        0
    } else {
        field_len(tag, b.len())
    }
}

fn put_bytes(buf: &mut Vec<u8>, tag: u32, b: &[u8]) {
    if !b.is_empty() {
        put_len(buf, tag, b.len());
        buf.extend_from_slice(b);
    }
}

fn fixed64_len(tag: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(tag) + 8
    }
}

fn put_fixed64(buf: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        put_key(buf, tag, FIXED64);
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

fn fixed32_len(tag: u32, v: u32) -> usize {
    if v == 0 {
        0
    } else {
        key_len(tag) + 4
    }
}

fn put_fixed32(buf: &mut Vec<u8>, tag: u32, v: u32) {
    if v != 0 {
        put_key(buf, tag, FIXED32);
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

fn uint_len(tag: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(tag) + varint_len(v)
    }
}

fn put_uint(buf: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        put_key(buf, tag, VARINT);
        put_varint(buf, v);
    }
}

/// One value of an attribute or of an array: the `oneof` of `AnyValue`, always
/// written, default or not.
#[derive(Clone, Copy)]
enum Scalar<'a> {
    Bool(bool),
    I64(i64),
    F64(f64),
    Str(&'a str),
}

impl Scalar<'_> {
    fn len(self) -> usize {
        match self {
            Scalar::Bool(_) => key_len(2) + 1,
            Scalar::I64(i) => key_len(3) + varint_len(i as u64),
            Scalar::F64(_) => key_len(4) + 8,
            Scalar::Str(s) => field_len(1, s.len()),
        }
    }

    fn put(self, buf: &mut Vec<u8>) {
        match self {
            Scalar::Bool(b) => {
                put_key(buf, 2, VARINT);
                buf.push(u8::from(b));
            }
            Scalar::I64(i) => {
                put_key(buf, 3, VARINT);
                put_varint(buf, i as u64);
            }
            Scalar::F64(f) => {
                put_key(buf, 4, FIXED64);
                buf.extend_from_slice(&f.to_bits().to_le_bytes());
            }
            Scalar::Str(s) => {
                put_len(buf, 1, s.len());
                buf.extend_from_slice(s.as_bytes());
            }
        }
    }
}

/// Calls `f` with each element of an array as a scalar.
fn each_element(array: &Array, mut f: impl FnMut(Scalar<'_>)) {
    match array {
        Array::Bool(v) => v.iter().for_each(|b| f(Scalar::Bool(*b))),
        Array::I64(v) => v.iter().for_each(|i| f(Scalar::I64(*i))),
        Array::F64(v) => v.iter().for_each(|x| f(Scalar::F64(*x))),
        Array::String(v) => v.iter().for_each(|s| f(Scalar::Str(s.as_str()))),
        // An array kind newer than this encoder: written as an empty array.
        _ => {}
    }
}

fn array_len(array: &Array) -> usize {
    let mut n = 0;
    each_element(array, |s| n += field_len(1, s.len()));
    n
}

/// The payload of an `AnyValue`.
fn any_len(value: &Value) -> usize {
    match value {
        Value::Bool(b) => Scalar::Bool(*b).len(),
        Value::I64(i) => Scalar::I64(*i).len(),
        Value::F64(f) => Scalar::F64(*f).len(),
        Value::String(s) => Scalar::Str(s.as_str()).len(),
        Value::Array(a) => field_len(5, array_len(a)),
        // A value kind newer than this encoder: an `AnyValue` without a value.
        _ => 0,
    }
}

fn put_any(buf: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Bool(b) => Scalar::Bool(*b).put(buf),
        Value::I64(i) => Scalar::I64(*i).put(buf),
        Value::F64(f) => Scalar::F64(*f).put(buf),
        Value::String(s) => Scalar::Str(s.as_str()).put(buf),
        Value::Array(a) => {
            put_len(buf, 5, array_len(a));
            each_element(a, |s| {
                put_len(buf, 1, s.len());
                s.put(buf);
            });
        }
        _ => {}
    }
}

/// The payload of a `KeyValue`: its value is always present.
fn kv_len(key: &str, value: &Value) -> usize {
    bytes_len(1, key.as_bytes()) + field_len(2, any_len(value))
}

fn put_kv(buf: &mut Vec<u8>, tag: u32, key: &str, value: &Value) {
    let any = any_len(value);
    put_len(buf, tag, bytes_len(1, key.as_bytes()) + field_len(2, any));
    put_bytes(buf, 1, key.as_bytes());
    put_len(buf, 2, any);
    put_any(buf, value);
}

fn attributes_len(tag: u32, attributes: &[KeyValue]) -> usize {
    attributes
        .iter()
        .map(|kv| field_len(tag, kv_len(kv.key.as_str(), &kv.value)))
        .sum()
}

fn put_attributes(buf: &mut Vec<u8>, tag: u32, attributes: &[KeyValue]) {
    for kv in attributes {
        put_kv(buf, tag, kv.key.as_str(), &kv.value);
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn flags(context: &SpanContext, remote: bool) -> u32 {
    let mut flags = u32::from(context.trace_flags().to_u8()) | HAS_IS_REMOTE;
    if remote {
        flags |= IS_REMOTE;
    }
    flags
}

fn kind(kind: &SpanKind) -> u64 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

/// A span's fields that are not plain copies, worked out once.
struct SpanParts {
    trace_state: String,
    parent: Option<[u8; 8]>,
    status_code: u64,
    len: usize,
}

fn status_parts(status: &Status) -> (u64, &str) {
    match status {
        Status::Unset => (0, ""),
        Status::Ok => (1, ""),
        Status::Error { description } => (2, description),
    }
}

fn status_len(status: &Status) -> usize {
    let (code, message) = status_parts(status);
    bytes_len(2, message.as_bytes()) + uint_len(3, code)
}

fn event_len(e: &opentelemetry::trace::Event) -> usize {
    fixed64_len(1, nanos(e.timestamp))
        + bytes_len(2, e.name.as_bytes())
        + attributes_len(3, &e.attributes)
        + uint_len(4, u64::from(e.dropped_attributes_count))
}

fn link_len(l: &opentelemetry::trace::Link) -> usize {
    let sc = &l.span_context;
    field_len(1, 16)
        + field_len(2, 8)
        + bytes_len(3, sc.trace_state().header().as_bytes())
        + attributes_len(4, &l.attributes)
        + uint_len(5, u64::from(l.dropped_attributes_count))
        + fixed32_len(6, flags(sc, sc.is_remote()))
}

fn span_parts(s: &SpanData) -> SpanParts {
    let trace_state = s.span_context.trace_state().header();
    let parent = (s.parent_span_id != opentelemetry::trace::SpanId::INVALID)
        .then(|| s.parent_span_id.to_bytes());
    let (status_code, _) = status_parts(&s.status);
    let len = field_len(1, 16)
        + field_len(2, 8)
        + bytes_len(3, trace_state.as_bytes())
        + parent.map_or(0, |p| field_len(4, p.len()))
        + bytes_len(5, s.name.as_bytes())
        + uint_len(6, kind(&s.span_kind))
        + fixed64_len(7, nanos(s.start_time))
        + fixed64_len(8, nanos(s.end_time))
        + attributes_len(9, &s.attributes)
        + uint_len(10, u64::from(s.dropped_attributes_count))
        + s.events
            .events
            .iter()
            .map(|e| field_len(11, event_len(e)))
            .sum::<usize>()
        + uint_len(12, u64::from(s.events.dropped_count))
        + s.links
            .links
            .iter()
            .map(|l| field_len(13, link_len(l)))
            .sum::<usize>()
        + uint_len(14, u64::from(s.links.dropped_count))
        + field_len(15, status_len(&s.status))
        + fixed32_len(16, flags(&s.span_context, s.parent_span_is_remote));
    SpanParts {
        trace_state,
        parent,
        status_code,
        len,
    }
}

fn put_span(buf: &mut Vec<u8>, s: &SpanData, parts: &SpanParts) {
    put_len(buf, 2, parts.len);
    put_bytes(buf, 1, &s.span_context.trace_id().to_bytes());
    put_bytes(buf, 2, &s.span_context.span_id().to_bytes());
    put_bytes(buf, 3, parts.trace_state.as_bytes());
    if let Some(parent) = &parts.parent {
        put_bytes(buf, 4, parent);
    }
    put_bytes(buf, 5, s.name.as_bytes());
    put_uint(buf, 6, kind(&s.span_kind));
    put_fixed64(buf, 7, nanos(s.start_time));
    put_fixed64(buf, 8, nanos(s.end_time));
    put_attributes(buf, 9, &s.attributes);
    put_uint(buf, 10, u64::from(s.dropped_attributes_count));
    for e in &s.events.events {
        put_len(buf, 11, event_len(e));
        put_fixed64(buf, 1, nanos(e.timestamp));
        put_bytes(buf, 2, e.name.as_bytes());
        put_attributes(buf, 3, &e.attributes);
        put_uint(buf, 4, u64::from(e.dropped_attributes_count));
    }
    put_uint(buf, 12, u64::from(s.events.dropped_count));
    for l in &s.links.links {
        let sc = &l.span_context;
        put_len(buf, 13, link_len(l));
        put_bytes(buf, 1, &sc.trace_id().to_bytes());
        put_bytes(buf, 2, &sc.span_id().to_bytes());
        put_bytes(buf, 3, sc.trace_state().header().as_bytes());
        put_attributes(buf, 4, &l.attributes);
        put_uint(buf, 5, u64::from(l.dropped_attributes_count));
        put_fixed32(buf, 6, flags(sc, sc.is_remote()));
    }
    put_uint(buf, 14, u64::from(s.links.dropped_count));
    put_len(buf, 15, status_len(&s.status));
    let (_, message) = status_parts(&s.status);
    put_bytes(buf, 2, message.as_bytes());
    put_uint(buf, 3, parts.status_code);
    put_fixed32(buf, 16, flags(&s.span_context, s.parent_span_is_remote));
}

fn scope_len(scope: &InstrumentationScope) -> usize {
    let attributes: usize = scope
        .attributes()
        .map(|kv| field_len(3, kv_len(kv.key.as_str(), &kv.value)))
        .sum();
    bytes_len(1, scope.name().as_bytes())
        + bytes_len(2, scope.version().unwrap_or_default().as_bytes())
        + attributes
}

fn put_scope(buf: &mut Vec<u8>, scope: &InstrumentationScope) {
    put_len(buf, 1, scope_len(scope));
    put_bytes(buf, 1, scope.name().as_bytes());
    put_bytes(buf, 2, scope.version().unwrap_or_default().as_bytes());
    for kv in scope.attributes() {
        put_kv(buf, 3, kv.key.as_str(), &kv.value);
    }
}

/// The service's resource, written once: the payload of the `Resource` message.
#[derive(Debug, Default, Clone)]
pub(crate) struct EncodedResource {
    payload: Vec<u8>,
    schema_url: String,
}

impl EncodedResource {
    pub(crate) fn new(resource: &Resource) -> Self {
        let mut payload = Vec::new();
        for (key, value) in resource.iter() {
            put_kv(&mut payload, 1, key.as_str(), value);
        }
        Self {
            payload,
            schema_url: resource.schema_url().unwrap_or_default().to_owned(),
        }
    }
}

/// A scope, its spans (by index) and its payload's length.
type ScopeGroup<'a> = (&'a InstrumentationScope, Vec<usize>, usize);

/// What a scope group adds to a request besides its spans.
fn group_header_len(scope: &InstrumentationScope) -> usize {
    field_len(1, scope_len(scope)) + bytes_len(3, scope.schema_url().unwrap_or_default().as_bytes())
}

/// One request of a batch: how many spans it carries, and its bytes.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) spans: usize,
    pub(crate) bytes: bytes::Bytes,
}

/// The sizes of the request being planned: its scope groups' payload lengths
/// and the `ResourceSpans` payload's, exact as they would be written.
struct Plan<'a> {
    base: usize,
    groups: Vec<(&'a InstrumentationScope, usize)>,
    resource_spans: usize,
}

impl<'a> Plan<'a> {
    fn new(resource: &EncodedResource) -> Self {
        let base =
            field_len(1, resource.payload.len()) + bytes_len(3, resource.schema_url.as_bytes());
        Self {
            base,
            groups: Vec::new(),
            resource_spans: base,
        }
    }

    /// The request's size with a span of `len` bytes in `scope` added, and where
    /// its group is (`None`: a new one).
    fn with(&self, scope: &InstrumentationScope, len: usize) -> (usize, Option<usize>, usize) {
        let span = field_len(2, len);
        let at = self.groups.iter().position(|(s, _)| *s == scope);
        let (old, group) = match at {
            Some(g) => (field_len(2, self.groups[g].1), self.groups[g].1 + span),
            None => (0, group_header_len(scope) + span),
        };
        let resource_spans = self.resource_spans - old + field_len(2, group);
        (field_len(1, resource_spans), at, group)
    }

    /// Adds a span to `scope`'s group, as [`Plan::with`] sized it.
    fn add(&mut self, scope: &'a InstrumentationScope, (at, group): (Option<usize>, usize)) {
        match at {
            Some(g) => {
                self.resource_spans -= field_len(2, self.groups[g].1);
                self.groups[g].1 = group;
            }
            None => self.groups.push((scope, group)),
        }
        self.resource_spans += field_len(2, group);
    }

    fn clear(&mut self) {
        self.groups.clear();
        self.resource_spans = self.base;
    }
}

/// Writes `spans` as `ExportTraceServiceRequest`s of at most `max` bytes each:
/// consecutive runs of the batch, each one request as [`encode_request`] writes
/// it, a run closed when the next span would take it over `max` (a span larger
/// than `max` goes alone: the collector decides). A collector refuses a request
/// over its limit whole, so a batch of large spans (both conventions' attributes,
/// exception events, captured headers) would otherwise be lost whole. Never
/// inlined: one call a batch, and a symbol of its own in
/// `scripts/callgrind-breakdown.sh`.
#[inline(never)]
pub(crate) fn encode_requests(
    spans: &[SpanData],
    resource: &EncodedResource,
    max: usize,
) -> Vec<Request> {
    let parts: Vec<SpanParts> = spans.iter().map(span_parts).collect();
    let mut requests = Vec::new();
    let mut plan = Plan::new(resource);
    let mut start = 0;
    for (i, (span, p)) in spans.iter().zip(&parts).enumerate() {
        let scope = &span.instrumentation_scope;
        let mut sized = plan.with(scope, p.len);
        if i > start && sized.0 > max {
            requests.push(encode_run(&spans[start..i], &parts[start..i], resource));
            start = i;
            plan.clear();
            sized = plan.with(scope, p.len);
        }
        plan.add(scope, (sized.1, sized.2));
    }
    // The last run: never empty, but for an empty batch's one empty request.
    requests.push(encode_run(&spans[start..], &parts[start..], resource));
    requests
}

fn encode_run(spans: &[SpanData], parts: &[SpanParts], resource: &EncodedResource) -> Request {
    let mut buf = Vec::new();
    encode_request(spans, parts, resource, &mut buf);
    Request {
        spans: spans.len(),
        bytes: bytes::Bytes::from(buf),
    }
}

/// Writes an `ExportTraceServiceRequest` for `spans` (with their `parts`) into
/// `buf`: one resource, its spans grouped by instrumentation scope in the order
/// the scopes first appear (as the SDK's exporter groups them).
fn encode_request(
    spans: &[SpanData],
    parts: &[SpanParts],
    resource: &EncodedResource,
    buf: &mut Vec<u8>,
) {
    let mut groups: Vec<ScopeGroup<'_>> = Vec::new();
    for (i, span) in spans.iter().enumerate() {
        let scope = &span.instrumentation_scope;
        let at = match groups.iter().position(|(s, _, _)| *s == scope) {
            Some(at) => at,
            None => {
                groups.push((scope, Vec::new(), 0));
                groups.len() - 1
            }
        };
        groups[at].1.push(i);
    }
    let mut resource_spans =
        field_len(1, resource.payload.len()) + bytes_len(3, resource.schema_url.as_bytes());
    for (scope, members, len) in &mut groups {
        *len = group_header_len(scope)
            + members
                .iter()
                .map(|&i| field_len(2, parts[i].len))
                .sum::<usize>();
        resource_spans += field_len(2, *len);
    }
    buf.reserve(field_len(1, resource_spans));
    put_len(buf, 1, resource_spans);
    put_len(buf, 1, resource.payload.len());
    buf.extend_from_slice(&resource.payload);
    for (scope, members, len) in &groups {
        put_len(buf, 2, *len);
        put_scope(buf, scope);
        for &i in members {
            put_span(buf, &spans[i], &parts[i]);
        }
        put_bytes(buf, 3, scope.schema_url().unwrap_or_default().as_bytes());
    }
    put_bytes(buf, 3, resource.schema_url.as_bytes());
}

/// A request already written; the codec copies it into tonic's buffer.
struct Encoded(bytes::Bytes);

/// The codec of the export call: the request goes as written; the answer's
/// partial success is read, the rest skipped.
struct ExportCodec;

struct RequestEncoder;

struct ResponseDecoder;

impl Codec for ExportCodec {
    type Encode = Encoded;
    type Decode = Rejected;
    type Encoder = RequestEncoder;
    type Decoder = ResponseDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        RequestEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ResponseDecoder
    }
}

impl Encoder for RequestEncoder {
    type Item = Encoded;
    type Error = tonic::Status;

    fn encode(&mut self, item: Encoded, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item.0);
        Ok(())
    }
}

/// What the collector's answer says it rejected (its partial success).
#[derive(Debug, Default)]
struct Rejected {
    spans: i64,
    message: String,
}

impl Decoder for ResponseDecoder {
    type Item = Rejected;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Rejected>, tonic::Status> {
        use prost::Message as _;
        let len = src.remaining();
        let answer =
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse::decode(
                src.copy_to_bytes(len),
            )
            .map_err(|e| tonic::Status::internal(format!("the collector's answer: {e}")))?;
        Ok(Some(answer.partial_success.map_or_else(
            Rejected::default,
            |p| Rejected {
                spans: p.rejected_spans,
                message: p.error_message,
            },
        )))
    }
}

const MAX_RETRIES: u32 = 3;
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_millis(1600);

/// One export call.
async fn send(channel: Channel, request: bytes::Bytes) -> Result<Rejected, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connecting: {e}")))?;
    grpc.unary(
        tonic::Request::new(Encoded(request)),
        PathAndQuery::from_static(EXPORT_PATH),
        ExportCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// Up to 100 ms, so that exporters that failed together do not retry together.
fn jitter() -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    Duration::from_nanos(u64::from(nanos % 100_000_000))
}

/// Waits before a retry: on the runtime's timer inside a tokio runtime, else by
/// sleeping the thread (the SDK's batch thread polls exports on a plain thread).
async fn pause(wait: Duration) {
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::time::sleep(wait).await;
    } else {
        std::thread::sleep(wait);
    }
}

/// Sends one request, retrying as the OTLP specification (and the SDK's
/// exporter) retries: the codes that say the collector may take it later, with
/// backoff, within the export's timeout. The collector's answer, or why not.
async fn send_with_retries(
    channel: &Channel,
    request: bytes::Bytes,
    deadline: Duration,
) -> Result<Rejected, String> {
    let started = std::time::Instant::now();
    let mut delay = FIRST_RETRY;
    let mut retries = 0;
    loop {
        let status = match send(channel.clone(), request.clone()).await {
            Ok(answer) => return Ok(answer),
            Err(status) => status,
        };
        let wait = delay + jitter();
        let retryable = matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::Cancelled
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Aborted
                | tonic::Code::OutOfRange
                | tonic::Code::DataLoss
        );
        if !retryable || retries == MAX_RETRIES || started.elapsed() + wait >= deadline {
            return Err(format!(
                "{} {} ({retries} retries)",
                status.code(),
                status.message()
            ));
        }
        retries += 1;
        pause(wait).await;
        delay = (delay * 2).min(LAST_RETRY);
    }
}

/// The direct OTLP/gRPC span exporter.
pub(crate) struct DirectExporter {
    channel: Channel,
    timeout: Duration,
    max_request: usize,
    resource: EncodedResource,
    shut_down: AtomicBool,
}

impl fmt::Debug for DirectExporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectExporter").finish_non_exhaustive()
    }
}

impl DirectExporter {
    /// An exporter to `endpoint` (`http://host:port`) sending requests of at most
    /// `max_request` bytes; connects at the first export. Call inside the tokio
    /// runtime the channel is to run on.
    pub(crate) fn new(
        endpoint: &str,
        timeout: Duration,
        max_request: usize,
    ) -> Result<Self, String> {
        let channel = Channel::from_shared(endpoint.to_owned())
            .map_err(|e| format!("OTLP endpoint {endpoint}: {e}"))?
            .timeout(timeout)
            .connect_timeout(timeout)
            .connect_lazy();
        Ok(Self {
            channel,
            timeout,
            max_request,
            resource: EncodedResource::default(),
            shut_down: AtomicBool::new(false),
        })
    }

    /// Exports `batch` in requests under the size limit, one after the other
    /// (each retried on its own), and tells what became of its spans: taken,
    /// rejected in a partial success, or in a request that failed.
    pub(crate) fn export_counted(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = (Tally, OTelSdkResult)> + Send {
        let shut_down = self.shut_down.load(Ordering::Relaxed);
        let total = batch.len() as u64;
        let requests = if shut_down {
            Vec::new()
        } else {
            encode_requests(&batch, &self.resource, self.max_request)
        };
        drop(batch);
        let channel = self.channel.clone();
        let deadline = self.timeout;
        async move {
            if shut_down {
                let tally = Tally {
                    failed: total,
                    ..Tally::default()
                };
                return (tally, Err(OTelSdkError::AlreadyShutdown));
            }
            let mut tally = Tally::default();
            let mut errors = Vec::new();
            let parts = requests.len();
            for request in requests {
                let n = request.spans as u64;
                match send_with_retries(&channel, request.bytes, deadline).await {
                    Ok(answer) => {
                        // What the collector says it rejected, within what it was sent.
                        let rejected = u64::try_from(answer.spans).unwrap_or(0).min(n);
                        if rejected > 0 || !answer.message.is_empty() {
                            tracing::warn!(
                                rejected_spans = answer.spans,
                                message = %answer.message,
                                "the collector rejected part of an export"
                            );
                        }
                        tally.rejected += rejected;
                        tally.accepted += n - rejected;
                    }
                    Err(error) => {
                        tally.failed += n;
                        errors.push(error);
                    }
                }
            }
            let result = if errors.is_empty() {
                Ok(())
            } else {
                Err(OTelSdkError::InternalFailure(format!(
                    "OTLP export: {} of {parts} requests failed ({} spans): {}",
                    errors.len(),
                    tally.failed,
                    errors.join("; ")
                )))
            };
            (tally, result)
        }
    }
}

impl SpanExporter for DirectExporter {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let export = self.export_counted(batch);
        async move { export.await.1 }
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        if self.shut_down.swap(true, Ordering::Relaxed) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = EncodedResource::new(resource);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::borrow::Cow;
    use std::time::{Duration, UNIX_EPOCH};

    use opentelemetry::trace::{
        Event, Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
    use opentelemetry_sdk::Resource;
    use prost::Message as _;

    use super::{encode_requests, EncodedResource};
    use crate::DEFAULT_MAX_REQUEST;

    /// What the SDK's OTLP exporter sends for the same spans.
    fn sdk_request(spans: &[SpanData], resource: &Resource) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                spans.to_vec(),
                &ResourceAttributesWithSchema::from(resource),
            ),
        }
    }

    fn ours(spans: &[SpanData], resource: &Resource) -> ExportTraceServiceRequest {
        let [request] = &encode_requests(spans, &EncodedResource::new(resource), usize::MAX)[..]
        else {
            panic!("one request without a limit")
        };
        assert_eq!(request.spans, spans.len());
        ExportTraceServiceRequest::decode(request.bytes.clone()).unwrap()
    }

    fn context(rng: &mut fastrand::Rng, remote: bool) -> SpanContext {
        let state = if rng.bool() {
            TraceState::from_key_value([("vendor", "v1"), ("other", "x")]).unwrap()
        } else {
            TraceState::default()
        };
        SpanContext::new(
            TraceId::from(rng.u128(1..)),
            SpanId::from(rng.u64(1..)),
            if rng.bool() {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            },
            remote,
            state,
        )
    }

    fn text(rng: &mut fastrand::Rng) -> String {
        let n = rng.usize(0..200);
        (0..n).map(|_| rng.char('a'..='ż')).collect()
    }

    fn value(rng: &mut fastrand::Rng) -> Value {
        match rng.u8(0..9) {
            0 => Value::Bool(rng.bool()),
            1 => Value::I64(rng.i64(..)),
            2 => Value::F64(rng.f64() * 1e9 - 5e8),
            3 => Value::String(StringValue::from(text(rng))),
            4 => Value::from(""),
            5 => Value::Array(Array::Bool(
                (0..rng.usize(0..4)).map(|_| rng.bool()).collect(),
            )),
            6 => Value::Array(Array::I64(
                (0..rng.usize(0..4)).map(|_| rng.i64(..)).collect(),
            )),
            7 => Value::Array(Array::F64(
                (0..rng.usize(0..4)).map(|_| rng.f64()).collect(),
            )),
            _ => Value::Array(Array::String(
                (0..rng.usize(0..4))
                    .map(|_| StringValue::from(text(rng)))
                    .collect(),
            )),
        }
    }

    fn attributes(rng: &mut fastrand::Rng) -> Vec<KeyValue> {
        (0..rng.usize(0..12))
            .map(|i| {
                let key = if i == 0 { String::new() } else { text(rng) };
                KeyValue::new(key, value(rng))
            })
            .collect()
    }

    fn time(rng: &mut fastrand::Rng) -> std::time::SystemTime {
        match rng.u8(0..10) {
            // Before the epoch: the SDK's exporter sends 0.
            0 => UNIX_EPOCH - Duration::from_secs(5),
            1 => UNIX_EPOCH,
            _ => UNIX_EPOCH + Duration::from_nanos(rng.u64(..u64::MAX / 2)),
        }
    }

    fn span(rng: &mut fastrand::Rng, scopes: &[InstrumentationScope]) -> SpanData {
        let mut events = SpanEvents::default();
        events.events = (0..rng.usize(0..3))
            .map(|_| Event::new(text(rng), time(rng), attributes(rng), rng.u32(0..3)))
            .collect();
        events.dropped_count = rng.u32(0..2);
        let mut links = SpanLinks::default();
        links.links = (0..rng.usize(0..3))
            .map(|_| {
                let remote = rng.bool();
                Link::new(context(rng, remote), attributes(rng), rng.u32(0..3))
            })
            .collect();
        links.dropped_count = rng.u32(0..2);
        SpanData {
            span_context: context(rng, false),
            parent_span_id: if rng.bool() {
                SpanId::from(rng.u64(1..))
            } else {
                SpanId::INVALID
            },
            parent_span_is_remote: rng.bool(),
            span_kind: [
                SpanKind::Internal,
                SpanKind::Server,
                SpanKind::Client,
                SpanKind::Producer,
                SpanKind::Consumer,
            ][rng.usize(0..5)]
            .clone(),
            name: if rng.bool() {
                Cow::Borrowed("process orders")
            } else {
                Cow::Owned(text(rng))
            },
            start_time: time(rng),
            end_time: time(rng),
            attributes: attributes(rng),
            dropped_attributes_count: rng.u32(0..3),
            events,
            links,
            status: match rng.u8(0..4) {
                0 => Status::Unset,
                1 => Status::Ok,
                2 => Status::error(""),
                _ => Status::error(text(rng)),
            },
            instrumentation_scope: scopes[rng.usize(0..scopes.len())].clone(),
        }
    }

    fn scopes() -> Vec<InstrumentationScope> {
        vec![
            InstrumentationScope::builder("mqtrace")
                .with_version("0.1.0")
                .with_schema_url("https://opentelemetry.io/schemas/1.45.0")
                .build(),
            InstrumentationScope::builder("tracing-opentelemetry").build(),
            InstrumentationScope::builder("")
                .with_attributes([KeyValue::new("a", 1), KeyValue::new("b", "two")])
                .build(),
        ]
    }

    /// Batches of random spans (every value kind, arrays, events, links, trace
    /// states, statuses, scopes interleaved, empty and non-ASCII strings) decode to
    /// exactly the request the SDK's exporter builds from them.
    #[test]
    fn random_batches_encode_as_the_sdk_exporter_s_requests() {
        let mut rng = fastrand::Rng::with_seed(0x6d71_7472);
        let scopes = scopes();
        for round in 0..300 {
            let resource = Resource::builder_empty()
                .with_attributes(attributes(&mut rng))
                .with_service_name(format!("service-{round}"))
                .build();
            let spans: Vec<SpanData> = (0..rng.usize(0..20))
                .map(|_| span(&mut rng, &scopes))
                .collect();
            assert_eq!(
                ours(&spans, &resource),
                sdk_request(&spans, &resource),
                "round {round}"
            );
        }
    }

    /// Under a size limit, random batches go as consecutive runs, each encoded
    /// exactly as the SDK's exporter would send that run alone, each within the
    /// limit unless it is one span larger than the limit, and no run could have
    /// taken its next span without passing the limit.
    #[test]
    fn random_batches_split_under_a_limit_into_the_sdk_exporter_s_requests() {
        let mut rng = fastrand::Rng::with_seed(0x0024_0012);
        let scopes = scopes();
        let mut split = 0;
        for round in 0..300 {
            let resource = Resource::builder_empty()
                .with_attributes(attributes(&mut rng))
                .with_service_name(format!("service-{round}"))
                .build();
            let spans: Vec<SpanData> = (0..rng.usize(0..20))
                .map(|_| span(&mut rng, &scopes))
                .collect();
            let max = rng.usize(200..20_000);
            let requests = encode_requests(&spans, &EncodedResource::new(&resource), max);
            split += usize::from(requests.len() > 1);
            let mut start = 0;
            for (k, request) in requests.iter().enumerate() {
                let run = &spans[start..start + request.spans];
                assert!(
                    request.bytes.len() <= max || request.spans == 1,
                    "round {round}: {} > {max}",
                    request.bytes.len()
                );
                assert_eq!(
                    ExportTraceServiceRequest::decode(request.bytes.clone()).unwrap(),
                    sdk_request(run, &resource),
                    "round {round}, request {k}"
                );
                if k + 1 < requests.len() {
                    let more = &spans[start..=start + request.spans];
                    assert!(
                        sdk_request(more, &resource).encoded_len() > max,
                        "round {round}: request {k} could have taken one more span"
                    );
                }
                start += request.spans;
            }
            assert_eq!(start, spans.len(), "round {round}");
        }
        assert!(split > 100, "{split} of 300 batches split");
    }

    /// The same for a resource with a schema URL and an empty batch, which the
    /// SDK's exporter sends as a resource without scopes.
    #[test]
    fn schema_urls_and_an_empty_batch() {
        let resource = Resource::builder_empty()
            .with_schema_url([KeyValue::new("service.name", "billing")], "https://s/1")
            .build();
        assert_eq!(ours(&[], &resource), sdk_request(&[], &resource));
        let mut rng = fastrand::Rng::with_seed(7);
        let spans: Vec<SpanData> = (0..5).map(|_| span(&mut rng, &scopes())).collect();
        assert_eq!(ours(&spans, &resource), sdk_request(&spans, &resource));
    }

    /// Through a real gRPC connection: the same spans exported by this exporter
    /// and by the SDK's reach the collector as equal requests, and the exporter
    /// reports an unreachable collector as a failed export.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_collector_receives_what_the_sdk_exporter_sends() {
        use opentelemetry_otlp::WithExportConfig as _;
        use opentelemetry_sdk::trace::SpanExporter as _;

        let (tap, mut requests) = tokio::sync::mpsc::channel(4);
        let collector = mqtrace_testing::Collector::start_with(Default::default(), Some(tap))
            .await
            .unwrap();
        let resource = Resource::builder_empty()
            .with_service_name("direct-export")
            .build();
        let mut rng = fastrand::Rng::with_seed(11);
        let spans: Vec<SpanData> = (0..50).map(|_| span(&mut rng, &scopes())).collect();

        let mut direct = super::DirectExporter::new(
            &collector.grpc_endpoint(),
            Duration::from_secs(5),
            DEFAULT_MAX_REQUEST,
        )
        .unwrap();
        direct.set_resource(&resource);
        let mut sdk = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(collector.grpc_endpoint())
            .build()
            .unwrap();
        sdk.set_resource(&resource);
        direct.export(spans.clone()).await.unwrap();
        let first = requests.recv().await.unwrap();
        sdk.export(spans.clone()).await.unwrap();
        let second = requests.recv().await.unwrap();
        assert_eq!(first, second);
        assert_eq!(first, sdk_request(&spans, &resource));
        assert_eq!(collector.spans().len(), 100);

        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let down = super::DirectExporter::new(
            &format!("http://{closed}"),
            Duration::from_secs(1),
            DEFAULT_MAX_REQUEST,
        )
        .unwrap();
        assert!(down.export(spans).await.is_err());
        down.shutdown().unwrap();
        assert!(down.export(Vec::new()).await.is_err(), "shut down");
    }

    /// A collector that comes up while an export is failing gets the batch: the
    /// refused connection is retried with backoff, as by the SDK's exporter.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_export_is_retried_until_the_collector_is_up() {
        use opentelemetry_sdk::trace::SpanExporter as _;

        let free = |_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let (grpc, http) = (free(0), free(1));
        let mut rng = fastrand::Rng::with_seed(5);
        let spans: Vec<SpanData> = (0..10).map(|_| span(&mut rng, &scopes())).collect();
        let exporter = super::DirectExporter::new(
            &format!("http://{grpc}"),
            Duration::from_secs(5),
            DEFAULT_MAX_REQUEST,
        )
        .unwrap();
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            mqtrace_testing::Collector::start_with(
                mqtrace_testing::CollectorConfig::default().listen(grpc, http),
                None,
            )
            .await
            .unwrap()
        });
        let started = std::time::Instant::now();
        exporter.export(spans).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(150));
        let collector = late.await.unwrap();
        assert_eq!(collector.spans().len(), 10);
    }

    /// Spans that each carry `bytes` of attribute values (captured headers,
    /// exception events, both conventions' attributes), one scope.
    fn heavy_spans(n: usize, bytes: usize) -> Vec<SpanData> {
        let mut rng = fastrand::Rng::with_seed(24);
        let scope = InstrumentationScope::builder("mqtrace").build();
        (0..n)
            .map(|i| {
                let mut s = span(&mut rng, std::slice::from_ref(&scope));
                s.name = Cow::Owned(format!("process orders {i}"));
                s.attributes = vec![KeyValue::new("messaging.header.payload", "x".repeat(bytes))];
                s.events = SpanEvents::default();
                s.links = SpanLinks::default();
                s
            })
            .collect()
    }

    /// A 2,048-span batch of about 6 MiB, to a collector that takes requests of
    /// 4 MiB at most (gRPC's default, the OpenTelemetry Collector's too), arrives
    /// as two requests under the limit, every span in them, in order. Before the
    /// split the one 6 MiB request was refused, retried, and the batch dropped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_over_the_collector_s_limit_is_split_into_requests_under_it() {
        use opentelemetry_sdk::trace::SpanExporter as _;

        let (tap, mut requests) = tokio::sync::mpsc::channel(8);
        let collector = mqtrace_testing::Collector::start_with(Default::default(), Some(tap))
            .await
            .unwrap();
        let resource = Resource::builder_empty()
            .with_service_name("split-export")
            .build();
        let spans = heavy_spans(2_048, 3_000);
        let names: Vec<String> = spans.iter().map(|s| s.name.to_string()).collect();
        let whole = ours(&spans, &resource).encoded_len();
        assert!(whole > 6 * 1024 * 1024, "{whole}");

        let mut direct = super::DirectExporter::new(
            &collector.grpc_endpoint(),
            Duration::from_secs(5),
            DEFAULT_MAX_REQUEST,
        )
        .unwrap();
        direct.set_resource(&resource);
        direct.export(spans).await.unwrap();
        drop(collector);
        let mut sizes = Vec::new();
        let mut received = Vec::new();
        while let Some(request) = requests.recv().await {
            sizes.push(request.encoded_len());
            received.extend(
                mqtrace_testing::spans_of(&request)
                    .into_iter()
                    .map(|s| s.name),
            );
        }
        println!("a {whole}-byte batch went as requests of {sizes:?} bytes");
        assert_eq!(sizes.len(), 2, "{sizes:?}");
        assert!(sizes.iter().all(|&n| n <= 4 * 1024 * 1024), "{sizes:?}");
        assert_eq!(received, names);
    }

    /// A collector that takes every span but those named `rejected…`, and says
    /// so in a partial success, as a collector that filters or validates does.
    #[derive(Debug, Default, Clone)]
    struct Picky {
        requests: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    }

    #[tonic::async_trait]
    impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
        for Picky
    {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<
            tonic::Response<
                opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
            >,
            tonic::Status,
        > {
            use opentelemetry_proto::tonic::collector::trace::v1::{
                ExportTracePartialSuccess, ExportTraceServiceResponse,
            };
            let spans = mqtrace_testing::spans_of(request.get_ref());
            self.requests.lock().unwrap().push(spans.len());
            let rejected = spans
                .iter()
                .filter(|s| s.name.starts_with("rejected"))
                .count();
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: (rejected > 0).then(|| ExportTracePartialSuccess {
                    rejected_spans: rejected as i64,
                    error_message: format!("{rejected} spans named rejected"),
                }),
            }))
        }
    }

    /// Spans a collector rejects in a partial success are counted as rejected,
    /// not exported: 10 spans in, 3 rejected, 7 exported, `not_exported` 3.
    /// Before, all 10 were counted exported.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_rejected_in_a_partial_success_are_not_counted_exported() {
        use opentelemetry::trace::{Tracer as _, TracerProvider as _};
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;

        let picky = Picky::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(picky.clone()))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let telemetry = crate::TelemetryBuilder::default()
            .service_name("picky")
            .endpoint(format!("http://{addr}"))
            .protocol(crate::Protocol::Grpc)
            .install_global(false)
            .metrics(false)
            .build()
            .unwrap();
        let tracer = telemetry.provider().unwrap().tracer("test");
        for i in 0..10 {
            let name = if i % 3 == 0 && i > 0 {
                "rejected"
            } else {
                "kept"
            };
            drop(tracer.start(format!("{name} {i}")));
        }
        let stats = telemetry.shutdown_async().await;
        assert_eq!(*picky.requests.lock().unwrap(), [10]);
        assert_eq!(stats.ended, 10);
        assert_eq!(stats.exported, 7);
        assert_eq!(stats.failed, 0);
        assert_eq!(stats.rejected, 3);
        assert_eq!(stats.not_exported(), 3);
        server.abort();
    }

    #[test]
    fn varint_lengths() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            super::put_varint(&mut buf, v);
            assert_eq!(buf.len(), super::varint_len(v), "{v}");
        }
    }
}
