//! The application's OpenTelemetry set-up for services instrumented with mqtrace:
//! one call builds and installs a tracer provider and a meter provider that export
//! over OTLP, and returns a guard that flushes both on drop. mqtrace itself depends on the
//! OpenTelemetry API only; this crate is where the SDK comes in, for those who
//! want mqtrace's defaults.
//!
//! ```no_run
//! # fn main() -> Result<(), mqtrace_telemetry::TelemetryError> {
//! let telemetry = mqtrace_telemetry::init()?;   // OTEL_* variables; installed globally
//! let instrumenter = mqtrace::Instrumenter::default();
//! # let _ = instrumenter;
//! // ... the service ...
//! telemetry.shutdown();                         // or let it drop
//! # Ok(()) }
//! ```
//!
//! - `service.name`: the argument, else `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES`,
//!   else the executable's name.
//! - Exporter: OTLP gRPC (port 4317) by default; HTTP/protobuf (port 4318) when
//!   `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL` is
//!   `http/protobuf`. Endpoint, headers, timeout and compression come from the standard
//!   `OTEL_EXPORTER_OTLP_*` variables unless set on the builder.
//! - Plain OTLP/gRPC (an `http://` endpoint, no headers, no compression) is written
//!   straight from the SDK's span data into the request
//!   ([`TelemetryBuilder::direct_encoding`], on by default): the same request the
//!   SDK's OTLP exporter sends, without its copy of each batch and its
//!   intermediate protobuf structs, which were about two thirds of what a traced
//!   send cost the service. A batch goes in requests of at most 4 MiB, gRPC's
//!   default limit ([`TelemetryBuilder::max_export_request_size`]), and spans the
//!   collector rejects in a partial success are counted as rejected
//!   ([`ExportStats::rejected`]). Any other set-up goes through the SDK's exporter.
//! - Batch span processor sized for messaging rates ([`default_batch_config`]:
//!   16,384 queued, batches of 2,048, every second), each setting overridable by
//!   its `OTEL_BSP_*` variable; sampler from
//!   `OTEL_TRACES_SAMPLER` / `_ARG`; `OTEL_SDK_DISABLED=true` installs nothing.
//! - Metrics (mqtrace's messaging metrics, see `mqtrace::metrics`): OTLP over the
//!   same protocol and endpoint, read every `OTEL_METRIC_EXPORT_INTERVAL`
//!   milliseconds (60 s by default), with the temporality of
//!   `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE` (`cumulative` by default,
//!   `delta`, `lowmemory`); `OTEL_METRICS_EXPORTER=none` turns them off.
//! - The global text-map propagator is set to the builder's [`Propagation`] (W3C trace
//!   context and baggage by default), and so is mqtrace's default
//!   ([`Propagation::set_default`]): instrumenters not given formats of their own
//!   use the same ones.
//!
//! The exporter runs on a small runtime of its own (one thread), so exporting never
//! depends on the application's runtime: a collector that is down or hanging delays
//! nothing but the export thread, spans are dropped once the bounded queue is full,
//! and [`TelemetryGuard::stats`] tells how many were exported and how many were not
//! (failed, or rejected by the collector).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{global, Context, KeyValue};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{
    BatchConfig, BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, Span,
    SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;

use mqtrace::Propagation;

#[cfg(feature = "otlp-grpc")]
mod direct;

/// `tracing` targets whose spans [`TelemetryGuard::tracing_layer`] does not export:
/// transports and the OpenTelemetry pipeline itself. Each broker adapter lists its
/// client's own targets (`mqtrace_lapin::CLIENT_TARGETS`...), added with
/// [`TelemetryBuilder::quiet_targets`]. Targets match by prefix, as
/// `tracing-subscriber` does (`hyper` covers `hyper_util`); tower's entry ends in
/// `::` so that `tower_http` request spans, which are the application's, still go
/// out.
#[cfg(feature = "tracing")]
pub const QUIET_TARGETS: &[&str] = &[
    "h2",
    "hyper",
    "hyper_util",
    "tonic",
    "tower::",
    "reqwest",
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
];

/// How spans leave the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP over gRPC.
    Grpc,
    /// OTLP over HTTP with protobuf bodies.
    HttpProtobuf,
}

