//! Send then receive and process: span trees under each conventions setting,
//! FIFO groups, and the 10-attribute limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName};
use mqtrace::{Conventions, HandlerResult};
use mqtrace_aws_sqs::{TracedConsumer, TracedSqs};
use opentelemetry::trace::{
    FutureExt as _, Span as _, SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer, TracerProvider,
};
use opentelemetry::Context;

use crate::helpers::{assert_tree, normalised, when_count, within, Harness};

async fn order_flow(conventions: Conventions) -> String {
    let h = Harness::start().await;
    let url = h.queue("orders", &[]).await;
    let instrumenter = h.instrumenter(|b| b.conventions(conventions));
    let sqs = TracedSqs::new(h.client.clone(), instrumenter.clone());
    sqs.send(
        h.client
            .send_message()
            .queue_url(&url)
            .message_body(r#"{"order":7}"#),
    )
    .await
    .unwrap();
    let tracer = h.guard.provider().unwrap().tracer("billing");
    let seen = Arc::new(AtomicUsize::new(0));
    let handled = Arc::clone(&seen);
    let stats = within(
        30,
        TracedConsumer::new(h.client.clone(), &url, &instrumenter)
            .wait_time_seconds(1)
            .run_until(
                move |message| {
                    let (tracer, seen) = (tracer.clone(), Arc::clone(&handled));
                    async move {
                        let order: serde_json::Value = message.json()?;
                        assert_eq!(order["order"], 7);
                        tracer.start("charge card").end();
                        seen.fetch_add(1, Ordering::SeqCst);
                        HandlerResult::Ok(())
                    }
                },
                when_count(&seen, 1),
            ),
    )
    .await
    .unwrap();
    assert_eq!(stats.settled, 1);
    assert!(h.drain(&url).await.is_empty(), "deleted");
    h.render(4, normalised()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_then_process_is_one_trace() {
    assert_tree(
        &order_flow(Conventions::V1_45).await,
        r#"
        trace #1
        send orders-RUN [PRODUCER] aws.sqs.queue.url=* messaging.destination.name="orders-RUN" messaging.message.id=* messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="aws.sqs" server.address="127.0.0.1" server.port=*
            process orders-RUN [CONSUMER] aws.sqs.queue.url=* messaging.destination.name="orders-RUN" messaging.message.id=* messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="aws.sqs" mqtrace.aws_sqs.receive_count=1 mqtrace.message.attempt=1 mqtrace.message.disposition="settled" mqtrace.message.queue_time=* server.address="127.0.0.1" server.port=*
                ~> send orders-RUN (this trace)
                charge card [INTERNAL]
        trace #2
        receive orders-RUN [CLIENT] aws.sqs.queue.url=* messaging.batch.message_count=1 messaging.destination.name="orders-RUN" messaging.operation.name="receive" messaging.operation.type="receive" messaging.system.name="aws.sqs" server.address="127.0.0.1" server.port=*
            ~> send orders-RUN (trace #1) messaging.message.id=*
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_and_dup_conventions() {
    let only = |tree: String| {
        tree.lines()
            .filter(|l| !l.trim_start().starts_with("~>"))
            .map(|l| l.split(" aws.sqs").next().unwrap_or(l).to_owned() + "\n")
            .collect::<String>()
    };
    assert_tree(
        &only(order_flow(Conventions::Legacy).await),
        r#"
        trace #1
        orders-RUN publish [PRODUCER]
            orders-RUN deliver [CONSUMER]
                charge card [INTERNAL]
        trace #2
        orders-RUN receive [CLIENT]
        "#,
    );
    let both = order_flow(Conventions::Dup).await;
    assert!(both.contains(r#"send orders-RUN [PRODUCER] aws.sqs.queue.url=* messaging.destination.name="orders-RUN" messaging.message.id=* messaging.operation="publish" messaging.operation.name="send" messaging.operation.type="send" messaging.system="aws_sqs" messaging.system.name="aws.sqs" server.address="127.0.0.1" server.port=*"#), "{both}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_groups_are_recorded_and_kept_in_order() {
    let h = Harness::start().await;
    let url = h
        .queue(
            "orders.fifo",
            &[
                (QueueAttributeName::FifoQueue, "true".into()),
                (QueueAttributeName::ContentBasedDeduplication, "true".into()),
            ],
        )
        .await;
    let instrumenter = h.instrumenter(|b| b);
    let sqs = TracedSqs::new(h.client.clone(), instrumenter.clone());
    for i in 0..6 {
        let group = if i % 2 == 0 { "even" } else { "odd" };
        sqs.send(
            h.client
                .send_message()
                .queue_url(&url)
                .message_group_id(group)
                .message_body(i.to_string()),
        )
        .await
        .unwrap();
    }
    let order = Arc::new(Mutex::new(HashMap::<String, Vec<u32>>::new()));
    let seen = Arc::new(AtomicUsize::new(0));
    let (recorded, handled) = (Arc::clone(&order), Arc::clone(&seen));
    within(
        30,
        TracedConsumer::new(h.client.clone(), &url, &instrumenter)
            .wait_time_seconds(1)
            .run_until(
                move |m| {
                    let (recorded, handled) = (Arc::clone(&recorded), Arc::clone(&handled));
                    async move {
                        let group = m
                            .system_attribute(&MessageSystemAttributeName::MessageGroupId)
                            .unwrap()
                            .to_owned();
                        // Later messages of a group would overtake a slow first one
                        // if groups were not kept in order.
                        let i: u32 = m.body().parse().unwrap();
                        if i < 2 {
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                        recorded.lock().unwrap().entry(group).or_default().push(i);
                        handled.fetch_add(1, Ordering::SeqCst);
                        HandlerResult::Ok(())
                    }
                },
                when_count(&seen, 6),
            ),
    )
    .await
    .unwrap();
    let order = order.lock().unwrap().clone();
    assert_eq!(order["even"], [0, 2, 4]);
    assert_eq!(order["odd"], [1, 3, 5]);
    let spans = h.spans(6 + 6 + h_receives(&h).await).await;
    // The group on every send and process span. The emulator returns no
    // sequence numbers (real SQS does); the unit tests cover recording them.
    let grouped = spans
        .iter()
        .filter(|s| s.name.starts_with("send") || s.name.starts_with("process"))
        .all(|s| s.attr(mqtrace_aws_sqs::MESSAGE_GROUP_ID).is_some());
    assert!(grouped, "{spans:#?}");
}

/// The receive spans so far (one per non-empty poll; how many polls is up to SQS).
async fn h_receives(h: &Harness) -> usize {
    let provider = h.guard.provider().unwrap().clone();
    tokio::task::spawn_blocking(move || provider.force_flush())
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    h.collector
        .spans()
        .iter()
        .filter(|s| s.name.starts_with("receive"))
        .count()
}

fn user_attributes(n: usize) -> HashMap<String, MessageAttributeValue> {
    (0..n)
        .map(|i| {
            (
                format!("user-{i}"),
                MessageAttributeValue::builder()
                    .data_type("String")
                    .string_value(format!("v{i}"))
                    .build()
                    .unwrap(),
            )
        })
        .collect()
}

/// Sends with `n` user attributes inside a parent that has a `tracestate`, so W3C
/// needs two attributes; returns what arrived and whether the consumer linked it.
async fn send_with_user_attributes(n: usize) -> (Vec<String>, bool, bool) {
    let h = Harness::start().await;
    let url = h.queue("limits", &[]).await;
    let instrumenter = h.instrumenter(|b| b);
    let sqs = TracedSqs::new(h.client.clone(), instrumenter.clone());
    let parent = SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        true,
        TraceState::from_key_value([("vendor", "x")]).unwrap(),
    );
    let cx = Context::new().with_remote_span_context(parent);
    let sent = sqs
        .send(
            h.client
                .send_message()
                .queue_url(&url)
                .message_body("hello")
                .set_message_attributes(Some(user_attributes(n))),
        )
        .with_context(cx)
        .await;
    assert!(
        sent.is_ok(),
        "the send never fails because of tracing: {sent:?}"
    );
    let got = h.drain(&url).await;
    assert_eq!(got.len(), 1);
    let m = &got[0];
    let mut keys: Vec<String> = m
        .message_attributes()
        .map(|a| a.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    let trace_header = m
        .attributes()
        .and_then(|a| a.get(&MessageSystemAttributeName::AwsTraceHeader))
        .is_some_and(|v| v.contains("Root=1-4bf92f35-77b34da6a3ce929d0e0e4736"));
    // The consumer side: the producer's trace is found either way.
    let cx = mqtrace_aws_sqs::trace_context(m, instrumenter.propagation());
    let linked = cx.span().span_context().trace_id()
        == TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
    (keys, trace_header, linked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nine_user_attributes_leave_no_room_for_w3c_with_tracestate() {
    let (keys, trace_header, linked) = send_with_user_attributes(9).await;
    assert_eq!(keys.len(), 9, "no partial W3C set: {keys:?}");
    assert!(keys.iter().all(|k| k.starts_with("user-")), "{keys:?}");
    assert!(trace_header, "AWSTraceHeader carries the context");
    assert!(linked, "the consumer finds it through AWSTraceHeader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_user_attributes_likewise() {
    let (keys, trace_header, linked) = send_with_user_attributes(10).await;
    assert_eq!(keys.len(), 10, "{keys:?}");
    assert!(trace_header && linked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_user_attributes_leave_room_for_w3c() {
    let (keys, trace_header, linked) = send_with_user_attributes(8).await;
    assert_eq!(keys.len(), 10, "{keys:?}");
    assert!(keys.contains(&"traceparent".to_owned()) && keys.contains(&"tracestate".to_owned()));
    assert!(trace_header && linked);
}

/// Each propagation choice writes where it says, and only there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propagation_choices_write_where_they_say() {
    use mqtrace_aws_sqs::SqsPropagation;
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    for (mode, attributes, header) in [
        (SqsPropagation::MessageAttributes, true, false),
        (SqsPropagation::AwsTraceHeader, false, true),
        (SqsPropagation::Both, true, true),
    ] {
        let url = h.queue(&format!("mode-{mode:?}").to_lowercase(), &[]).await;
        TracedSqs::new(h.client.clone(), instrumenter.clone())
            .propagation(mode)
            .send(h.client.send_message().queue_url(&url).message_body("x"))
            .await
            .unwrap();
        let got = h.drain(&url).await;
        let m = &got[0];
        let has_traceparent = m
            .message_attributes()
            .is_some_and(|a| a.contains_key("traceparent"));
        let has_header = m
            .attributes()
            .is_some_and(|a| a.contains_key(&MessageSystemAttributeName::AwsTraceHeader));
        assert_eq!(
            (has_traceparent, has_header),
            (attributes, header),
            "{mode:?}"
        );
        // Either way the consumer finds the producer.
        let cx = mqtrace_aws_sqs::trace_context(m, instrumenter.propagation());
        assert!(cx.span().span_context().is_valid(), "{mode:?}");
    }
}

/// The consumer's loop can be spawned on tokio (its future is `Send`).
#[test]
fn the_consumer_loop_is_send() {
    fn spawnable<T: Send + 'static>(_: T) {}
    let consumer = TracedConsumer::new(
        crate::helpers::client("http://127.0.0.1:1"),
        "http://127.0.0.1:1/1/q",
        &mqtrace::Instrumenter::default(),
    );
    spawnable(async move {
        consumer
            .run_until(|_| async { HandlerResult::Ok(()) }, async {})
            .await
    });
}

/// Asked for, the consumer reads the queue's depth beside its receives: three
/// messages waiting show as visible or in flight (SQS's approximate counts), none
/// delayed; once all are deleted, none at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_depth_is_a_gauge_when_asked() {
    let h = Harness::start().await;
    let url = h.queue("depth", &[]).await;
    let instrumenter = h.instrumenter(|b| b);
    let producer = TracedSqs::new(h.client.clone(), instrumenter.clone());
    for i in 0..3 {
        producer
            .send(
                h.client
                    .send_message()
                    .queue_url(&url)
                    .message_body(format!("{i}")),
            )
            .await
            .unwrap();
    }
    let seen = Arc::new(AtomicUsize::new(0));
    let handled = Arc::clone(&seen);
    let first_reading = Arc::new(tokio::sync::Mutex::new(String::new()));
    let reading = Arc::clone(&first_reading);
    let h = &h;
    within(
        60,
        TracedConsumer::new(h.client.clone(), &url, &instrumenter)
            .wait_time_seconds(1)
            .queue_depth_every(std::time::Duration::from_millis(200))
            .run_until(
                move |_| {
                    let (seen, reading) = (Arc::clone(&handled), Arc::clone(&reading));
                    async move {
                        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                            // The first reading, taken as the consumer started,
                            // before anything was deleted.
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                            *reading.lock().await =
                                h.metrics(&[mqtrace_aws_sqs::QUEUE_MESSAGES], &[]).await;
                        }
                        HandlerResult::Ok(())
                    }
                },
                async {
                    when_count(&seen, 3).await;
                    // Long enough for a reading after the last delete.
                    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
                },
            ),
    )
    .await
    .unwrap();
    let value = |rendered: &str, state: &str| -> i64 {
        let line = rendered
            .lines()
            .find(|l| l.contains(&format!(r#"mqtrace.aws_sqs.queue.state="{state}""#)))
            .unwrap_or_else(|| panic!("{state} missing:\n{rendered}"));
        assert!(
            line.starts_with("mqtrace.aws_sqs.queue.messages [{message}] Gauge value=")
                && line.contains(r#"messaging.destination.name="depth-RUN""#)
                && line.contains(r#"messaging.system.name="aws.sqs""#),
            "{line}"
        );
        line.split("value=")
            .nth(1)
            .and_then(|v| v.split(' ').next())
            .unwrap()
            .parse()
            .unwrap()
    };
    let first = first_reading.lock().await.clone();
    assert_eq!(
        value(&first, "visible") + value(&first, "in_flight"),
        3,
        "{first}"
    );
    assert_eq!(value(&first, "delayed"), 0, "{first}");
    let last = h.metrics(&[mqtrace_aws_sqs::QUEUE_MESSAGES], &[]).await;
    for state in ["visible", "in_flight", "delayed"] {
        assert_eq!(value(&last, state), 0, "{last}");
    }
}

/// With the instrumenter's metrics off, the queue depth asked for with
/// `queue_depth_every` is off too: no gauge reaches the collector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_off_turns_the_queue_depth_off() {
    let h = Harness::start().await;
    let url = h.queue("depth-off", &[]).await;
    let instrumenter = h.instrumenter(|b| b.metrics(false));
    h.send_numbered(&url, 2, &instrumenter).await;
    let seen = Arc::new(AtomicUsize::new(0));
    let handled = Arc::clone(&seen);
    within(
        60,
        TracedConsumer::new(h.client.clone(), &url, &instrumenter)
            .wait_time_seconds(1)
            .queue_depth_every(std::time::Duration::from_millis(100))
            .run_until(
                move |_| {
                    handled.fetch_add(1, Ordering::SeqCst);
                    async { HandlerResult::Ok(()) }
                },
                async {
                    when_count(&seen, 2).await;
                    // Several readings' time, were there readings.
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                },
            ),
    )
    .await
    .unwrap();
    let depth = h.metrics(&[mqtrace_aws_sqs::QUEUE_MESSAGES], &[]).await;
    assert_eq!(depth.trim(), "", "{depth}");
}
