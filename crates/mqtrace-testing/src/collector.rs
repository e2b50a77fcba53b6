//! An OTLP trace and metrics receiver in the test process: gRPC and HTTP/protobuf,
//! on loopback ports chosen by the OS (or the addresses given). Spans and metrics
//! arrive over real OTLP, exactly as a collector would receive them. `mqtrace view`
//! and `mqtrace doctor` listen with it too, taking each trace request as it comes
//! ([`Collector::start_with`]). Requests past a size limit are refused unread, as
//! the OpenTelemetry Collector refuses them ([`CollectorConfig::max_request_size`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::metric::{MetricStore, RecordedMetric};
use crate::span::{AttrValue, Kind, RecordedEvent, RecordedLink, RecordedSpan, SpanStatus};

#[derive(Debug, Default)]
struct Store {
    spans: Mutex<Vec<RecordedSpan>>,
    requests: Mutex<u64>,
    notify: Notify,
    metrics: Mutex<MetricStore>,
    /// Keep what arrives (off for a listener that only passes requests on).
    keep: bool,
    /// Taken when the collector is dropped, so the tap's receiver ends even while
    /// an exporter's connection lingers.
    tap: Mutex<Option<mpsc::Sender<ExportTraceServiceRequest>>>,
}

impl Store {
    async fn add(&self, request: ExportTraceServiceRequest) {
        if self.keep {
            let spans = spans_of(&request);
            self.spans
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(spans);
        }
        *self.requests.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        let tap = self
            .tap
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(tap) = tap {
            // A full tap holds the exporter back (it retries) rather than losing
            // spans; a closed one has nobody left to tell.
            let _ = tap.send(request).await;
        }
        self.notify.notify_waiters();
    }

    fn add_metrics(&self, request: ExportMetricsServiceRequest) {
        if !self.keep {
            return;
        }
        self.metrics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add(request);
    }
}

/// Where a [`Collector`] listens and what it does with what arrives.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CollectorConfig {
    /// The gRPC receiver's address (`127.0.0.1:0`: a port the OS chooses).
    pub grpc: SocketAddr,
    /// The HTTP/protobuf receiver's address.
    pub http: SocketAddr,
    /// Keep spans and metrics for [`Collector::spans`] and [`Collector::metrics`]
    /// (on by default; a listener that only uses the tap turns it off so its memory
    /// stays bounded).
    pub keep: bool,
    /// The largest gRPC export message taken, in bytes (4 MiB, gRPC's default and
    /// the OpenTelemetry Collector's); a larger one is answered
    /// `RESOURCE_EXHAUSTED` before it is read.
    pub max_grpc_request: usize,
    /// The largest HTTP export body taken, in bytes (20 MiB, the OpenTelemetry
    /// Collector's default); a larger one is answered 413 as soon as its
    /// `Content-Length`, or the body read so far, passes it.
    pub max_http_request: usize,
}

/// gRPC's default limit on a received message.
const DEFAULT_MAX_GRPC_REQUEST: usize = 4 * 1024 * 1024;
/// The OpenTelemetry Collector's default limit on an HTTP request body.
const DEFAULT_MAX_HTTP_REQUEST: usize = 20 * 1024 * 1024;

impl Default for CollectorConfig {
    fn default() -> Self {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            grpc: loopback,
            http: loopback,
            keep: true,
            max_grpc_request: DEFAULT_MAX_GRPC_REQUEST,
            max_http_request: DEFAULT_MAX_HTTP_REQUEST,
        }
    }
}

impl CollectorConfig {
    /// Listens on these addresses.
    pub fn listen(mut self, grpc: SocketAddr, http: SocketAddr) -> Self {
        self.grpc = grpc;
        self.http = http;
        self
    }

    /// The largest request either receiver takes, in bytes.
    pub fn max_request_size(mut self, bytes: usize) -> Self {
        self.max_grpc_request = bytes;
        self.max_http_request = bytes;
        self
    }

