//! Retry budget, dead letters with metadata and byte-exact bodies, forward spans with
//! both links, permanent errors, panics, and an accounting that nothing is lost.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use mqtrace::embedded::{HeaderExtractor, Message, TracedConsumer, TracedProducer};
use mqtrace::forward::{
    ATTEMPT_HEADER, ERROR_MESSAGE_HEADER, ERROR_TYPE_HEADER, FAILED_AT_HEADER,
    MAX_ERROR_MESSAGE_LEN, ORIGINAL_TRACEPARENT_HEADER,
};
use mqtrace::{Conventions, HandlerError, RetryPolicy};
use mqtrace_testing::{SpanStatus, TreeOptions};
use opentelemetry::propagation::Extractor;

use crate::helpers::{assert_tree, broker_with, Harness};

const OUTCOME: &[&str] = &[
    "error.type",
    "mqtrace.error.retryable",
    "mqtrace.message.attempt",
    "mqtrace.message.disposition",
];

fn header(m: &mqtrace::embedded::StoredMessage, key: &str) -> Option<String> {
    HeaderExtractor(&m.headers).get(key).map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_spent_goes_to_dead_letter_with_metadata() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b.conventions(Conventions::V1_45));
    let broker = broker_with(&[("orders", Some("orders.dlq")), ("orders.dlq", None)]);
    // Not UTF-8, with a NUL: must arrive byte for byte.
    let body = Bytes::from_static(b"\x00\xff order 7 \xfe");
    TracedProducer::new(broker.clone(), instrumenter.clone())
        .send(
            "orders",
            Message::new(body.clone()).header("x-tenant", "acme"),
        )
        .await
        .unwrap();
    let long = "x".repeat(2 * MAX_ERROR_MESSAGE_LEN);
    let stats = TracedConsumer::new(broker.clone(), "orders", instrumenter)
        .run_until_idle(|_| {
            let long = long.clone();
            async move {
                Err(HandlerError::transient(format!("payment down {long}"))
                    .with_type("payment_unavailable"))
            }
        })
        .await
        .unwrap();
    assert_eq!(
        (stats.settled, stats.retried, stats.dead_lettered),
        (0, 2, 1)
    );
    assert_eq!(broker.depth("orders").unwrap(), Default::default());

    let dead = broker.drain("orders.dlq").unwrap();
    assert_eq!(dead.len(), 1);
    let dead = &dead[0];
    assert_eq!(dead.body, body, "body byte for byte");
    assert_eq!(
        header(dead, "x-tenant").as_deref(),
        Some("acme"),
        "user headers kept"
    );
    assert_eq!(header(dead, ATTEMPT_HEADER).as_deref(), Some("3"));
    assert_eq!(
        header(dead, ERROR_TYPE_HEADER).as_deref(),
        Some("payment_unavailable")
    );
    let message = header(dead, ERROR_MESSAGE_HEADER).unwrap();
    assert_eq!(message.len(), MAX_ERROR_MESSAGE_LEN);
    assert!(message.starts_with("payment down xxx"));
    let failed_at =
        mqtrace::forward::parse_failed_at(&header(dead, FAILED_AT_HEADER).unwrap()).unwrap();
    assert!(failed_at.elapsed().unwrap().as_secs() < 60);

    let forest = h.forest(7).await;
    let spans = &forest.traces()[0];
    let root = &spans[0];
    assert_eq!(root.name, "send orders");
    assert_eq!(
        header(dead, ORIGINAL_TRACEPARENT_HEADER).unwrap(),
        format!("00-{}-{}-01", root.trace_id, root.span_id),
        "original traceparent is the first publication's"
    );
    // The dead letter carries the context of the span that forwarded it.
    let dlq_span = spans.iter().find(|s| s.name == "send orders.dlq").unwrap();
    assert_eq!(
        header(dead, "traceparent").unwrap(),
        format!("00-{}-{}-01", dlq_span.trace_id, dlq_span.span_id)
    );
    // Every forward links the original publication and its processing attempt.
    for forward in spans
        .iter()
        .filter(|s| s.name.starts_with("send") && s.parent_span_id.is_some())
    {
        assert_eq!(forward.links[0].span_id, root.span_id);
        assert_eq!(
            Some(&forward.links[1].span_id),
            forward.parent_span_id.as_ref()
        );
    }
    assert_tree(
        &forest.render(&TreeOptions::only(OUTCOME)),
        r#"
        trace #1
        send orders [PRODUCER]
            process orders [CONSUMER] ERROR(PLACEHOLDER) error.type="payment_unavailable" mqtrace.error.retryable=true mqtrace.message.attempt=1 mqtrace.message.disposition="retried"
                ~> send orders (this trace)
                send orders [PRODUCER] mqtrace.message.attempt=1 mqtrace.message.disposition="retried"
                    ~> send orders (this trace) mqtrace.link.relationship="original_message"
                    ~> process orders (this trace) mqtrace.link.relationship="processing_attempt"
                    process orders [CONSUMER] ERROR(PLACEHOLDER) error.type="payment_unavailable" mqtrace.error.retryable=true mqtrace.message.attempt=2 mqtrace.message.disposition="retried"
                        ~> send orders (this trace)
                        send orders [PRODUCER] mqtrace.message.attempt=2 mqtrace.message.disposition="retried"
                            ~> send orders (this trace) mqtrace.link.relationship="original_message"
                            ~> process orders (this trace) mqtrace.link.relationship="processing_attempt"
                            process orders [CONSUMER] ERROR(PLACEHOLDER) error.type="payment_unavailable" mqtrace.error.retryable=true mqtrace.message.attempt=3 mqtrace.message.disposition="dead_lettered"
                                ~> send orders (this trace)
                                send orders.dlq [PRODUCER] mqtrace.message.attempt=3 mqtrace.message.disposition="dead_lettered"
                                    ~> send orders (this trace) mqtrace.link.relationship="original_message"
                                    ~> process orders (this trace) mqtrace.link.relationship="processing_attempt"
        "#
        .replace("PLACEHOLDER", &format!("{:?}", format!("payment down {long}")))
        .as_str(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_then_success_is_one_connected_trace() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b.conventions(Conventions::V1_45));
    let broker = broker_with(&[("orders", Some("orders.dlq")), ("orders.dlq", None)]);
    TracedProducer::new(broker.clone(), instrumenter.clone())
        .send("orders", Message::new("x"))
        .await
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let stats = TracedConsumer::new(broker.clone(), "orders", instrumenter)
        .run_until_idle(|_| {
            let calls = calls.clone();
            async move {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    Err(HandlerError::transient("timeout").with_type("timeout"))
                } else {
                    Ok(())
                }
            }
        })
        .await
        .unwrap();
    assert_eq!(
        (stats.settled, stats.retried, stats.dead_lettered),
        (1, 1, 0)
    );
    assert_tree(
        &h.forest(4).await.render(&TreeOptions::only(OUTCOME)),
        r#"
        trace #1
        send orders [PRODUCER]
            process orders [CONSUMER] ERROR("timeout") error.type="timeout" mqtrace.error.retryable=true mqtrace.message.attempt=1 mqtrace.message.disposition="retried"
                ~> send orders (this trace)
                send orders [PRODUCER] mqtrace.message.attempt=1 mqtrace.message.disposition="retried"
                    ~> send orders (this trace) mqtrace.link.relationship="original_message"
                    ~> process orders (this trace) mqtrace.link.relationship="processing_attempt"
                    process orders [CONSUMER] mqtrace.message.attempt=2 mqtrace.message.disposition="settled"
                        ~> send orders (this trace)
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_is_permanent_and_dead_lettered_at_once() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b.conventions(Conventions::V1_45));
    let broker = broker_with(&[("orders", Some("orders.dlq")), ("orders.dlq", None)]);
    TracedProducer::new(broker.clone(), instrumenter.clone())
        .send("orders", Message::new("{not json"))
        .await
        .unwrap();
    let stats = TracedConsumer::new(broker.clone(), "orders", instrumenter)
        .run_until_idle(|m| async move {
            serde_json::from_slice::<serde_json::Value>(&m.body)
                .map_err(HandlerError::permanent)?;
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!((stats.retried, stats.dead_lettered), (0, 1));
    let dead = broker.drain("orders.dlq").unwrap();
    assert_eq!(dead[0].body, Bytes::from_static(b"{not json"));
    assert_eq!(
        header(&dead[0], ERROR_TYPE_HEADER).as_deref(),
        Some("serde_json::Error")
    );
    assert_eq!(header(&dead[0], ATTEMPT_HEADER).as_deref(), Some("1"));
    let spans = h.spans(3).await;
    let process = spans.iter().find(|s| s.name == "process orders").unwrap();
    assert_eq!(
        process
            .attr("mqtrace.error.retryable")
            .map(ToString::to_string)
            .as_deref(),
        Some("false")
    );
    assert!(matches!(process.status, SpanStatus::Error(_)));
    // v1.45: no deprecated `exception` span event (tests/all/exceptions.rs).
    assert!(process.events.is_empty(), "{:?}", process.events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_without_dead_letter_queue_is_dropped_and_says_so() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b.conventions(Conventions::V1_45));
    let broker = broker_with(&[("orders", None)]);
    broker.publish("orders", Message::new("x")).unwrap();
    let stats = TracedConsumer::new(broker.clone(), "orders", instrumenter)
        .run_until_idle(|_| async { Err(HandlerError::permanent("invalid")) })
        .await
        .unwrap();
    assert_eq!(stats.dropped, 1);
    assert_eq!(broker.depth("orders").unwrap(), Default::default());
    let spans = h.spans(1).await;
    assert_eq!(
        spans[0]
            .attr("mqtrace.message.disposition")
            .and_then(|v| v.as_str()),
        Some("dropped")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_a_transient_failure_and_the_consumer_goes_on() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| {
        b.conventions(Conventions::V1_45)
            .retry_policy(RetryPolicy::attempts(1))
    });
    let broker = broker_with(&[("orders", Some("orders.dlq")), ("orders.dlq", None)]);
    broker.publish("orders", Message::new("boom")).unwrap();
    broker.publish("orders", Message::new("fine")).unwrap();
    let stats = TracedConsumer::new(broker.clone(), "orders", instrumenter)
        .run_until_idle(|m| async move {
            if &m.body[..] == b"boom" {
                panic!("handler bug");
            }
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!((stats.settled, stats.dead_lettered), (1, 1));
    let dead = broker.drain("orders.dlq").unwrap();
    assert_eq!(
        header(&dead[0], ERROR_TYPE_HEADER).as_deref(),
        Some("panic")
    );
    assert_eq!(
        header(&dead[0], ERROR_MESSAGE_HEADER).as_deref(),
        Some("handler bug")
    );
    let spans = h.spans(3).await;
    let failed = spans
        .iter()
        .find(|s| s.attr("error.type").is_some())
        .unwrap();
    assert_eq!(failed.status, SpanStatus::Error("handler bug".into()));
    assert_eq!(
        failed
            .attr("mqtrace.error.retryable")
            .map(ToString::to_string)
            .as_deref(),
        Some("true")
    );
}

/// 200 messages, a third failing transiently at random, a tenth permanently: every
/// one is processed or dead-lettered, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_across_failures() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b.conventions(Conventions::V1_45));
    let broker = broker_with(&[("orders", Some("orders.dlq")), ("orders.dlq", None)]);
    let producer = TracedProducer::new(broker.clone(), instrumenter.clone());
    for i in 0..200u32 {
        producer
            .send("orders", Message::new(i.to_string()))
            .await
            .unwrap();
    }
    let rng = Arc::new(std::sync::Mutex::new(fastrand::Rng::with_seed(7)));
    let stats = TracedConsumer::new(broker.clone(), "orders", instrumenter)
        .run_until_idle(|m| {
            let roll = rng.lock().unwrap().u32(0..100);
            async move {
                let n: u32 = std::str::from_utf8(&m.body)?.parse()?;
                match (n % 10, roll) {
                    (0, _) => Err(HandlerError::permanent("invalid order")),
                    (_, r) if r < 33 => Err(HandlerError::transient("flaky")),
                    _ => Ok(()),
                }
            }
        })
        .await
        .unwrap();
    let dead = broker.drain("orders.dlq").unwrap().len() as u64;
    assert_eq!(dead, stats.dead_lettered);
    assert!(stats.retried > 0 && dead >= 20);
    assert_eq!(stats.settled + dead, 200, "lost = 0");
}
