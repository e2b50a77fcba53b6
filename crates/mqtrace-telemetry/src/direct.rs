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

/// A scope, its spans (by index, with their parts) and its payload's length.
type ScopeGroup<'a> = (&'a InstrumentationScope, Vec<(usize, SpanParts)>, usize);

/// Writes an `ExportTraceServiceRequest` for `spans` into `buf`: one resource,
/// its spans grouped by instrumentation scope in the order the scopes first
/// appear (as the SDK's exporter groups them). Never inlined: one call a batch,
/// and a symbol of its own in `scripts/callgrind-breakdown.sh`.
#[inline(never)]
pub(crate) fn encode_request(spans: &[SpanData], resource: &EncodedResource, buf: &mut Vec<u8>) {
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
        groups[at].1.push((i, span_parts(span)));
    }
    let mut resource_spans =
        field_len(1, resource.payload.len()) + bytes_len(3, resource.schema_url.as_bytes());
    for (scope, members, len) in &mut groups {
        *len = field_len(1, scope_len(scope))
            + members
                .iter()
                .map(|(_, p)| field_len(2, p.len))
                .sum::<usize>()
            + bytes_len(3, scope.schema_url().unwrap_or_default().as_bytes());
        resource_spans += field_len(2, *len);
    }
    buf.reserve(field_len(1, resource_spans));
    put_len(buf, 1, resource_spans);
    put_len(buf, 1, resource.payload.len());
    buf.extend_from_slice(&resource.payload);
    for (scope, members, len) in &groups {
        put_len(buf, 2, *len);
        put_scope(buf, scope);
        for (i, parts) in members {
            put_span(buf, &spans[*i], parts);
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

/// The direct OTLP/gRPC span exporter.
pub(crate) struct DirectExporter {
    channel: Channel,
    timeout: Duration,
    resource: EncodedResource,
    shut_down: AtomicBool,
}

impl fmt::Debug for DirectExporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectExporter").finish_non_exhaustive()
    }
}

impl DirectExporter {
    /// An exporter to `endpoint` (`http://host:port`); connects at the first
    /// export. Call inside the tokio runtime the channel is to run on.
    pub(crate) fn new(endpoint: &str, timeout: Duration) -> Result<Self, String> {
        let channel = Channel::from_shared(endpoint.to_owned())
            .map_err(|e| format!("OTLP endpoint {endpoint}: {e}"))?
            .timeout(timeout)
            .connect_timeout(timeout)
            .connect_lazy();
        Ok(Self {
            channel,
            timeout,
            resource: EncodedResource::default(),
            shut_down: AtomicBool::new(false),
        })
    }
}

impl SpanExporter for DirectExporter {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let shut_down = self.shut_down.load(Ordering::Relaxed);
        let mut request = Vec::new();
        if !shut_down {
            encode_request(&batch, &self.resource, &mut request);
        }
        drop(batch);
        let request = bytes::Bytes::from(request);
        let channel = self.channel.clone();
        let deadline = self.timeout;
        async move {
            if shut_down {
                return Err(OTelSdkError::AlreadyShutdown);
            }
            let started = std::time::Instant::now();
            let mut delay = FIRST_RETRY;
            let mut retries = 0;
            let answer = loop {
                let status = match send(channel.clone(), request.clone()).await {
                    Ok(answer) => break answer,
                    Err(status) => status,
                };
                // As the OTLP specification (and the SDK's exporter) retries: the
                // codes that say the collector may take it later, with backoff,
                // within the export's timeout.
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
                    return Err(OTelSdkError::InternalFailure(format!(
                        "OTLP export: {} {} ({retries} retries)",
                        status.code(),
                        status.message()
                    )));
                }
                retries += 1;
                pause(wait).await;
                delay = (delay * 2).min(LAST_RETRY);
            };
            if answer.spans > 0 || !answer.message.is_empty() {
                tracing::warn!(
                    rejected_spans = answer.spans,
                    message = %answer.message,
                    "the collector rejected part of an export"
                );
            }
            Ok(())
        }
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

    use super::{encode_request, EncodedResource};

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
        let mut buf = Vec::new();
        encode_request(spans, &EncodedResource::new(resource), &mut buf);
        ExportTraceServiceRequest::decode(buf.as_slice()).unwrap()
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

        let mut direct =
            super::DirectExporter::new(&collector.grpc_endpoint(), Duration::from_secs(5)).unwrap();
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
        let down = super::DirectExporter::new(&format!("http://{closed}"), Duration::from_secs(1))
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
        let exporter =
            super::DirectExporter::new(&format!("http://{grpc}"), Duration::from_secs(5)).unwrap();
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