    /// Whether spans and metrics are kept.
    pub fn keep(mut self, keep: bool) -> Self {
        self.keep = keep;
        self
    }
}

async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for OTLP {what} on {addr}: {e}"),
        )
    })
}

/// A running in-process collector. Stops when dropped.
#[derive(Debug)]
pub struct Collector {
    grpc: SocketAddr,
    http: SocketAddr,
    store: Arc<Store>,
    _stop: Vec<oneshot::Sender<()>>,
}

impl Collector {
    /// Starts both receivers on 127.0.0.1. Needs a tokio runtime.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(CollectorConfig::default(), None).await
    }

    /// Starts both receivers as `config` says. Every trace export request is also
    /// sent, whole, to `tap` when one is given (a full tap makes the sender wait).
    /// Needs a tokio runtime.
    pub async fn start_with(
        config: CollectorConfig,
        tap: Option<mpsc::Sender<ExportTraceServiceRequest>>,
    ) -> std::io::Result<Self> {
        let store = Arc::new(Store {
            keep: config.keep,
            tap: Mutex::new(tap),
            ..Store::default()
        });
        let grpc_listener = bind(config.grpc, "gRPC").await?;
        let http_listener = bind(config.http, "HTTP").await?;
        let grpc = grpc_listener.local_addr()?;
        let http = http_listener.local_addr()?;

        let (stop_grpc, grpc_stopped) = oneshot::channel::<()>();
        let service = SizeLimited(
            TraceServiceServer::new(GrpcReceiver {
                store: store.clone(),
            })
            .max_decoding_message_size(config.max_grpc_request),
        );
        let metrics = SizeLimited(
            MetricsServiceServer::new(GrpcReceiver {
                store: store.clone(),
            })
            .max_decoding_message_size(config.max_grpc_request),
        );
        tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .add_service(metrics)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = grpc_stopped.await;
                })
                .await;
        });

        let (stop_http, mut http_stopped) = oneshot::channel::<()>();
        let http_store = store.clone();
        let max_http = config.max_http_request;
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = http_listener.accept() => accepted,
                    _ = &mut http_stopped => break,
                };
                let Ok((stream, _)) = accepted else { continue };
                let store = http_store.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let store = store.clone();
                        async move { Ok::<_, Infallible>(http_export(req, &store, max_http).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });

        Ok(Self {
            grpc,
            http,
            store,
            _stop: vec![stop_grpc, stop_http],
        })
    }

    /// `http://127.0.0.1:PORT` of the gRPC receiver.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Address of the gRPC receiver (to put a [`crate::faults::Proxy`] in front).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
    }

    /// `http://127.0.0.1:PORT` of the HTTP receiver (it serves `/v1/traces`).
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<RecordedSpan> {
        self.store
            .spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Every metric stream received so far (latest cumulative point, or the sum of
    /// deltas), in service, name and attribute order.
    pub fn metrics(&self) -> Vec<RecordedMetric> {
        self.store
            .metrics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .all()
    }

    /// [`Collector::flushed_metrics`] for a test whose names carry a run's suffix:
    /// `run` shown as `RUN`, and the lines sorted after that (the suffix would
    /// otherwise decide their order).
    pub async fn flushed_metrics_of_run(
        &self,
        provider: &opentelemetry_sdk::metrics::SdkMeterProvider,
        names: &[&str],
        hide: &[&str],
        run: &str,
    ) -> String {
        let rendered = self
            .flushed_metrics(provider, names, hide)
            .await
            .replace(run, "RUN");
        let mut lines: Vec<&str> = rendered.lines().collect();
        lines.sort_unstable();
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    /// Flushes `provider` and returns the streams of the metrics named `names`
    /// (all when empty), rendered one per line (see [`RecordedMetric::render`]),
    /// attributes in `hide` left out.
    pub async fn flushed_metrics(
        &self,
        provider: &opentelemetry_sdk::metrics::SdkMeterProvider,
        names: &[&str],
        hide: &[&str],
    ) -> String {
        let provider = provider.clone();
        let flushed = tokio::task::spawn_blocking(move || provider.force_flush()).await;
        assert!(
            matches!(flushed, Ok(Ok(()))),
            "flushing the meter provider failed: {flushed:?}"
        );
        let mut out = String::new();
        for m in self.metrics() {
            if names.is_empty() || names.contains(&m.name.as_str()) {
                out.push_str(&m.render(hide));
                out.push('\n');
            }
        }
        out
    }

    /// Number of export requests received.
    pub fn requests(&self) -> u64 {
        *self
            .store
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Every span received so far, removed from the collector (for long runs that
    /// look at spans as they come).
    pub fn take(&self) -> Vec<RecordedSpan> {
        std::mem::take(
            &mut *self
                .store
                .spans
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Forgets the spans received so far.
    pub fn clear(&self) {
        self.store
            .spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Flushes `provider` (off the async threads), then waits for exactly `count`
    /// spans: fewer after 10 s, or more, fails the test with the tree received.
    pub async fn exactly(
        &self,
        provider: &opentelemetry_sdk::trace::SdkTracerProvider,
        count: usize,
    ) -> Vec<RecordedSpan> {
        let provider = provider.clone();
        let flushed = tokio::task::spawn_blocking(move || provider.force_flush()).await;
        assert!(
            matches!(flushed, Ok(Ok(()))),
            "flushing the tracer provider failed: {flushed:?}"
        );
        let spans = self.wait_for_spans(count, Duration::from_secs(10)).await;
        // Anything more would have come with the same flush.
        if spans.len() != count {
            let got = spans.len();
            let tree = crate::Forest::new(spans).render(&crate::TreeOptions::normalised());
            panic!("expected {count} spans, got {got}:\n{tree}");
        }
        spans
    }

    /// Waits until at least `count` spans have arrived or `timeout` passes, and
    /// returns what arrived.
    pub async fn wait_for_spans(&self, count: usize, timeout: Duration) -> Vec<RecordedSpan> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.store.notify.notified();
            let spans = self.spans();
            if spans.len() >= count {
                return spans;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.spans();
            }
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.store
            .tap
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

#[derive(Debug)]
struct GrpcReceiver {
    store: Arc<Store>,
}

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.store.add(request.into_inner()).await;
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for GrpcReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.store.add_metrics(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

/// A gRPC service whose answer to a message over the size limit is
/// `RESOURCE_EXHAUSTED`, as grpc-go's and the OpenTelemetry Collector's is: tonic
/// answers `OUT_OF_RANGE`, which OTLP exporters retry, sending the same
/// oversized request again.
#[derive(Debug, Clone)]
struct SizeLimited<S>(S);

impl<S: tonic::server::NamedService> tonic::server::NamedService for SizeLimited<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for SizeLimited<S>
where
    S: tonic::codegen::Service<
        tonic::codegen::http::Request<B>,
        Response = tonic::codegen::http::Response<tonic::body::Body>,
        Error = Infallible,
    >,
    S::Future: Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Infallible>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: tonic::codegen::http::Request<B>) -> Self::Future {
        let answer = self.0.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            // The receivers answer nothing else with OUT_OF_RANGE: only tonic's
            // size check does, before the service is called, in the headers.
            let headers = response.headers_mut();
            let out_of_range = (tonic::Code::OutOfRange as i32).to_string();
            if headers
                .get("grpc-status")
                .is_some_and(|v| v.as_bytes() == out_of_range.as_bytes())
            {
                let exhausted = (tonic::Code::ResourceExhausted as i32).to_string();
                if let Ok(value) = tonic::codegen::http::HeaderValue::from_str(&exhausted) {
                    headers.insert("grpc-status", value);
                }
            }
            Ok(response)
        })
    }
}

async fn http_export(req: Request<Incoming>, store: &Store, max: usize) -> Response<Full<Bytes>> {
    let metrics = match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/traces") => false,
        (&Method::POST, "/v1/metrics") => true,
        _ => return status(StatusCode::NOT_FOUND),
    };
    // Refused before reading when it says it is too large; else read no further
    // than the limit (a chunked body says nothing in advance).
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return status(StatusCode::PAYLOAD_TOO_LARGE);
    }
    let body = match http_body_util::Limited::new(req.into_body(), max)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return status(StatusCode::PAYLOAD_TOO_LARGE)
        }
        Err(_) => return status(StatusCode::BAD_REQUEST),
    };
    if metrics {
        return match ExportMetricsServiceRequest::decode(body) {
            Ok(request) => {
                store.add_metrics(request);
                let reply = ExportMetricsServiceResponse {
                    partial_success: None,
                }
                .encode_to_vec();
                Response::builder()
                    .header("content-type", "application/x-protobuf")
                    .body(Full::new(Bytes::from(reply)))
                    .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR))
            }
            Err(_) => status(StatusCode::BAD_REQUEST),
        };
    }
    match ExportTraceServiceRequest::decode(body) {
        Ok(request) => {
            store.add(request).await;
            let reply = ExportTraceServiceResponse {
                partial_success: None,
            }
            .encode_to_vec();
            Response::builder()
                .header("content-type", "application/x-protobuf")
                .body(Full::new(Bytes::from(reply)))
                .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR))
        }
        Err(_) => status(StatusCode::BAD_REQUEST),
    }
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = code;
    response
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(v: Option<&AnyValue>) -> AttrValue {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => AttrValue::Str(s.clone()),
        Some(any_value::Value::BoolValue(b)) => AttrValue::Bool(*b),
        Some(any_value::Value::IntValue(i)) => AttrValue::Int(*i),
        Some(any_value::Value::DoubleValue(d)) => AttrValue::Double(*d),
        Some(other) => AttrValue::Other(format!("{other:?}")),
        None => AttrValue::Other("<none>".to_owned()),
    }
}