impl Protocol {
    /// From `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub fn from_env() -> Result<Self, TelemetryError> {
        let value = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .unwrap_or_default();
        match value.trim() {
            "" | "grpc" => Ok(Self::Grpc),
            "http/protobuf" => Ok(Self::HttpProtobuf),
            other => Err(TelemetryError::UnsupportedProtocol(other.to_owned())),
        }
    }
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (bad endpoint, bad headers...).
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
    /// The protocol asked for is not supported.
    #[error("unsupported OTLP protocol {0:?}: use grpc or http/protobuf")]
    UnsupportedProtocol(String),
    /// The protocol's cargo feature is off.
    #[error("OTLP over {0:?} needs the mqtrace feature that enables it")]
    ProtocolDisabled(Protocol),
    /// The exporter's thread could not start.
    #[error("cannot start the exporter thread: {0}")]
    Runtime(#[from] std::io::Error),
}

/// Counts of spans through the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ExportStats {
    /// Spans that ended and entered the export queue (or were dropped by it).
    pub ended: u64,
    /// Spans the collector accepted.
    pub exported: u64,
    /// Spans in export calls that failed (collector down, timeout, a request
    /// refused whole).
    pub failed: u64,
    /// Spans the collector answered it rejected (an OTLP partial success's
    /// `rejected_spans`): not exported, and not retried, as the specification
    /// says. Read from the answer by the direct encoding
    /// ([`TelemetryBuilder::direct_encoding`]); the SDK's exporter only logs it.
    pub rejected: u64,
}

impl ExportStats {
    /// Spans not exported: dropped by the full queue, in failed exports, or
    /// rejected by the collector. Exact
    /// after [`TelemetryGuard::shutdown`]; before, it also counts spans still queued.
    pub fn not_exported(&self) -> u64 {
        self.ended.saturating_sub(self.exported)
    }
}

#[derive(Debug, Default)]
struct Counters {
    ended: AtomicU64,
    exported: AtomicU64,
    failed: AtomicU64,
    rejected: AtomicU64,
}

/// The largest request a collector takes unless configured otherwise: gRPC's
/// default limit on a received message (tonic's, grpc-go's, and so the
/// OpenTelemetry Collector's gRPC receiver's), 4 MiB.
const DEFAULT_MAX_REQUEST: usize = 4 * 1024 * 1024;

/// What became of one export's spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Tally {
    /// Taken by the collector.
    pub(crate) accepted: u64,
    /// Rejected in the collector's partial success.
    pub(crate) rejected: u64,
    /// In requests that failed.
    pub(crate) failed: u64,
}

impl Counters {
    fn stats(&self) -> ExportStats {
        ExportStats {
            ended: self.ended.load(Ordering::Relaxed),
            exported: self.exported.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }
}

/// Configures [`init`].
#[derive(Debug)]
pub struct TelemetryBuilder {
    service_name: Option<String>,
    resource_attributes: Vec<KeyValue>,
    endpoint: Option<String>,
    protocol: Option<Protocol>,
    batch: Option<BatchConfig>,
    sampler: Option<Sampler>,
    propagation: Propagation,
    install_global: bool,
    shutdown_timeout: Duration,
    export_timeout: Option<Duration>,
    mirror_env: bool,
    quiet: Vec<&'static str>,
    metrics: Option<bool>,
    metric_interval: Option<Duration>,
    direct_encoding: bool,
    max_request: usize,
}

impl Default for TelemetryBuilder {
    fn default() -> Self {
        Self {
            service_name: None,
            resource_attributes: Vec::new(),
            endpoint: None,
            protocol: None,
            batch: None,
            sampler: None,
            propagation: Propagation::default(),
            install_global: true,
            shutdown_timeout: Duration::from_secs(5),
            export_timeout: None,
            mirror_env: false,
            quiet: Vec::new(),
            metrics: None,
            metric_interval: None,
            direct_encoding: true,
            max_request: DEFAULT_MAX_REQUEST,
        }
    }
}

/// The batch queue for messaging rates: 16,384 spans, exported in batches of 2,048
/// at least every second. Each of them that an `OTEL_BSP_*` variable sets is the
/// variable's instead (`OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`,
/// `OTEL_BSP_SCHEDULE_DELAY`; `OTEL_BSP_EXPORT_TIMEOUT` and the rest are the SDK's).
///
/// The SDK's defaults (2,048, 512, 5 s) hold about 0.2 s of spans at 10,000 a
/// second and send at most 512 per export round trip: a collector that takes
/// 100 ms an export takes 5,120 spans a second, and the rest are dropped. These
/// hold 1.6 s, take 20,480 a second through the same collector, and show spans
/// within a second at low rates. The queue's worst case is about 16 MiB of span
/// data. Measured in `docs/benchmarks.md` ("Batch defaults").
pub fn default_batch_config() -> BatchConfig {
    let unset = |name: &str| std::env::var_os(name).is_none();
    let mut builder = BatchConfigBuilder::default();
    if unset("OTEL_BSP_MAX_QUEUE_SIZE") {
        builder = builder.with_max_queue_size(16_384);
    }
    if unset("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") {
        builder = builder.with_max_export_batch_size(2_048);
    }
    if unset("OTEL_BSP_SCHEDULE_DELAY") {
        builder = builder.with_scheduled_delay(Duration::from_secs(1));
    }
    builder.build()
}

/// Sets up telemetry with everything taken from the environment.
pub fn init() -> Result<TelemetryGuard, TelemetryError> {
    TelemetryBuilder::default().build()
}

impl TelemetryBuilder {
    /// The `service.name` resource attribute.
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service_name = Some(name.into());
        self
    }

