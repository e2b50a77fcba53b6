//! Several messages in flight on tokio tasks: each handler sees its own message's
//! context across awaits, and its spans land in that message's trace.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mqtrace::embedded::{HeaderExtractor, Message, TracedConsumer, TracedProducer};
use mqtrace::{Conventions, Propagation};
use opentelemetry::trace::{Span as _, TraceContextExt, Tracer, TracerProvider};
use opentelemetry::Context;

use crate::helpers::{broker_with, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_task_keeps_its_message_context() {
    const MESSAGES: usize = 40;
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b.conventions(Conventions::V1_45));
    let broker = broker_with(&[("orders", None)]);
    let producer = TracedProducer::new(broker.clone(), instrumenter.clone());
    for i in 0..MESSAGES {
        producer
            .send("orders", Message::new(i.to_string()))
            .await
            .unwrap();
    }
    let tracer = h.guard.provider().unwrap().tracer("worker");
    let mismatches = Arc::new(AtomicUsize::new(0));
    let seen = mismatches.clone();
    let stats = TracedConsumer::new(broker, "orders", instrumenter)
        .run_concurrent(8, move |m| {
            let tracer = tracer.clone();
            let mismatches = seen.clone();
            async move {
                let expected = Propagation::default()
                    .extract(&HeaderExtractor(&m.headers))
                    .span()
                    .span_context()
                    .trace_id();
                let n: u64 = std::str::from_utf8(&m.body).unwrap().parse().unwrap();
                for step in ["reserve stock", "charge card"] {
                    // Interleave the tasks.
                    tokio::time::sleep(Duration::from_millis(n % 5)).await;
                    tokio::task::yield_now().await;
                    if Context::current().span().span_context().trace_id() != expected {
                        mismatches.fetch_add(1, Ordering::SeqCst);
                    }
                    tracer.start(step).end();
                }
                Ok(())
            }
        })
        .await
        .unwrap();
    assert_eq!(stats.settled, MESSAGES as u64);
    assert_eq!(
        mismatches.load(Ordering::SeqCst),
        0,
        "handlers saw another message's context"
    );

    let forest = h.forest(MESSAGES * 4).await;
    assert_eq!(forest.traces().len(), MESSAGES);
    for trace in forest.traces() {
        let names: Vec<&str> = trace.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "send orders",
                "process orders",
                "reserve stock",
                "charge card"
            ]
        );
        let process = &trace[1];
        for step in &trace[2..] {
            assert_eq!(step.parent_span_id.as_ref(), Some(&process.span_id));
        }
    }
}
