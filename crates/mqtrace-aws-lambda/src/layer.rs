//! A `tower` layer, so the traced handler composes with lambda_runtime's own
//! layers and services.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use lambda_runtime::tower::{Layer, Service, ServiceExt as _};
use lambda_runtime::LambdaEvent;
use mqtrace::HandlerError;

use crate::TracedSqsHandler;

/// Wraps a per-record service (`Service<SqsMessage, Response = (), Error =
/// HandlerError>`) into a service of whole SQS events that lambda_runtime runs:
/// every record goes through the wrapped service inside its span, and the event's
/// answer is the partial batch response, as with [`TracedSqsHandler::handle`].
///
/// ```no_run
/// use aws_lambda_events::event::sqs::SqsMessage;
/// use lambda_runtime::tower::ServiceBuilder;
/// use lambda_runtime::{service_fn, Error};
/// use mqtrace::{HandlerError, Instrumenter};
/// use mqtrace_aws_lambda::{TracedSqsHandler, TracedSqsLayer};
///
/// # async fn run() -> Result<(), Error> {
/// let telemetry = mqtrace_telemetry::init()?;
/// let traced = TracedSqsHandler::new(&Instrumenter::default(), telemetry.flusher());
/// let service = ServiceBuilder::new()
///     .layer(TracedSqsLayer::new(traced))
///     .service(service_fn(|record: SqsMessage| async move {
///         let body = record.body.unwrap_or_default();
///         serde_json::from_str::<serde_json::Value>(&body).map_err(HandlerError::permanent)?;
///         Ok::<(), HandlerError>(())
///     }));
/// lambda_runtime::run(service).await
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct TracedSqsLayer {
    traced: TracedSqsHandler,
}

impl TracedSqsLayer {
    /// A layer that handles events with `traced`.
    pub fn new(traced: TracedSqsHandler) -> Self {
        Self { traced }
    }
}

impl<S> Layer<S> for TracedSqsLayer {
    type Service = TracedSqsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TracedSqsService {
            traced: self.traced.clone(),
            inner,
        }
    }
}

/// The service [`TracedSqsLayer`] makes.
#[derive(Debug, Clone)]
pub struct TracedSqsService<S> {
    traced: TracedSqsHandler,
    inner: S,
}

impl<S> Service<LambdaEvent<SqsEvent>> for TracedSqsService<S>
where
    S: Service<SqsMessage, Response = (), Error = HandlerError> + Clone + 'static,
{
    type Response = SqsBatchResponse;
    type Error = lambda_runtime::Error;
    type Future = Pin<Box<dyn Future<Output = Result<SqsBatchResponse, Self::Error>>>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is asked of the wrapped service once per record.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: LambdaEvent<SqsEvent>) -> Self::Future {
        let traced = self.traced.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            let response = traced
                .handle(event, move |record| {
                    let service = inner.clone();
                    let record = record.clone();
                    async move { service.oneshot(record).await }
                })
                .await?;
            Ok(response)
        })
    }
}