    /// Another resource attribute.
    pub fn resource_attribute(mut self, attribute: KeyValue) -> Self {
        self.resource_attributes.push(attribute);
        self
    }

    /// The collector: `http://host:4317` for gRPC, `http://host:4318` for HTTP (the
    /// `/v1/traces` path is added). Overrides `OTEL_EXPORTER_OTLP_*ENDPOINT`.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// More `tracing` targets whose spans the [`TelemetryGuard::tracing_layer`]
    /// leaves out, besides [`QUIET_TARGETS`]: a broker client's own, as each
    /// adapter lists them (`mqtrace_lapin::CLIENT_TARGETS`,
    /// `mqtrace_rdkafka::CLIENT_TARGETS`, `mqtrace_aws_sqs::CLIENT_TARGETS`,
    /// `mqtrace_aws_lambda::CLIENT_TARGETS`).
    pub fn quiet_targets(mut self, targets: &[&'static str]) -> Self {
        self.quiet.extend_from_slice(targets);
        self
    }

    /// The protocol, overriding the environment.
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = Some(protocol);
        self
    }

    /// Batch processor settings, overriding `OTEL_BSP_*` and mqtrace's defaults
    /// ([`default_batch_config`]).
    pub fn batch_config(mut self, config: BatchConfig) -> Self {
        self.batch = Some(config);
        self
    }

    /// The sampler, overriding `OTEL_TRACES_SAMPLER`.
    pub fn sampler(mut self, sampler: Sampler) -> Self {
        self.sampler = Some(sampler);
        self
    }

    /// The propagation formats installed as the global text-map propagator.
    pub fn propagation(mut self, propagation: Propagation) -> Self {
        self.propagation = propagation;
        self
    }

    /// Whether to install the provider and propagator globally (default: yes). A
    /// process that simulates several services keeps one provider per service.
    pub fn install_global(mut self, install: bool) -> Self {
        self.install_global = install;
        self
    }

    /// How long dropping the guard may wait for the last spans (default 5 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Whether spans going over plain OTLP/gRPC are encoded straight from the
    /// SDK's span data (on by default), or through the SDK's OTLP exporter. Either
    /// way the collector receives the same request; the direct encoding skips the
    /// SDK exporter's copy of each batch and its intermediate protobuf structs,
    /// which were most of what an exported span cost the service
    /// (`docs/benchmarks.md`). Used only where the SDK's exporter would add
    /// nothing: an `http://` endpoint, and no `OTEL_EXPORTER_OTLP_*HEADERS` or
    /// `*COMPRESSION` set; anything else goes through the SDK's exporter.
    pub fn direct_encoding(mut self, on: bool) -> Self {
        self.direct_encoding = on;
        self
    }

