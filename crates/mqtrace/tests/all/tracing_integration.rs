//! Handler spans made with `tracing` (`#[instrument]`, `info_span!`) become children
//! of the process span through the telemetry guard's `tracing` layer.

use mqtrace::embedded::{Message, TracedConsumer, TracedProducer};
use mqtrace::Conventions;
use mqtrace_testing::TreeOptions;
use tracing::instrument::WithSubscriber;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

use mqtrace_telemetry::Protocol;

use crate::helpers::{assert_tree, broker_with, Harness};

#[tracing::instrument]
async fn validate_order(body: String) -> Result<(), mqtrace::HandlerError> {
    async { tokio::task::yield_now().await }
        .instrument(tracing::info_span!("load customer"))
        .await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instrumented_handler_spans_nest_under_process() {
    let h = Harness::start().await;
    let dispatch =
        tracing::Dispatch::new(tracing_subscriber::registry().with(h.guard.tracing_layer()));
    let instrumenter = h.instrumenter(|b| b.conventions(Conventions::V1_45));
    let broker = broker_with(&[("orders", None)]);
    TracedProducer::new(broker.clone(), instrumenter.clone())
        .send("orders", Message::new("x"))
        .await
        .unwrap();
    let consumer = TracedConsumer::new(broker, "orders", instrumenter);
    // A tracing span around the consumer loop is the ambient context: it becomes a
    // link of the process span and must not capture the handler's spans.
    let loop_span =
        tracing::dispatcher::with_default(&dispatch, || tracing::info_span!("consumer loop"));
    consumer
        .run_until_idle(|m| validate_order(String::from_utf8_lossy(&m.body).into_owned()))
        .instrument(loop_span)
        .with_subscriber(dispatch)
        .await
        .unwrap();
    assert_tree(
        &h.forest(5).await.render(&TreeOptions::only(&[])),
        "
        trace #1
        send orders [PRODUCER]
            process orders [CONSUMER]
                ~> send orders (this trace)
                ~> consumer loop (trace #2)
                validate_order [INTERNAL]
                    load customer [INTERNAL]
        trace #2
        consumer loop [INTERNAL]
        ",
    );
}

/// Transport and exporter spans stay out of the export, and so do a broker
/// client's when its adapter's targets are given; the application's, tower-http's
/// request spans among them, go out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_leaves_transport_spans_out() {
    let h = Harness::configured(Protocol::Grpc, |b| {
        b.quiet_targets(&["lapin", "amq_protocol"])
    })
    .await;
    let dispatch =
        tracing::Dispatch::new(tracing_subscriber::registry().with(h.guard.tracing_layer()));
    tracing::dispatcher::with_default(&dispatch, || {
        for span in [
            tracing::info_span!(target: "h2::proto::connection", "h2 frame"),
            tracing::info_span!(target: "hyper_util::client", "pool checkout"),
            tracing::info_span!(target: "tonic::transport", "tonic call"),
            tracing::info_span!(target: "opentelemetry_otlp::exporter", "export"),
            tracing::info_span!(target: "lapin::io_loop", "io loop"),
            tracing::info_span!(target: "amq_protocol::frame", "frame"),
            tracing::info_span!(target: "tower::buffer", "buffer worker"),
            tracing::info_span!(target: "tower_http::trace", "GET /orders"),
            tracing::info_span!(target: "order_service", "charge card"),
        ] {
            span.in_scope(|| {});
        }
    });
    assert_tree(
        &h.forest(2).await.render(&TreeOptions::only(&[])),
        "
        trace #1
        GET /orders [INTERNAL]
        trace #2
        charge card [INTERNAL]
        ",
    );
}
