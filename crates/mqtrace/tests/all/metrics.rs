//! The messaging metrics, exported over real OTLP: values, units, kinds, buckets and
//! attributes after a run with a success, a retry and dead letters.

use mqtrace::embedded::{Message, TracedConsumer, TracedProducer};
use mqtrace::{Conventions, HandlerError};

use crate::helpers::{assert_tree, broker_with, Harness};

/// Three orders: `ok` succeeds, `flaky` fails once and then succeeds, `bad` fails
/// permanently and is dead-lettered. Settlement is timed whether or not settle
/// spans are on (they are off here).
async fn run(conventions: Conventions) -> String {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b.conventions(conventions));
    let broker = broker_with(&[("orders", Some("orders.dlq")), ("orders.dlq", None)]);
    let producer = TracedProducer::new(broker.clone(), instrumenter.clone());
    for body in ["ok", "flaky", "bad"] {
        producer.send("orders", Message::new(body)).await.unwrap();
    }
    let stats = TracedConsumer::new(broker.clone(), "orders", instrumenter)
        .run_until_idle(|m| {
            let (body, attempt) = (m.body.clone(), m.attempt);
            async move {
                match (&body[..], attempt) {
                    (b"flaky", 1) => {
                        Err(HandlerError::transient("try later").with_type("unavailable"))
                    }
                    (b"bad", _) => {
                        Err(HandlerError::permanent("no such order").with_type("invalid"))
                    }
                    _ => Ok(()),
                }
            }
        })
        .await
        .unwrap();
    assert_eq!(
        (stats.settled, stats.retried, stats.dead_lettered),
        (2, 1, 1)
    );
    assert_eq!(broker.drain("orders.dlq").unwrap().len(), 1);
    h.metrics(&[], &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_four_metrics_and_mqtrace_s_own() {
    assert_tree(
        &run(Conventions::V1_45).await,
        r#"
        messaging.client.consumed.messages [{message}] Counter value=4 messaging.destination.name="orders" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="mqtrace"
        messaging.client.operation.duration [s] Histogram count=4 buckets=messaging messaging.destination.name="orders" messaging.operation.name="ack" messaging.operation.type="settle" messaging.system.name="mqtrace"
        messaging.client.operation.duration [s] Histogram count=4 buckets=messaging messaging.destination.name="orders" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="mqtrace"
        messaging.client.operation.duration [s] Histogram count=1 buckets=messaging messaging.destination.name="orders.dlq" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="mqtrace"
        messaging.client.sent.messages [{message}] Counter value=4 messaging.destination.name="orders" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="mqtrace"
        messaging.client.sent.messages [{message}] Counter value=1 messaging.destination.name="orders.dlq" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="mqtrace"
        messaging.process.duration [s] Histogram count=1 buckets=messaging error.type="invalid" messaging.destination.name="orders" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="mqtrace"
        messaging.process.duration [s] Histogram count=1 buckets=messaging error.type="unavailable" messaging.destination.name="orders" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="mqtrace"
        messaging.process.duration [s] Histogram count=2 buckets=messaging messaging.destination.name="orders" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="mqtrace"
        mqtrace.message.dispositions [{message}] Counter value=1 messaging.destination.name="orders" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="mqtrace" mqtrace.message.disposition="dead_lettered"
        mqtrace.message.dispositions [{message}] Counter value=1 messaging.destination.name="orders" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="mqtrace" mqtrace.message.disposition="retried"
        mqtrace.message.dispositions [{message}] Counter value=2 messaging.destination.name="orders" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="mqtrace" mqtrace.message.disposition="settled"
        mqtrace.message.queue.duration [s] Histogram count=4 buckets=messaging messaging.destination.name="orders" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="mqtrace"
        "#,
    );
}

fn names(rendered: &str) -> Vec<&str> {
    let mut names: Vec<&str> = rendered
        .lines()
        .filter_map(|l| l.split(' ').next())
        .collect();
    names.dedup();
    names
}

/// v1.24's metric names under legacy; both sets under dup, each with its
/// version's attribute names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_and_dup_metric_names() {
    let legacy = run(Conventions::Legacy).await;
    assert_eq!(
        names(&legacy),
        [
            "messaging.process.duration",
            "messaging.process.messages",
            "messaging.publish.duration",
            "messaging.publish.messages",
            "messaging.receive.duration",
            "mqtrace.message.dispositions",
            "mqtrace.message.queue.duration",
        ]
    );
    assert!(
        legacy.contains(r#"messaging.receive.duration [s] Histogram count=4 buckets=messaging messaging.destination.name="orders" messaging.system="mqtrace""#),
        "settle calls, without v1.24's operation attribute:\n{legacy}"
    );
    assert!(
        legacy.contains(r#"messaging.process.messages [{message}] Counter value=4 messaging.destination.name="orders" messaging.operation="deliver" messaging.system="mqtrace""#),
        "{legacy}"
    );
    let dup = run(Conventions::Dup).await;
    let dup_names = names(&dup);
    for name in [
        "messaging.client.consumed.messages",
        "messaging.client.operation.duration",
        "messaging.client.sent.messages",
        "messaging.process.messages",
        "messaging.publish.duration",
        "messaging.publish.messages",
    ] {
        assert!(dup_names.contains(&name), "{name} missing:\n{dup}");
    }
    assert!(
        dup.contains(r#"messaging.client.sent.messages [{message}] Counter value=4 messaging.destination.name="orders" messaging.operation="publish" messaging.operation.name="send" messaging.operation.type="send" messaging.system="mqtrace" messaging.system.name="mqtrace""#),
        "{dup}"
    );
}

/// A delivery received under a receive span and marked so
/// (`Inbound::counted_at_receive`): the receive counts it as consumed, with its
/// own operation name, and processing does not count it again; v1.24's names
/// count it at both, `messaging.receive.messages` and `messaging.process.messages`,
/// as that version had them. Under dup both sets, each as its version says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_span_counts_its_messages_as_consumed_once() {
    use mqtrace::{Inbound, MessageDescription, MessagingSystem, OperationType};
    struct Received(mqtrace::embedded::Delivery);
    impl Inbound for Received {
        fn description(&self) -> MessageDescription {
            self.0.description()
        }
        fn headers(&self) -> impl opentelemetry::propagation::Extractor + '_ {
            self.0.headers()
        }
        fn body(&self) -> &[u8] {
            self.0.body()
        }
        fn counted_at_receive(&self) -> bool {
            true
        }
    }
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b.conventions(Conventions::Dup));
    let broker = broker_with(&[("orders", None)]);
    broker.publish("orders", Message::new("one")).unwrap();
    let delivery = Received(broker.receive("orders").await.unwrap());
    let d = MessageDescription::new(MessagingSystem::Embedded, OperationType::Receive)
        .destination("orders");
    instrumenter
        .start_receive(&d, std::slice::from_ref(&delivery))
        .end();
    let processed = instrumenter.process(&delivery, async { Ok(()) }).await;
    let _ = processed.finish(mqtrace::Disposition::Settle);
    assert_tree(
        &h.metrics(
            &[
                "messaging.client.consumed.messages",
                "messaging.receive.messages",
                "messaging.process.messages",
            ],
            &[],
        )
        .await,
        r#"
        messaging.client.consumed.messages [{message}] Counter value=1 messaging.destination.name="orders" messaging.operation="receive" messaging.operation.name="receive" messaging.operation.type="receive" messaging.system="mqtrace" messaging.system.name="mqtrace"
        messaging.process.messages [{message}] Counter value=1 messaging.destination.name="orders" messaging.operation="deliver" messaging.operation.name="process" messaging.operation.type="process" messaging.system="mqtrace" messaging.system.name="mqtrace"
        messaging.receive.messages [{message}] Counter value=1 messaging.destination.name="orders" messaging.operation="receive" messaging.operation.name="receive" messaging.operation.type="receive" messaging.system="mqtrace" messaging.system.name="mqtrace"
        "#,
    );
}