    /// The largest export request the direct encoding sends, in bytes (default
    /// 4 MiB: gRPC's default limit on a received message, the OpenTelemetry
    /// Collector's gRPC receiver's too). A batch whose request would be larger
    /// goes in several requests, each under it, one after the other: a collector
    /// refuses an oversized request whole, and its spans would all be lost. Raise
    /// it only with the collector's limit (`max_recv_msg_size_mib`); a single span
    /// larger than it goes alone. The SDK's exporter, used for any other set-up,
    /// sends each batch as one request.
    pub fn max_export_request_size(mut self, bytes: usize) -> Self {
        self.max_request = bytes.max(1);
        self
    }

    /// The timeout of one export call, overriding `OTEL_EXPORTER_OTLP_TIMEOUT`.
    pub fn export_timeout(mut self, timeout: Duration) -> Self {
        self.export_timeout = Some(timeout);
        self
    }

    /// With an explicit [`TelemetryBuilder::endpoint`], also export every span to the
    /// endpoint the `OTEL_EXPORTER_OTLP_*` variables name, when they name one. Spans
    /// sent there are not counted in [`TelemetryGuard::stats`].
    pub fn mirror_to_env_endpoint(mut self, mirror: bool) -> Self {
        self.mirror_env = mirror;
        self
    }

    /// Whether to export metrics over OTLP (default: unless
    /// `OTEL_METRICS_EXPORTER=none`).
    pub fn metrics(mut self, on: bool) -> Self {
        self.metrics = Some(on);
        self
    }

    /// How often metrics are read and exported (default:
    /// `OTEL_METRIC_EXPORT_INTERVAL`, else 60 s).
    pub fn metric_export_interval(mut self, interval: Duration) -> Self {
        self.metric_interval = Some(interval);
        self
    }

    /// Builds the providers, and installs them unless told not to.
    pub fn build(self) -> Result<TelemetryGuard, TelemetryError> {
        if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(TelemetryGuard::disabled());
        }
        let protocol = match self.protocol {
            Some(p) => p,
            None => Protocol::from_env()?,
        };
        let metrics_on = match self.metrics {
            Some(on) => on,
            None => metrics_from_env()?,
        };
        // Shut down without waiting if the set-up fails below: dropping a runtime
        // would panic on an async thread.
        let built = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("mqtrace-otlp")
            .enable_all()
            .build()?;
        let handle = built.handle().clone();
        let mut runtime = ExportRuntime(Some(built));
        let exporter = {
            let _entered = handle.enter();
            build_span_exporter(
                protocol,
                self.endpoint.as_deref(),
                self.export_timeout,
                self.direct_encoding,
                self.max_request,
            )?
        };
        let counters = Arc::new(Counters::default());
        let exporter = CountingExporter {
            inner: exporter,
            counters: counters.clone(),
        };
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(self.batch.unwrap_or_else(default_batch_config));
        let processor = CountingProcessor {
            inner: processor.build(),
            counters: counters.clone(),
        };
        let mirror = if self.mirror_env && env_endpoint_set() {
            let _entered = handle.enter();
            Some(build_span_exporter(
                Protocol::from_env()?,
                None,
                self.export_timeout,
                self.direct_encoding,
                self.max_request,
            )?)
        } else {
            None
        };
        let mut provider = SdkTracerProvider::builder().with_span_processor(processor);
        if let Some(mirror) = mirror {
            provider = provider.with_batch_exporter(mirror);
        }
        // One resource for both providers: they describe the same service.
        let service = resource(self.service_name, self.resource_attributes);
        let mut provider = provider.with_resource(service.clone());
        if let Some(sampler) = self.sampler {
            provider = provider.with_sampler(sampler);
        }
        let provider = provider.build();
        let mut meters = SdkMeterProvider::builder().with_resource(service);
        if metrics_on {
            let exporter = {
                let _entered = handle.enter();
                build_metric_exporter(protocol, self.endpoint.as_deref(), self.export_timeout)?
            };
            let mut reader = PeriodicReader::builder(exporter);
            if let Some(interval) = self.metric_interval {
                reader = reader.with_interval(interval);
            }
            meters = meters.with_reader(reader.build());
        }
        let meters = meters.build();
        if self.install_global {
            global::set_meter_provider(meters.clone());
            global::set_tracer_provider(provider.clone());
            // The same formats for mqtrace's instrumenters as for everything else.
            Propagation::set_default(self.propagation.clone());
            global::set_text_map_propagator(self.propagation);
        }
        Ok(TelemetryGuard {
            provider: Some(provider),
            meters: Some(meters),
            runtime: runtime.0.take(),
            counters,
            shutdown_timeout: self.shutdown_timeout,
            quiet: self.quiet,
        })
    }
}

