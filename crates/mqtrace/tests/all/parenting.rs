//! The parenting switch: producer as parent and link (default), link only, parent
//! only; and an ambient span around processing.

use mqtrace::embedded::{Message, TracedConsumer, TracedProducer};
use mqtrace::{Conventions, ProcessParenting};
use mqtrace_testing::TreeOptions;
use opentelemetry::trace::TraceContextExt;
use opentelemetry::trace::{Tracer, TracerProvider};
use opentelemetry::Context;

use crate::helpers::{assert_tree, broker_with, Harness};

const NAMES: &[&str] = &[];

async fn run(parenting: ProcessParenting, ambient: bool) -> String {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b.conventions(Conventions::V1_45).parenting(parenting));
    let broker = broker_with(&[("orders", None)]);
    TracedProducer::new(broker.clone(), instrumenter.clone())
        .send("orders", Message::new("x"))
        .await
        .unwrap();
    let consumer = TracedConsumer::new(broker, "orders", instrumenter);
    if ambient {
        let tracer = h.guard.provider().unwrap().tracer("http");
        let span = tracer.start("POST /push");
        let cx = Context::current().with_span(span);
        let _attached = cx.clone().attach();
        consumer.run_until_idle(|_| async { Ok(()) }).await.unwrap();
        drop(_attached);
        cx.span().end();
        h.forest(3).await.render(&TreeOptions::only(NAMES))
    } else {
        consumer.run_until_idle(|_| async { Ok(()) }).await.unwrap();
        h.forest(2).await.render(&TreeOptions::only(NAMES))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_and_link_is_the_default() {
    assert_eq!(ProcessParenting::default(), ProcessParenting::ParentAndLink);
    assert_tree(
        &run(ProcessParenting::ParentAndLink, false).await,
        "
        trace #1
        send orders [PRODUCER]
            process orders [CONSUMER]
                ~> send orders (this trace)
        ",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_only_starts_a_new_trace() {
    assert_tree(
        &run(ProcessParenting::LinkOnly, false).await,
        "
        trace #1
        send orders [PRODUCER]
        trace #2
        process orders [CONSUMER]
            ~> send orders (trace #1)
        ",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_only_has_no_link() {
    assert_tree(
        &run(ProcessParenting::ParentOnly, false).await,
        "
        trace #1
        send orders [PRODUCER]
            process orders [CONSUMER]
        ",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambient_span_is_parent_in_link_only_mode() {
    assert_tree(
        &run(ProcessParenting::LinkOnly, true).await,
        "
        trace #1
        send orders [PRODUCER]
        trace #2
        POST /push [INTERNAL]
            process orders [CONSUMER]
                ~> send orders (trace #1)
        ",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambient_span_becomes_a_link_when_the_producer_is_parent() {
    assert_tree(
        &run(ProcessParenting::ParentAndLink, true).await,
        "
        trace #1
        send orders [PRODUCER]
            process orders [CONSUMER]
                ~> send orders (this trace)
                ~> POST /push (trace #2)
        trace #2
        POST /push [INTERNAL]
        ",
    );
}