pub(crate) fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, AttrValue> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value(kv.value.as_ref())))
        .collect()
}

/// The spans of one OTLP trace export request (ids in hex, the service from the
/// resource's `service.name`).
pub fn spans_of(request: &ExportTraceServiceRequest) -> Vec<RecordedSpan> {
    let mut out = Vec::new();
    for resource_spans in &request.resource_spans {
        let resource = resource_spans
            .resource
            .as_ref()
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        let service = match resource.get("service.name") {
            Some(AttrValue::Str(s)) => s.clone(),
            _ => String::new(),
        };
        for scope_spans in &resource_spans.scope_spans {
            for span in &scope_spans.spans {
                let status = match &span.status {
                    Some(s) if s.code == 2 => SpanStatus::Error(s.message.clone()),
                    Some(s) if s.code == 1 => SpanStatus::Ok,
                    _ => SpanStatus::Unset,
                };
                out.push(RecordedSpan {
                    service: service.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: (!span.parent_span_id.is_empty())
                        .then(|| hex(&span.parent_span_id)),
                    name: span.name.clone(),
                    kind: Kind::from_otlp(span.kind),
                    start_unix_nano: span.start_time_unix_nano,
                    end_unix_nano: span.end_time_unix_nano,
                    attributes: attributes(&span.attributes),
                    events: span
                        .events
                        .iter()
                        .map(|e| RecordedEvent {
                            name: e.name.clone(),
                            attributes: attributes(&e.attributes),
                        })
                        .collect(),
                    links: span
                        .links
                        .iter()
                        .map(|l| RecordedLink {
                            trace_id: hex(&l.trace_id),
                            span_id: hex(&l.span_id),
                            attributes: attributes(&l.attributes),
                        })
                        .collect(),
                    status,
                });
            }
        }
    }
    out
}