/// The exporter's runtime while the set-up may still fail.
struct ExportRuntime(Option<tokio::runtime::Runtime>);

impl Drop for ExportRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// `OTEL_METRICS_EXPORTER`: `otlp` (default) or `none`.
fn metrics_from_env() -> Result<bool, TelemetryError> {
    match std::env::var("OTEL_METRICS_EXPORTER") {
        Err(_) => Ok(true),
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "" | "otlp" => Ok(true),
            "none" => Ok(false),
            other => Err(TelemetryError::Exporter(format!(
                "OTEL_METRICS_EXPORTER={other} is not supported here: otlp or none"
            ))),
        },
    }
}

fn env_endpoint_set() -> bool {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .any(|name| env_value(name).is_some())
}

/// An environment variable's value, trimmed; `None` when unset or blank.
fn env_value(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

fn resource(service_name: Option<String>, attributes: Vec<KeyValue>) -> Resource {
    let builder = Resource::builder().with_attributes(attributes);
    match service_name {
        Some(name) => builder.with_service_name(name).build(),
        None => {
            let detected = builder.build();
            let unknown = detected
                .get(&opentelemetry::Key::from_static_str("service.name"))
                .is_none_or(|v| v.as_str().starts_with("unknown_service"));
            if !unknown {
                return detected;
            }
            let exe = std::env::current_exe()
                .ok()
                .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "unknown_service".to_owned());
            Resource::builder()
                .with_attributes(
                    detected
                        .iter()
                        .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
                )
                .with_service_name(exe)
                .build()
        }
    }
}

/// The span exporter the set-up chose: mqtrace's direct OTLP/gRPC encoding, or
/// the SDK's OTLP exporter.
#[derive(Debug)]
enum TraceExporter {
    Sdk(Box<opentelemetry_otlp::SpanExporter>),
    #[cfg(feature = "otlp-grpc")]
    Direct(direct::DirectExporter),
}