/// A measured span and its measurement come from the same clock readings: the
/// send, process and settle spans last exactly what their duration metrics
/// recorded (separate readings would differ by at least a clock read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_their_durations_share_clock_readings() {
    use mqtrace_testing::MetricValue;

    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let broker = broker_with(&[("orders", None)]);
    TracedProducer::new(broker.clone(), instrumenter.clone())
        .send("orders", Message::new("one"))
        .await
        .unwrap();
    TracedConsumer::new(broker.clone(), "orders", instrumenter)
        .settle_spans(true)
        .process_next(|_| async {
            tokio::time::sleep(std::time::Duration::from_millis(3)).await;
            Ok(())
        })
        .await
        .unwrap();
    let spans = h.spans(3).await;
    let _ = h.metrics(&[], &[]).await;
    let metrics = h.collector.metrics();
    let recorded = |name: &str, operation: &str| -> f64 {
        let found: Vec<_> = metrics
            .iter()
            .filter(|m| {
                m.name == name
                    && m.attributes
                        .get("messaging.operation.name")
                        .and_then(|v| v.as_str())
                        == Some(operation)
            })
            .collect();
        match &found[..] {
            [m] => match m.value {
                MetricValue::Histogram { count: 1, sum, .. } => sum,
                ref other => panic!("{name} {operation}: {other:?}"),
            },
            _ => panic!("{name} {operation}: {found:?}"),
        }
    };
    for (span, metric, operation) in [
        ("send orders", "messaging.client.operation.duration", "send"),
        ("process orders", "messaging.process.duration", "process"),
        ("ack orders", "messaging.client.operation.duration", "ack"),
    ] {
        let s = spans
            .iter()
            .find(|s| s.name == span)
            .unwrap_or_else(|| panic!("no span {span}: {spans:#?}"));
        let lasted = (s.end_unix_nano - s.start_unix_nano) as f64 / 1e9;
        let measured = recorded(metric, operation);
        assert!(
            (lasted - measured).abs() < 1e-9,
            "{span}: the span lasted {lasted} s, its metric says {measured} s"
        );
    }
}
