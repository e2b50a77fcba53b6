//! Plain lapin with the extension traits, and the publisher's broker answers.

use futures_util::StreamExt as _;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, ExchangeKind};
use mqtrace::Propagation;
use mqtrace_lapin::{
    declare_exchange, BasicPropertiesExt as _, DeliveryExt as _, QueueSpec, TracedPublisher,
};
use mqtrace_testing::{SpanStatus, TreeOptions};
use opentelemetry::trace::{Span as _, TraceContextExt as _, Tracer as _, TracerProvider as _};
use opentelemetry::Context;

use crate::helpers::{assert_tree, within, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extension_traits_carry_the_context_through_plain_lapin() {
    let h = Harness::start().await;
    let (_connection, channel) = h.channel().await;
    let queue = QueueSpec::new(h.name("plain-ext"));
    queue.declare(&channel).await.unwrap();
    let tracer = h.guard.provider().unwrap().tracer("app");
    let propagation = Propagation::default();

    let span = tracer.start("publish order");
    let sent = span.span_context().clone();
    let cx = Context::current_with_span(span);
    let properties = BasicProperties::default().with_trace_context(&propagation, &cx);
    channel
        .basic_publish(
            "".into(),
            queue.name().into(),
            BasicPublishOptions::default(),
            b"{}",
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    cx.span().end();

    let mut consumer = channel
        .basic_consume(
            queue.name().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = within(10, consumer.next()).await.unwrap().unwrap();
    let remote = delivery.trace_context(&propagation);
    assert_eq!(remote.span().span_context().trace_id(), sent.trace_id());
    assert_eq!(remote.span().span_context().span_id(), sent.span_id());
    assert!(remote.span().span_context().is_remote());
    tracer.start_with_context("handle order", &remote).end();
    delivery.ack(BasicAckOptions::default()).await.unwrap();

    assert_tree(
        &h.render(2, TreeOptions::only(&[])).await,
        r#"
        trace #1
        publish order [INTERNAL]
            handle order [INTERNAL]
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_mandatory_publish_marks_the_send_span() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let (_connection, channel) = h.channel().await;
    // An exchange with no queue bound: a mandatory message comes back.
    let exchange = h.name("nowhere");
    declare_exchange(&channel, &exchange, ExchangeKind::Direct)
        .await
        .unwrap();
    let confirmation = TracedPublisher::new(channel, instrumenter)
        .publish(
            exchange.as_str().into(),
            "lost".into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    // The caller still sees lapin's answer unchanged.
    assert!(confirmation.take_message().is_some());
    let spans = h.spans(1).await;
    assert!(
        matches!(spans[0].status, SpanStatus::Error(_)),
        "{:?}",
        spans[0].status
    );
    assert_tree(
        &h.render(1, TreeOptions::only(&["error.type"])).await,
        r#"
        trace #1
        send nowhere-RUN:lost [PRODUCER] ERROR("returned: NO_ROUTE") error.type="no-route"
        "#,
    );
}