impl TraceExporter {
    /// Exports `batch` and tells what became of its spans: the direct encoding
    /// knows request by request; the SDK's exporter says only whether the whole
    /// batch went.
    fn export_counted(
        &self,
        batch: Vec<SpanData>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = (Tally, OTelSdkResult)> + Send + '_>>
    {
        match self {
            TraceExporter::Sdk(e) => {
                let n = batch.len() as u64;
                let export = e.export(batch);
                Box::pin(async move {
                    let result = export.await;
                    let tally = if result.is_ok() {
                        Tally {
                            accepted: n,
                            ..Tally::default()
                        }
                    } else {
                        Tally {
                            failed: n,
                            ..Tally::default()
                        }
                    };
                    (tally, result)
                })
            }
            #[cfg(feature = "otlp-grpc")]
            TraceExporter::Direct(e) => Box::pin(e.export_counted(batch)),
        }
    }
}

impl SpanExporter for TraceExporter {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        // The counted export without its tally (one box per batch, as there).
        let export = self.export_counted(batch);
        async move { export.await.1 }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        match self {
            TraceExporter::Sdk(e) => e.shutdown_with_timeout(timeout),
            #[cfg(feature = "otlp-grpc")]
            TraceExporter::Direct(e) => e.shutdown_with_timeout(timeout),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        match self {
            TraceExporter::Sdk(e) => e.force_flush(),
            #[cfg(feature = "otlp-grpc")]
            TraceExporter::Direct(e) => e.force_flush(),
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        match self {
            TraceExporter::Sdk(e) => e.set_resource(resource),
            #[cfg(feature = "otlp-grpc")]
            TraceExporter::Direct(e) => e.set_resource(resource),
        }
    }
}

#[allow(unused_variables)]
fn build_span_exporter(
    protocol: Protocol,
    endpoint: Option<&str>,
    timeout: Option<Duration>,
    direct: bool,
    max_request: usize,
) -> Result<TraceExporter, TelemetryError> {
    #[cfg(feature = "otlp-grpc")]
    if direct && protocol == Protocol::Grpc {
        if let Some((endpoint, timeout)) = plain_grpc(endpoint, timeout) {
            return direct::DirectExporter::new(&endpoint, timeout, max_request)
                .map(TraceExporter::Direct)
                .map_err(TelemetryError::Exporter);
        }
    }
    build_exporter(protocol, endpoint, timeout).map(|e| TraceExporter::Sdk(Box::new(e)))
}

/// The endpoint and timeout of a plain OTLP/gRPC export (an `http://` endpoint,
/// no headers, no compression), read as the SDK's exporter reads them; `None`
/// when the set-up asks for more than the direct encoding does.
#[cfg(feature = "otlp-grpc")]
fn plain_grpc(endpoint: Option<&str>, timeout: Option<Duration>) -> Option<(String, Duration)> {
    let env = env_value;
    let asks_more = [
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        "OTEL_EXPORTER_OTLP_COMPRESSION",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    ]
    .iter()
    .any(|name| env(name).is_some());
    if asks_more {
        return None;
    }
    let endpoint = match endpoint {
        Some(e) => e.trim().to_owned(),
        None => env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .unwrap_or_else(|| "http://localhost:4317".to_owned()),
    };
    if !endpoint.starts_with("http://") {
        return None;
    }
    let timeout = timeout
        .or_else(|| {
            env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
                .or_else(|| env("OTEL_EXPORTER_OTLP_TIMEOUT"))
                .and_then(|ms| ms.parse().ok())
                .map(Duration::from_millis)
        })
        .unwrap_or(Duration::from_secs(10));
    Some((endpoint, timeout))
}

#[allow(unused_variables)]
fn build_exporter(
    protocol: Protocol,
    endpoint: Option<&str>,
    timeout: Option<Duration>,
) -> Result<opentelemetry_otlp::SpanExporter, TelemetryError> {
    use opentelemetry_otlp::WithExportConfig as _;
    match protocol {
        #[cfg(feature = "otlp-grpc")]
        Protocol::Grpc => {
            let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(endpoint) = endpoint {
                b = b.with_endpoint(endpoint);
            }
            if let Some(timeout) = timeout {
                b = b.with_timeout(timeout);
            }
            b.build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))
        }
        #[cfg(feature = "otlp-http")]
        Protocol::HttpProtobuf => {
            let endpoint = endpoint.map(|e| {
                let e = e.trim_end_matches('/');
                if e.ends_with("/v1/traces") {
                    e.to_owned()
                } else {
                    format!("{e}/v1/traces")
                }
            });
            // The blocking HTTP client owns a runtime and must not be created on an
            // async thread.
            std::thread::spawn(move || {
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
                if let Some(endpoint) = endpoint {
                    b = b.with_endpoint(endpoint);
                }
                if let Some(timeout) = timeout {
                    b = b.with_timeout(timeout);
                }
                b.build()
                    .map_err(|e| TelemetryError::Exporter(e.to_string()))
            })
            .join()
            .map_err(|_| TelemetryError::Exporter("exporter set-up panicked".to_owned()))?
        }
        #[allow(unreachable_patterns)]
        other => Err(TelemetryError::ProtocolDisabled(other)),
    }
}

