//! Produce then consume: span trees under each conventions setting and parenting
//! mode; records without or with damaged trace headers; consumer lag.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mqtrace::{Conventions, HandlerResult, ProcessParenting};
use mqtrace_testing::TreeOptions;
use opentelemetry::trace::{Span as _, Tracer, TracerProvider};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use crate::helpers::{
    assert_lag_of_five, assert_tree, normalised, send_numbered, when_count, within, Harness,
};

/// Produces one order, consumes it with a handler that makes a child span, and
/// renders the trace.
async fn order_flow(
    conventions: Conventions,
    parenting: ProcessParenting,
    commit_spans: bool,
) -> String {
    let h = Harness::start().await;
    let topic = h.name("orders");
    h.topics(&[&topic]).await;
    let instrumenter = h.instrumenter(|b| b.conventions(conventions).parenting(parenting));
    let delivery = h
        .producer(&instrumenter)
        .send(
            FutureRecord::to(&topic)
                .key("order-7")
                .payload(r#"{"order":7}"#),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!((delivery.partition, delivery.offset), (0, 0));

    let tracer = h.guard.provider().unwrap().tracer("billing");
    let seen = Arc::new(AtomicUsize::new(0));
    let handled = Arc::clone(&seen);
    let stats = within(
        60,
        h.consumer(&[&topic], &instrumenter)
            .settle_spans(commit_spans)
            .run_until(
                move |record| {
                    let tracer = tracer.clone();
                    let seen = Arc::clone(&handled);
                    async move {
                        let order: serde_json::Value = record.json()?;
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
    h.render(if commit_spans { 4 } else { 3 }, normalised())
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_then_consume_is_one_trace() {
    assert_tree(
        &order_flow(Conventions::V1_45, ProcessParenting::ParentAndLink, true).await,
        r#"
        trace #1
        send orders-RUN [PRODUCER] kafka.message.key="order-7" kafka.offset=0 messaging.client.id="mqtrace-test" messaging.destination.name="orders-RUN" messaging.destination.partition.id="0" messaging.operation.name="send" messaging.operation.type="send" messaging.system.name="kafka" server.address="127.0.0.1" server.port=*
            process orders-RUN [CONSUMER] kafka.message.key="order-7" kafka.offset=0 messaging.client.id="mqtrace-test" messaging.consumer.group.name="group-RUN" messaging.destination.name="orders-RUN" messaging.destination.partition.id="0" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="kafka" mqtrace.message.attempt=1 mqtrace.message.disposition="settled" mqtrace.message.queue_time=* server.address="127.0.0.1" server.port=*
                ~> send orders-RUN (this trace)
                charge card [INTERNAL]
                commit orders-RUN [CLIENT] kafka.message.key="order-7" kafka.offset=0 messaging.client.id="mqtrace-test" messaging.consumer.group.name="group-RUN" messaging.destination.name="orders-RUN" messaging.destination.partition.id="0" messaging.operation.name="commit" messaging.operation.type="settle" messaging.system.name="kafka" server.address="127.0.0.1" server.port=*
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_conventions() {
    assert_tree(
        &order_flow(Conventions::Legacy, ProcessParenting::ParentAndLink, false).await,
        r#"
        trace #1
        orders-RUN publish [PRODUCER] messaging.client_id="mqtrace-test" messaging.destination.name="orders-RUN" messaging.kafka.destination.partition=0 messaging.kafka.message.key="order-7" messaging.kafka.message.offset=0 messaging.operation="publish" messaging.system="kafka" server.address="127.0.0.1" server.port=*
            orders-RUN deliver [CONSUMER] messaging.client_id="mqtrace-test" messaging.destination.name="orders-RUN" messaging.kafka.consumer.group="group-RUN" messaging.kafka.destination.partition=0 messaging.kafka.message.key="order-7" messaging.kafka.message.offset=0 messaging.operation="deliver" messaging.system="kafka" mqtrace.message.attempt=1 mqtrace.message.disposition="settled" mqtrace.message.queue_time=* server.address="127.0.0.1" server.port=*
                ~> orders-RUN publish (this trace)
                charge card [INTERNAL]
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dup_conventions() {
    assert_tree(
        &order_flow(Conventions::Dup, ProcessParenting::ParentAndLink, false).await,
        r#"
        trace #1
        send orders-RUN [PRODUCER] kafka.message.key="order-7" kafka.offset=0 messaging.client.id="mqtrace-test" messaging.client_id="mqtrace-test" messaging.destination.name="orders-RUN" messaging.destination.partition.id="0" messaging.kafka.destination.partition=0 messaging.kafka.message.key="order-7" messaging.kafka.message.offset=0 messaging.operation="publish" messaging.operation.name="send" messaging.operation.type="send" messaging.system="kafka" messaging.system.name="kafka" server.address="127.0.0.1" server.port=*
            process orders-RUN [CONSUMER] kafka.message.key="order-7" kafka.offset=0 messaging.client.id="mqtrace-test" messaging.client_id="mqtrace-test" messaging.consumer.group.name="group-RUN" messaging.destination.name="orders-RUN" messaging.destination.partition.id="0" messaging.kafka.consumer.group="group-RUN" messaging.kafka.destination.partition=0 messaging.kafka.message.key="order-7" messaging.kafka.message.offset=0 messaging.operation="deliver" messaging.operation.name="process" messaging.operation.type="process" messaging.system="kafka" messaging.system.name="kafka" mqtrace.message.attempt=1 mqtrace.message.disposition="settled" mqtrace.message.queue_time=* server.address="127.0.0.1" server.port=*
                ~> send orders-RUN (this trace)
                charge card [INTERNAL]
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_only_starts_a_new_trace() {
    let tree = order_flow(Conventions::V1_45, ProcessParenting::LinkOnly, false).await;
    assert_tree(
        &tree
            .lines()
            .map(|l| l.split(" [").next().unwrap_or(l).to_owned() + "\n")
            .collect::<String>(),
        r#"
        trace #1
        send orders-RUN
        trace #2
        process orders-RUN
            ~> send orders-RUN (trace #1)
            charge card
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_only_has_no_link() {
    let tree = order_flow(Conventions::V1_45, ProcessParenting::ParentOnly, false).await;
    assert_tree(
        &tree
            .lines()
            .map(|l| l.split(" [").next().unwrap_or(l).to_owned() + "\n")
            .collect::<String>(),
        r#"
        trace #1
        send orders-RUN
            process orders-RUN
                charge card
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_malformed_trace_headers_start_new_roots() {
    let h = Harness::start().await;
    let topic = h.name("plain");
    h.topics(&[&topic]).await;
    let instrumenter = h.instrumenter(|b| b);
    // A producer outside mqtrace: plain rdkafka.
    let plain: rdkafka::producer::FutureProducer = h.config().create().unwrap();
    let malformed = OwnedHeaders::new().insert(Header {
        key: "traceparent",
        value: Some("00-not-a-trace-01"),
    });
    for record in [
        FutureRecord::<str, str>::to(&topic).payload("no headers"),
        FutureRecord::to(&topic)
            .payload("bad header")
            .headers(malformed),
    ] {
        plain.send(record, Duration::from_secs(10)).await.unwrap();
    }
    let offsets = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(AtomicUsize::new(0));
    let (handled, recorded) = (Arc::clone(&seen), Arc::clone(&offsets));
    let stats = within(
        60,
        h.consumer(&[&topic], &instrumenter).run_until(
            move |record| {
                let (seen, offsets) = (Arc::clone(&handled), Arc::clone(&recorded));
                async move {
                    offsets.lock().unwrap().push(record.offset());
                    seen.fetch_add(1, Ordering::SeqCst);
                    HandlerResult::Ok(())
                }
            },
            when_count(&seen, 2),
        ),
    )
    .await
    .unwrap();
    assert_eq!(stats.settled, 2);
    assert_eq!(*offsets.lock().unwrap(), [0, 1]);
    assert_tree(
        &h.render(2, TreeOptions::only(&["kafka.offset"])).await,
        r#"
        trace #1
        process plain-RUN [CONSUMER] kafka.offset=0
        trace #2
        process plain-RUN [CONSUMER] kafka.offset=1
        "#,
    );
}

/// Five records through the full consumer, statistics every 100 ms and the
/// first record held long enough for them to arrive; checks the lag on the
/// process spans and returns librdkafka's statistics and the lag as gauges, as
/// the collector received them.
async fn lag_run(metrics: bool) -> String {
    let h = Harness::start().await;
    let topic = h.name("lag");
    h.topics(&[&topic]).await;
    let instrumenter = h.instrumenter(|b| b.metrics(metrics));
    let producer = h.producer(&instrumenter);
    send_numbered(&producer, &topic, 5).await;
    let mut config = h.consumer_config();
    config.set("statistics.interval.ms", "100");
    let consumer = mqtrace_rdkafka::TracedConsumer::from_config(
        &config,
        &[&topic],
        producer,
        instrumenter.clone(),
    )
    .unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let handled = Arc::clone(&seen);
    within(
        60,
        consumer.run_until(
            move |record| {
                let seen = Arc::clone(&handled);
                async move {
                    // Long enough on the first record for statistics to arrive.
                    if record.offset() == 0 {
                        tokio::time::sleep(Duration::from_millis(600)).await;
                    }
                    seen.fetch_add(1, Ordering::SeqCst);
                    HandlerResult::Ok(())
                }
            },
            when_count(&seen, 5),
        ),
    )
    .await
    .unwrap();
    assert_lag_of_five(&h.spans(10).await);
    h.metrics(
        &[
            mqtrace_rdkafka::FETCH_QUEUE,
            mqtrace_rdkafka::BROKER_RTT_AVERAGE,
            mqtrace_rdkafka::BROKER_RTT_P99,
            mqtrace_rdkafka::CONSUMER_LAG,
        ],
        &[mqtrace_rdkafka::BROKER],
    )
    .await
}

/// With the instrumenter's metrics off, the Kafka gauges are off too: the lag
/// stays on the process spans, and the collector receives none of librdkafka's
/// statistics nor the lag gauge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_off_turns_the_kafka_gauges_off() {
    let gauges = lag_run(false).await;
    assert_eq!(gauges.trim(), "", "{gauges}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_comes_from_the_statistics() {
    let gauges = lag_run(true).await;
    let lines: Vec<&str> = gauges.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("mqtrace.kafka.consumer.lag [{message}] Gauge value=")),
        "{gauges}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("mqtrace.kafka.partition.fetch_queue.messages [{message}] Gauge value=")
            && l.ends_with(r#"messaging.destination.name="lag-RUN" messaging.destination.partition.id="0" messaging.system.name="kafka""#)),
        "{gauges}"
    );
    for name in [
        "mqtrace.kafka.broker.rtt.average",
        "mqtrace.kafka.broker.rtt.p99",
    ] {
        let rtt = lines
            .iter()
            .find(|l| l.starts_with(&format!("{name} [s] Gauge value=")))
            .unwrap_or_else(|| panic!("{name} missing:\n{gauges}"));
        let value: f64 = rtt
            .split("value=")
            .nth(1)
            .and_then(|v| v.split(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!(value > 0.0 && value < 5.0, "{rtt}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extension_traits_carry_the_context_through_plain_rdkafka() {
    use mqtrace::Propagation;
    use mqtrace_rdkafka::{FutureRecordExt as _, MessageExt as _};
    use opentelemetry::trace::TraceContextExt as _;
    use opentelemetry::Context;
    use rdkafka::consumer::{Consumer as _, StreamConsumer};

    let h = Harness::start().await;
    let topic = h.name("plain-ext");
    h.topics(&[&topic]).await;
    let tracer = h.guard.provider().unwrap().tracer("app");
    let propagation = Propagation::default();
    let producer: rdkafka::producer::FutureProducer = h.config().create().unwrap();
    let span = tracer.start("publish order");
    let sent = span.span_context().clone();
    let cx = Context::current_with_span(span);
    let record = FutureRecord::<str, str>::to(&topic)
        .payload("{}")
        .with_trace_context(&propagation, &cx);
    producer
        .send(record, Duration::from_secs(10))
        .await
        .unwrap();
    cx.span().end();

    let consumer: StreamConsumer = h.consumer_config().create().unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let message = within(60, consumer.recv()).await.unwrap();
    let remote = message.trace_context(&propagation);
    assert_eq!(remote.span().span_context().trace_id(), sent.trace_id());
    assert_eq!(remote.span().span_context().span_id(), sent.span_id());
    // The owned form reads the same.
    let owned = message.detach();
    assert_eq!(
        owned.trace_context(&propagation).span().span_context(),
        remote.span().span_context()
    );
    tracer.start_with_context("handle order", &remote).end();
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
async fn poll_spans_link_the_record_when_asked() {
    let h = Harness::start().await;
    let topic = h.name("polled");
    h.topics(&[&topic]).await;
    let instrumenter = h.instrumenter(|b| b);
    h.producer(&instrumenter)
        .send(
            FutureRecord::<str, str>::to(&topic)
                .payload("x")
                .key("order-7"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let handled = Arc::clone(&seen);
    within(
        60,
        h.consumer(&[&topic], &instrumenter)
            .receive_spans(true)
            .run_until(
                move |_| {
                    handled.fetch_add(1, Ordering::SeqCst);
                    async { HandlerResult::Ok(()) }
                },
                when_count(&seen, 1),
            ),
    )
    .await
    .unwrap();
    let spans = h.spans(3).await;
    // The poll span covers the poll: it starts before the record is in hand (here
    // the first poll also joins the group) and ends before processing starts.
    let (poll, process) = (
        spans.iter().find(|s| s.name.starts_with("poll")).unwrap(),
        spans
            .iter()
            .find(|s| s.name.starts_with("process"))
            .unwrap(),
    );
    assert!(poll.end_unix_nano > poll.start_unix_nano, "{poll:?}");
    assert!(poll.end_unix_nano <= process.start_unix_nano);
    assert_tree(
        &mqtrace_testing::Forest::new(spans)
            .render(&TreeOptions::only(&[
                "kafka.message.key",
                "kafka.offset",
                "messaging.consumer.group.name",
                "messaging.destination.partition.id",
                "messaging.operation.name",
                "messaging.operation.type",
            ]))
            .replace(&h.name(""), "-RUN"),
        r#"
        trace #1
        send polled-RUN [PRODUCER] kafka.message.key="order-7" kafka.offset=0 messaging.destination.partition.id="0" messaging.operation.name="send" messaging.operation.type="send"
            process polled-RUN [CONSUMER] kafka.message.key="order-7" kafka.offset=0 messaging.consumer.group.name="group-RUN" messaging.destination.partition.id="0" messaging.operation.name="process" messaging.operation.type="process"
                ~> send polled-RUN (this trace)
        trace #2
        poll polled-RUN [CLIENT] kafka.message.key="order-7" kafka.offset=0 messaging.consumer.group.name="group-RUN" messaging.destination.partition.id="0" messaging.operation.name="poll" messaging.operation.type="receive"
            ~> send polled-RUN (trace #1)
        "#,
    );
    // The record is counted as consumed once, by its poll, not again at processing.
    assert_tree(
        &h.metrics(&["messaging.client.consumed.messages"], &["server.port"])
            .await,
        r#"
        messaging.client.consumed.messages [{message}] Counter value=1 messaging.consumer.group.name="group-RUN" messaging.destination.name="polled-RUN" messaging.destination.partition.id="0" messaging.operation.name="poll" messaging.operation.type="receive" messaging.system.name="kafka" server.address="127.0.0.1"
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_delivery_marks_the_send_span_and_returns_rdkafkas_error() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let mut config = h.config();
    // The broker does not create topics: this one never becomes deliverable.
    config.set("message.timeout.ms", "1500");
    let producer = mqtrace_rdkafka::TracedProducer::from_config(&config, instrumenter).unwrap();
    let missing = h.name("missing");
    let result = producer
        .send(
            FutureRecord::<str, str>::to(&missing).payload("x"),
            Duration::from_secs(5),
        )
        .await;
    let (error, _) = result.expect_err("no such topic");
    let code = error.rdkafka_error_code().map(|c| format!("{c:?}"));
    let spans = h.spans(1).await;
    assert!(matches!(
        spans[0].status,
        mqtrace_testing::SpanStatus::Error(_)
    ));
    assert_eq!(
        spans[0]
            .attr("error.type")
            .and_then(|v| v.as_str())
            .map(str::to_owned),
        code,
        "error.type is the Kafka error code"
    );
}

/// The consumer's loop can be spawned on tokio (its future is `Send`).
#[tokio::test]
async fn the_consumer_loop_is_send() {
    fn spawnable<T: Send + 'static>(_: T) {}
    let mut config = rdkafka::ClientConfig::new();
    config
        .set("bootstrap.servers", "127.0.0.1:1")
        .set("group.id", "g");
    let instrumenter = mqtrace::Instrumenter::default();
    let producer =
        mqtrace_rdkafka::TracedProducer::from_config(&config, instrumenter.clone()).unwrap();
    let consumer =
        mqtrace_rdkafka::TracedConsumer::from_config(&config, &["t"], producer, instrumenter)
            .unwrap();
    spawnable(async move {
        consumer
            .run_until(|_| async { HandlerResult::Ok(()) }, async {})
            .await
    });
}

/// A record that already carries a `traceparent` (injected by the application
/// with `FutureRecordExt`, say) leaves with exactly one: the send span's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_context_is_replaced_not_doubled() {
    use rdkafka::consumer::{Consumer as _, StreamConsumer};
    use rdkafka::message::{Headers as _, Message as _};
    let h = Harness::start().await;
    let topic = h.name("one-context");
    h.topics(&[&topic]).await;
    let instrumenter = h.instrumenter(|b| b);
    let stale = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    h.producer(&instrumenter)
        .send(
            FutureRecord::<str, str>::to(&topic)
                .payload("{}")
                .headers(OwnedHeaders::new().insert(Header {
                    key: "traceparent",
                    value: Some(stale),
                })),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let consumer: StreamConsumer = h.consumer_config().create().unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let record = within(30, consumer.recv()).await.unwrap();
    let headers = record.headers().unwrap();
    let contexts: Vec<&str> = headers
        .iter()
        .filter(|h| h.key.eq_ignore_ascii_case("traceparent"))
        .map(|h| std::str::from_utf8(h.value.unwrap()).unwrap())
        .collect();
    assert_eq!(contexts.len(), 1, "{contexts:?}");
    let spans = h.spans(1).await;
    assert_eq!(
        contexts[0],
        format!("00-{}-{}-01", spans[0].trace_id, spans[0].span_id),
        "the send span's context, not the stale one"
    );
}

/// The full consumer coalesces its commits: 300 records settle with a handful of
/// commit requests (librdkafka's, one per 200 ms at most, then the one as the
/// consumer gives its partition up), not one per record, every one answered, and
/// the group's committed offset is past the last record at stop. The stop waits
/// for the cluster to confirm the last commit, which it does: it takes well
/// under the 5 s the consumer gives an answer that does not come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_coalesced_and_none_is_lost() {
    let h = Harness::start_alone().await;
    let topic = h.name("coalesced");
    h.topics(&[&topic]).await;
    let instrumenter = h.instrumenter(|b| b);
    send_numbered(&h.producer(&instrumenter), &topic, 300).await;
    let seen = Arc::new(AtomicUsize::new(0));
    let done = Arc::clone(&seen);
    let consumer = h.consumer(&[&topic], &instrumenter);
    let told = std::sync::Mutex::new(None);
    let started = std::time::Instant::now();
    let stats = within(
        60,
        consumer.run_until(
            move |_| {
                let done = Arc::clone(&done);
                async move {
                    done.fetch_add(1, Ordering::SeqCst);
                    HandlerResult::Ok(())
                }
            },
            async {
                when_count(&seen, 300).await;
                *told.lock().unwrap() = Some(std::time::Instant::now());
            },
        ),
    )
    .await
    .unwrap();
    let took = started.elapsed();
    let stopping = told.lock().unwrap().map(|at| at.elapsed());
    assert!(
        stopping.is_some_and(|t| t < std::time::Duration::from_secs(2)),
        "the consumer took {stopping:?} to stop after the last record"
    );
    assert_eq!((stats.settled, stats.settle_failures), (300, 0));
    let context = rdkafka::consumer::Consumer::context(consumer.inner());
    let commits = context.commits();
    assert_eq!(context.failed_commits(), 0);
    // One per 200 ms of the run at most, and the one on giving the partition up.
    let most = took.as_millis() / 200 + 2;
    assert!(
        (1..=most).contains(&u128::from(commits)) && commits < 50,
        "{commits} commit requests for 300 records in {took:?}"
    );
    assert_eq!(crate::helpers::committed_offset(&h, &topic).await, 300);
}

/// Partitions revoked in a rebalance: the member losing them commits the offsets
/// of the records it settled first, so whoever owns the partition next starts
/// after them and no record is handled twice. Interval commits are off
/// (`auto.commit.interval.ms` an hour), so only the commit on revocation (which
/// librdkafka makes) can carry that progress: without it
/// the next owner starts again from offset 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_commits_the_settled_records_first() {
    const RECORDS: usize = 150;
    let h = Harness::start().await;
    let topic = h.name("rebalanced");
    h.topics(&[&topic]).await;
    let instrumenter = h.instrumenter(|b| b);
    send_numbered(&h.producer(&instrumenter), &topic, RECORDS).await;
    // How often each record was handled, by either member.
    let handled = Arc::new(std::sync::Mutex::new(vec![0u32; RECORDS]));
    let distinct = Arc::new(AtomicUsize::new(0));
    let member = |name: &'static str| {
        let (handled, distinct) = (Arc::clone(&handled), Arc::clone(&distinct));
        move |record: mqtrace_rdkafka::Record| {
            let (handled, distinct) = (Arc::clone(&handled), Arc::clone(&distinct));
            async move {
                let n: usize = record.json()?;
                tokio::time::sleep(std::time::Duration::from_millis(40)).await;
                let mut counts = handled.lock().unwrap();
                if let Some(c) = counts.get_mut(n) {
                    if *c == 0 {
                        distinct.fetch_add(1, Ordering::SeqCst);
                    }
                    *c += 1;
                }
                let _ = name;
                HandlerResult::Ok(())
            }
        }
    };
    let consumer = || {
        let mut config = h.consumer_config();
        config.set("auto.commit.interval.ms", "3600000");
        h.consumer_with(&config, &[&topic], &instrumenter)
    };
    let first = consumer();
    let joined_late = async {
        // The second member joins once the first is well into the partition (made
        // only then: a member that subscribed and does not poll holds up the
        // group's rebalance).
        when_count(&distinct, 5).await;
        let second = consumer();
        second
            .run_until(member("second"), when_count(&distinct, RECORDS))
            .await
    };
    let (a, b) = within(
        90,
        futures_util::future::join(
            first.run_until(member("first"), when_count(&distinct, RECORDS)),
            joined_late,
        ),
    )
    .await;
    let (a, b) = (a.unwrap(), b.unwrap());
    let revoked = rdkafka::consumer::Consumer::context(first.inner()).revocations();
    assert!(
        revoked >= 1,
        "the second member's arrival revoked the first's partition"
    );
    let counts = handled.lock().unwrap().clone();
    println!(
        "kafka rebalance: {RECORDS} records, first member settled {} (revoked {revoked} times), second {}, handled twice {}",
        a.settled,
        b.settled,
        counts.iter().filter(|c| **c > 1).count()
    );
    assert!(
        counts.iter().all(|c| *c == 1),
        "each record handled once across the rebalance: {counts:?}"
    );
    assert_eq!((a.settled + b.settled) as usize, RECORDS);
    assert_eq!(
        crate::helpers::committed_offset(&h, &topic).await,
        RECORDS as i64
    );
}
