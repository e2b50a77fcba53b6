//! Receiving OTLP, for `view` and `doctor`: where to listen, the receivers,
//! the stop, captures of what arrived (OTLP JSON lines), and printing that
//! survives a closed stdout.

pub(crate) mod capture;

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use mqtrace_testing::{Collector, CollectorConfig};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use tokio::sync::mpsc;

use capture::CaptureError;

/// Why receiving stopped: a capture that cannot be read or written, or a
/// receiver that cannot listen.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReceiveError {
    #[error("{0}")]
    Capture(#[from] CaptureError),
    #[error("{0}")]
    Listen(std::io::Error),
}

/// Where `view` and `doctor` listen for OTLP.
#[derive(Debug, Clone, Args)]
pub(crate) struct ListenArgs {
    /// Address of the OTLP/gRPC receiver (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:4317", value_name = "ADDR")]
    pub(crate) grpc: SocketAddr,
    /// Address of the OTLP/HTTP (protobuf) receiver, serving `/v1/traces`.
    #[arg(long, default_value = "127.0.0.1:4318", value_name = "ADDR")]
    pub(crate) http: SocketAddr,
    /// The largest export request taken, in bytes, on both receivers (default:
    /// the OpenTelemetry Collector's, 4 MiB a gRPC message, 20 MiB an HTTP
    /// body). Larger ones are refused unread: 413 over HTTP, RESOURCE_EXHAUSTED
    /// over gRPC.
    #[arg(long, value_name = "BYTES")]
    pub(crate) max_request_size: Option<usize>,
}

/// Writes to stdout; a closed stdout (a pipe whose reader left) is not an error
/// worth a panic.
pub(crate) fn print(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// Starts the receivers; each trace request goes to the returned channel.
pub(crate) async fn listen(
    listen: &ListenArgs,
) -> Result<(Collector, mpsc::Receiver<ExportTraceServiceRequest>), ReceiveError> {
    let (tap, requests) = mpsc::channel(256);
    let mut config = CollectorConfig::default()
        .listen(listen.grpc, listen.http)
        .keep(false);
    if let Some(max) = listen.max_request_size {
        config = config.max_request_size(max);
    }
    let collector = Collector::start_with(config, Some(tap))
        .await
        .map_err(ReceiveError::Listen)?;
    Ok((collector, requests))
}

/// Resolves when the user presses Ctrl-C or `duration` passes.
pub(crate) async fn stopped(duration: Option<Duration>) {
    let timer = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = timer => {}
    }
}