#[allow(unused_variables)]
fn build_metric_exporter(
    protocol: Protocol,
    endpoint: Option<&str>,
    timeout: Option<Duration>,
) -> Result<opentelemetry_otlp::MetricExporter, TelemetryError> {
    use opentelemetry_otlp::WithExportConfig as _;
    match protocol {
        #[cfg(feature = "otlp-grpc")]
        Protocol::Grpc => {
            let mut b = opentelemetry_otlp::MetricExporter::builder().with_tonic();
            if let Some(endpoint) = endpoint {
                b = b.with_endpoint(endpoint);
            }
            if let Some(timeout) = timeout {
                b = b.with_timeout(timeout);
            }
            b.build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))
        }
        #[cfg(feature = "otlp-http")]
        Protocol::HttpProtobuf => {
            let endpoint = endpoint.map(|e| {
                let e = e.trim_end_matches('/');
                let e = e.strip_suffix("/v1/traces").unwrap_or(e);
                format!("{e}/v1/metrics")
            });
            // As for spans: the blocking client must not be made on an async thread.
            std::thread::spawn(move || {
                let mut b = opentelemetry_otlp::MetricExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
                if let Some(endpoint) = endpoint {
                    b = b.with_endpoint(endpoint);
                }
                if let Some(timeout) = timeout {
                    b = b.with_timeout(timeout);
                }
                b.build()
                    .map_err(|e| TelemetryError::Exporter(e.to_string()))
            })
            .join()
            .map_err(|_| TelemetryError::Exporter("exporter set-up panicked".to_owned()))?
        }
        #[allow(unreachable_patterns)]
        other => Err(TelemetryError::ProtocolDisabled(other)),
    }
}

/// Keeps telemetry running; dropping it (or [`TelemetryGuard::shutdown`]) flushes the
/// spans still queued, waiting at most the shutdown timeout.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    meters: Option<SdkMeterProvider>,
    runtime: Option<tokio::runtime::Runtime>,
    counters: Arc<Counters>,
    shutdown_timeout: Duration,
    quiet: Vec<&'static str>,
}

impl fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelemetryGuard")
            .field("enabled", &self.provider.is_some())
            .field("stats", &self.stats())
            .finish()
    }
}

impl TelemetryGuard {
    fn disabled() -> Self {
        Self {
            provider: None,
            meters: None,
            runtime: None,
            counters: Arc::default(),
            shutdown_timeout: Duration::ZERO,
            quiet: Vec::new(),
        }
    }

    /// The provider, unless `OTEL_SDK_DISABLED` turned telemetry off.
    pub fn provider(&self) -> Option<&SdkTracerProvider> {
        self.provider.as_ref()
    }

    /// An instrumenter builder bound to this set-up's tracer and meter providers
    /// (the global ones when telemetry is off): what a process that keeps one
    /// provider per service (`install_global(false)`) gives each service.
    pub fn instrumenter(&self) -> mqtrace::InstrumenterBuilder {
        let mut builder = mqtrace::Instrumenter::builder();
        if let Some(provider) = &self.provider {
            builder = builder.tracer_provider(provider);
        }
        if let Some(meters) = &self.meters {
            builder = builder.meter_provider(meters);
        }
        builder
    }

    /// The meter provider, unless `OTEL_SDK_DISABLED` turned telemetry off.
    pub fn meter_provider(&self) -> Option<&SdkMeterProvider> {
        self.meters.as_ref()
    }

    /// Span counts so far.
    pub fn stats(&self) -> ExportStats {
        self.counters.stats()
    }

    /// A function that exports what is queued when called (blocking the calling
    /// thread until done; nothing when telemetry is off): what
    /// `mqtrace_aws_lambda::TracedSqsHandler` runs before each invocation returns.
    pub fn flusher(&self) -> impl Fn() + Send + Sync + 'static {
        let (provider, meters) = (self.provider.clone(), self.meters.clone());
        move || flush(provider.as_ref(), meters.as_ref())
    }

    /// Exports what is queued now, spans and metrics. Blocks the calling thread
    /// until done.
    pub fn force_flush(&self) {
        flush(self.provider.as_ref(), self.meters.as_ref());
    }

    /// A `tracing` layer that sends `tracing` spans to this provider, so
    /// `#[instrument]` spans in handlers become children of the process span.
    ///
    /// Spans of the network, broker-client and exporter crates
    /// ([`QUIET_TARGETS`]) are left out: exported, the exporter's own spans would
    /// trace the exporter, and client internals would bury the application's
    /// spans. Add another filter on top to narrow it further.
    #[cfg(feature = "tracing")]
    pub fn tracing_layer<S>(&self) -> Option<impl tracing_subscriber::Layer<S>>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        use tracing_subscriber::filter::{LevelFilter, Targets};
        use tracing_subscriber::Layer as _;
        let tracer = self
            .provider
            .as_ref()?
            .tracer_with_scope(mqtrace::instrumentation_scope());
        let filter = QUIET_TARGETS
            .iter()
            .copied()
            .chain(self.quiet.iter().copied())
            .fold(Targets::new().with_default(LevelFilter::TRACE), |f, t| {
                f.with_target(t, LevelFilter::OFF)
            });
        Some(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(filter),
        )
    }

    /// Flushes and stops exporting; returns the final counts. Blocks the calling
    /// thread for up to the shutdown timeout: from async code, use
    /// [`TelemetryGuard::shutdown_async`].
    pub fn shutdown(mut self) -> ExportStats {
        self.stop();
        self.stats()
    }

    /// [`TelemetryGuard::shutdown`] on tokio's blocking pool, so no runtime thread
    /// waits for the collector.
    pub async fn shutdown_async(self) -> ExportStats {
        let counters = Arc::clone(&self.counters);
        match tokio::task::spawn_blocking(move || self.shutdown()).await {
            Ok(stats) => stats,
            // The shutdown itself panicked: the counts so far are all there is.
            Err(_) => counters.stats(),
        }
    }

    /// Stops exporting when the guard is dropped. On a thread of a multi-threaded
    /// tokio runtime the wait is announced to tokio (`block_in_place`), which moves
    /// the thread's other tasks elsewhere; on a current-thread runtime it runs on a
    /// thread of its own, joined, since nothing else could run meanwhile anyway.
    fn stop_on_drop(&mut self) {
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(|| self.stop()),
            Ok(_) => {
                let (provider, meters, runtime, timeout) = (
                    self.provider.take(),
                    self.meters.take(),
                    self.runtime.take(),
                    self.shutdown_timeout,
                );
                let stopped = std::thread::Builder::new()
                    .name("mqtrace-telemetry-shutdown".into())
                    .spawn(move || {
                        let mut guard = TelemetryGuard {
                            provider,
                            meters,
                            runtime,
                            counters: Arc::default(),
                            shutdown_timeout: timeout,
                            quiet: Vec::new(),
                        };
                        guard.stop();
                    });
                if let Ok(handle) = stopped {
                    let _ = handle.join();
                }
            }
            Err(_) => self.stop(),
        }
    }

    fn stop(&mut self) {
        if let Some(meters) = self.meters.take() {
            if let Err(e) = meters.shutdown_with_timeout(self.shutdown_timeout) {
                tracing::debug!(target: "mqtrace", error = %e, "metrics shutdown incomplete");
            }
        }
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown_with_timeout(self.shutdown_timeout) {
                tracing::debug!(target: "mqtrace", error = %e, "telemetry shutdown incomplete");
            }
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if self.provider.is_some() || self.meters.is_some() || self.runtime.is_some() {
            self.stop_on_drop();
        }
    }
}

fn flush(provider: Option<&SdkTracerProvider>, meters: Option<&SdkMeterProvider>) {
    if let Some(provider) = provider {
        if let Err(e) = provider.force_flush() {
            tracing::debug!(target: "mqtrace", error = %e, "span flush failed");
        }
    }
    if let Some(meters) = meters {
        if let Err(e) = meters.force_flush() {
            tracing::debug!(target: "mqtrace", error = %e, "metric flush failed");
        }
    }
}

#[derive(Debug)]
struct CountingProcessor<P> {
    inner: P,
    counters: Arc<Counters>,
}

impl<P: SpanProcessor> SpanProcessor for CountingProcessor<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        self.counters.ended.fetch_add(1, Ordering::Relaxed);
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Counts what became of every exported span.
#[derive(Debug)]
struct CountingExporter {
    inner: TraceExporter,
    counters: Arc<Counters>,
}

impl SpanExporter for CountingExporter {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let counters = self.counters.clone();
        let export = self.inner.export_counted(batch);
        async move {
            let (tally, result) = export.await;
            counters
                .exported
                .fetch_add(tally.accepted, Ordering::Relaxed);
            counters
                .rejected
                .fetch_add(tally.rejected, Ordering::Relaxed);
            counters.failed.fetch_add(tally.failed, Ordering::Relaxed);
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}
