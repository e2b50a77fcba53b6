//! Real SQS event JSON through the wrapper: links and parents, partial batch
//! responses, and spans exported before the invocation returns.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::LambdaEvent;
use mqtrace::{HandlerError, HandlerResult, Instrumenter};
use mqtrace_aws_lambda::TracedSqsHandler;
use mqtrace_telemetry::{TelemetryBuilder, TelemetryGuard};
use mqtrace_testing::{assert_tree, Collector, Forest, RecordedSpan, TreeOptions};
use opentelemetry::trace::{Span as _, TraceContextExt as _, Tracer as _, TracerProvider as _};
use opentelemetry_sdk::trace::BatchConfigBuilder;
use tracing::Instrument as _;

mod delivery;

/// The W3C producer in the fixtures, and the X-Ray one (`1-5759e988-bd86…`).
const W3C_A: &str = "0af7651916cd43dd8448eb211c80319c";
const W3C_B: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const XRAY: &str = "5759e988bd862e3fe1be46a994272793";

struct Run {
    failures: Vec<String>,
    /// What the collector had when `handle` returned, before any flush of ours.
    at_return: Vec<RecordedSpan>,
    /// The metric streams the collector had then, rendered.
    metrics_at_return: String,
}

async fn invoke(fixture: &str) -> Run {
    let collector = Collector::start().await.unwrap();
    // A delay far longer than the test: spans arrive only if the wrapper flushes.
    let guard: TelemetryGuard = TelemetryBuilder::default()
        .service_name("orders-lambda")
        .endpoint(collector.grpc_endpoint())
        .install_global(false)
        .batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(Duration::from_secs(600))
                .build(),
        )
        .build()
        .unwrap();
    let provider = guard.provider().unwrap().clone();
    let instrumenter = guard.instrumenter().build();
    let traced = TracedSqsHandler::new(&instrumenter, guard.flusher());
    let event: SqsEvent = serde_json::from_str(fixture).unwrap();
    let mut context = lambda_runtime::Context::default();
    context.request_id = "req-1".into();
    context.invoked_function_arn =
        "arn:aws:lambda:eu-west-1:123456789012:function:orders-lambda".into();
    context.env_config = std::sync::Arc::new(lambda_runtime::Config {
        function_name: "orders-lambda".into(),
        ..Default::default()
    });
    let tracer = provider.tracer("handler");
    let response = traced
        .handle(LambdaEvent::new(event, context), |record| {
            let fail = record.body.as_deref() == Some("fail");
            let tracer = tracer.clone();
            async move {
                tracer.start("charge").end();
                if fail {
                    Err(HandlerError::permanent("declined").with_type("declined"))
                } else {
                    HandlerResult::Ok(())
                }
            }
        })
        .await
        .unwrap();
    // gRPC export finished inside `handle`: the collector has the spans now.
    let at_return = collector.spans();
    let metrics_at_return = collector
        .metrics()
        .iter()
        .map(|m| m.render(&[]) + "\n")
        .collect();
    Run {
        failures: response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.clone())
            .collect(),
        at_return,
        metrics_at_return,
    }
}

fn render(spans: &[RecordedSpan]) -> String {
    Forest::new(spans.to_vec()).render(&TreeOptions::only(&["error.type", "faas.trigger"]))
}

/// The linked trace ids of each span named `name`.
/// Sorted, since spans arrive in the order they ended.
/// The link traces of the batch span (`{queue} process`) and the record spans
/// (`process {queue}`) of a queue.
fn link_traces(spans: &[RecordedSpan], queue: &str) -> Vec<Vec<String>> {
    let (batch, record) = (format!("{queue} process"), format!("process {queue}"));
    let mut all: Vec<Vec<String>> = spans
        .iter()
        .filter(|s| s.name == batch || s.name == record)
        .map(|s| {
            let mut l: Vec<String> = s.links.iter().map(|l| l.trace_id.clone()).collect();
            l.sort();
            l
        })
        .collect();
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_attribute_contexts_are_linked_and_failures_reported() {
    let run = invoke(include_str!("fixtures/traceparent.json")).await;
    assert_eq!(run.failures, ["2e1424d4-f796-459a-8184-9c92662be6da"]);
    // invocation, batch, 2 records, 2 handler spans: all exported before return.
    assert_eq!(run.at_return.len(), 6, "{}", render(&run.at_return));
    // The first record has both a traceparent and an AWSTraceHeader: the message
    // attribute wins. Header keys are read without regard to case.
    assert_eq!(
        link_traces(&run.at_return, "orders"),
        [
            vec![W3C_A.to_owned()],
            vec![W3C_A.to_owned(), W3C_B.to_owned()],
            vec![W3C_B.to_owned()]
        ]
    );
    let tree = render(&run.at_return);
    assert!(tree.starts_with("trace #1\norders-lambda [SERVER] faas.trigger=\"pubsub\"\n    orders process [CONSUMER] ERROR(\"1 of 2 messages failed\") error.type=\"declined\" faas.trigger=\"pubsub\""), "{tree}");
    assert!(tree.contains("process orders [CONSUMER] ERROR(\"declined\") error.type=\"declined\" faas.trigger=\"pubsub\""), "{tree}");
    // The metrics were flushed before `handle` returned too.
    assert_tree(
        &run.metrics_at_return,
        r#"
messaging.client.consumed.messages [{message}] Counter value=2 messaging.destination.name="orders" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="aws.sqs"
messaging.process.duration [s] Histogram count=1 buckets=messaging error.type="declined" messaging.destination.name="orders" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="aws.sqs"
messaging.process.duration [s] Histogram count=1 buckets=messaging messaging.destination.name="orders" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="aws.sqs"
mqtrace.message.dispositions [{message}] Counter value=1 messaging.destination.name="orders" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="aws.sqs" mqtrace.message.disposition="retried"
mqtrace.message.dispositions [{message}] Counter value=1 messaging.destination.name="orders" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="aws.sqs" mqtrace.message.disposition="settled"
mqtrace.message.queue.duration [s] Histogram count=2 buckets=messaging messaging.destination.name="orders" messaging.operation.name="process" messaging.operation.type="process" messaging.system.name="aws.sqs"
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_trace_header_alone_is_enough() {
    let run = invoke(include_str!("fixtures/aws_trace_header.json")).await;
    assert!(run.failures.is_empty());
    assert_eq!(
        link_traces(&run.at_return, "orders"),
        [vec![XRAY.to_owned()], vec![XRAY.to_owned()]]
    );
    let invocation = run
        .at_return
        .iter()
        .find(|s| s.name == "orders-lambda")
        .unwrap();
    for (key, value) in [
        ("faas.invocation.id", "req-1"),
        ("cloud.provider", "aws"),
        ("cloud.account.id", "123456789012"),
        ("cloud.region", "eu-west-1"),
    ] {
        assert_eq!(
            invocation.attr(key).and_then(|v| v.as_str()),
            Some(value),
            "{key}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_usable_context_means_no_link() {
    let run = invoke(include_str!("fixtures/no_context.json")).await;
    assert_eq!(run.failures, ["19dd0b57-b21e-4ac1-bd88-01bbb068cb78"]);
    assert_tree(
        &render(&run.at_return),
        r#"
        trace #1
        orders-lambda [SERVER] faas.trigger="pubsub"
            orders process [CONSUMER] ERROR("1 of 1 messages failed") error.type="declined" faas.trigger="pubsub"
                process orders [CONSUMER] ERROR("declined") error.type="declined" faas.trigger="pubsub"
                    charge [INTERNAL]
        "#,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_sources_name_the_batch_for_all_of_them() {
    let run = invoke(include_str!("fixtures/mixed_sources.json")).await;
    assert_eq!(run.failures, ["a1b2c3d4-0000-4000-8000-000000000002"]);
    assert_eq!(
        link_traces(&run.at_return, "multiple_sources"),
        [vec![W3C_A.to_owned(), XRAY.to_owned()]]
    );
    assert_eq!(
        link_traces(&run.at_return, "orders"),
        [vec![W3C_A.to_owned()]]
    );
    assert_eq!(
        link_traces(&run.at_return, "payments"),
        [vec![], vec![XRAY.to_owned()]]
    );
    let batch = run
        .at_return
        .iter()
        .find(|s| s.name == "multiple_sources process")
        .unwrap();
    assert!(batch.attr("messaging.destination.name").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracing_spans_in_the_handler_nest_under_the_record_span() {
    use tracing::instrument::WithSubscriber as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    let Setup {
        collector,
        guard,
        instrumenter,
        ..
    } = setup().await;
    let dispatch =
        tracing::Dispatch::new(tracing_subscriber::registry().with(guard.tracing_layer()));
    let traced = TracedSqsHandler::new(&instrumenter, guard.flusher());
    let event: SqsEvent =
        serde_json::from_str(include_str!("fixtures/aws_trace_header.json")).unwrap();
    let response = traced
        .handle(
            LambdaEvent::new(event, lambda_runtime::Context::default()),
            |_| {
                async {
                    async { tokio::task::yield_now().await }
                        .instrument(tracing::info_span!("reserve stock"))
                        .await;
                    HandlerResult::Ok(())
                }
                .with_subscriber(dispatch.clone())
            },
        )
        .await
        .unwrap();
    assert!(response.batch_item_failures.is_empty());
    assert_tree(
        &Forest::new(collector.spans()).render(&TreeOptions::only(&[])),
        r#"
        trace #1
        lambda [SERVER]
            orders process [CONSUMER]
                ~> span not received messaging.message.id="c80e8021-a70a-42c7-a470-796e1186f753"
                process orders [CONSUMER]
                    ~> span not received
                    reserve stock [INTERNAL]
        "#,
    );
}

/// `handle_with` tells the handler each record's attempt: SQS's receive count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_are_told_each_records_attempt() {
    let guard = TelemetryBuilder::default()
        .service_name("orders-lambda")
        .endpoint("http://127.0.0.1:9")
        .install_global(false)
        .build()
        .unwrap();
    let provider = guard.provider().unwrap().clone();
    let instrumenter = Instrumenter::builder().tracer_provider(&provider).build();
    let traced = TracedSqsHandler::new(&instrumenter, || {});
    let event: SqsEvent = serde_json::from_str(include_str!("fixtures/traceparent.json")).unwrap();
    let seen = std::sync::Mutex::new(Vec::new());
    traced
        .handle_with(
            LambdaEvent::new(event, lambda_runtime::Context::default()),
            |record, attempt| {
                seen.lock().unwrap().push((
                    record.message_id.clone().unwrap_or_default(),
                    attempt.number(),
                ));
                async { HandlerResult::Ok(()) }
            },
        )
        .await
        .unwrap();
    let seen = seen.into_inner().unwrap();
    let attempts: Vec<u32> = seen.iter().map(|(_, a)| *a).collect();
    assert_eq!(attempts, [1, 2], "{seen:?}");
}

/// A loop of one's own over the records: each record gets its process span as a
/// child of the caller's context, with its producer as parent, and failures are
/// reported for the partial batch response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_record_loop_gets_the_same_spans_and_decisions() {
    let Setup {
        collector,
        guard,
        provider,
        instrumenter,
    } = setup().await;
    let traced = TracedSqsHandler::new(&instrumenter, guard.flusher());
    let event: SqsEvent = serde_json::from_str(include_str!("fixtures/traceparent.json")).unwrap();
    let mut failures = Vec::new();
    for (i, record) in event.records.iter().enumerate() {
        let processed = traced
            .process_record(record, |attempt| async move {
                if i == 1 {
                    Err(HandlerError::transient("stock service down").with_type("unavailable"))
                } else {
                    assert_eq!(attempt.number(), 1);
                    Ok(())
                }
            })
            .await;
        if traced.settle_record(record, processed).await {
            failures.push(record.message_id.clone().unwrap_or_default());
        }
    }
    traced.flush().await;
    assert_eq!(failures.len(), 1);
    assert_eq!(Some(&failures[0]), event.records[1].message_id.as_ref());
    // The producers' spans are not in this capture: parent and link point out
    // of it, to the producer in the record's `traceparent`.
    let spans = collector.exactly(&provider, 2).await;
    assert_tree(
        &Forest::new(spans).render(&TreeOptions::only(&[
            "error.type",
            "mqtrace.message.attempt",
            "mqtrace.message.disposition",
        ])),
        r#"
        trace #1
        process orders [CONSUMER] (parent missing) mqtrace.message.attempt=1 mqtrace.message.disposition="settled"
            ~> span not received
        trace #2
        process orders [CONSUMER] (parent missing) ERROR("stock service down") error.type="unavailable" mqtrace.message.attempt=2 mqtrace.message.disposition="retried"
            ~> span not received
        "#,
    );
}

/// A collector, telemetry exporting to it (the batch delay left as it is: the
/// handler flushes), and an instrumenter on that provider.
struct Setup {
    collector: Collector,
    guard: TelemetryGuard,
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
    instrumenter: Instrumenter,
}

async fn setup() -> Setup {
    let collector = Collector::start().await.unwrap();
    let guard = TelemetryBuilder::default()
        .service_name("orders-lambda")
        .endpoint(collector.grpc_endpoint())
        .install_global(false)
        .build()
        .unwrap();
    let provider = guard.provider().unwrap().clone();
    let instrumenter = Instrumenter::builder().tracer_provider(&provider).build();
    Setup {
        collector,
        guard,
        provider,
        instrumenter,
    }
}

/// Runs `fixture` through a handler whose records fail when their body is
/// `fail`; returns the bodies' message ids the handler saw and the response.
async fn run_failing(
    traced: &TracedSqsHandler,
    fixture: &str,
) -> (
    Vec<String>,
    Result<aws_lambda_events::event::sqs::SqsBatchResponse, mqtrace_aws_lambda::BatchFailed>,
) {
    run_failing_with(traced, fixture, || {
        HandlerError::transient("inventory down").with_type("unavailable")
    })
    .await
}

/// [`run_failing`] with the failure of one's choosing.
async fn run_failing_with(
    traced: &TracedSqsHandler,
    fixture: &str,
    failure: fn() -> HandlerError,
) -> (
    Vec<String>,
    Result<aws_lambda_events::event::sqs::SqsBatchResponse, mqtrace_aws_lambda::BatchFailed>,
) {
    let event: SqsEvent = serde_json::from_str(fixture).unwrap();
    let seen = std::sync::Mutex::new(Vec::new());
    let response = traced
        .handle(
            LambdaEvent::new(event, lambda_runtime::Context::default()),
            |record| {
                seen.lock()
                    .unwrap()
                    .push(record.message_id.clone().unwrap_or_default());
                let fail = record.body.as_deref() == Some("fail");
                async move {
                    if fail {
                        Err(failure())
                    } else {
                        HandlerResult::Ok(())
                    }
                }
            },
        )
        .await;
    (seen.into_inner().unwrap(), response)
}

fn ids(response: &aws_lambda_events::event::sqs::SqsBatchResponse) -> Vec<&str> {
    response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect()
}

/// FIFO: once a record of a message group fails, the group's later records are
/// not processed and go into the response with it; the other group, interleaved,
/// goes on until its own failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_groups_stop_at_their_first_failure() {
    let Setup {
        collector,
        guard,
        provider,
        instrumenter,
    } = setup().await;
    let traced = TracedSqsHandler::new(&instrumenter, guard.flusher());
    let (seen, response) = run_failing(&traced, include_str!("fixtures/fifo.json")).await;
    assert_eq!(
        seen,
        ["a-1", "b-1", "a-2", "b-2", "b-3"],
        "a-3 waits behind a-2"
    );
    assert_eq!(ids(&response.unwrap()), ["a-2", "a-3", "b-3"]);
    let spans = collector.exactly(&provider, 8).await;
    let mut options = TreeOptions::only(&["error.type", "mqtrace.message.disposition"]);
    options.hide.push("faas.invocation.id".into());
    assert_tree(
        &Forest::new(spans).render(&options),
        r#"
        trace #1
        lambda [SERVER]
            orders.fifo process [CONSUMER] ERROR("3 of 6 messages failed") error.type="_OTHER"
                process orders.fifo [CONSUMER] mqtrace.message.disposition="settled"
                process orders.fifo [CONSUMER] mqtrace.message.disposition="settled"
                process orders.fifo [CONSUMER] ERROR("inventory down") error.type="unavailable" mqtrace.message.disposition="retried"
                process orders.fifo [CONSUMER] mqtrace.message.disposition="settled"
                process orders.fifo [CONSUMER] ERROR("not processed: an earlier record of message group A failed") error.type="fifo_group_blocked" mqtrace.message.disposition="retried"
                process orders.fifo [CONSUMER] ERROR("inventory down") error.type="unavailable" mqtrace.message.disposition="retried"
        "#,
    );
}

/// Without partial batch responses (a mapping without `ReportBatchItemFailures`)
/// a failure fails the whole invocation, so Lambda retries the batch instead of
/// deleting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_partial_responses_a_failure_fails_the_invocation() {
    let Setup {
        collector,
        guard,
        provider,
        instrumenter,
    } = setup().await;
    let traced =
        TracedSqsHandler::new(&instrumenter, guard.flusher()).partial_batch_responses(false);
    let (seen, response) = run_failing(&traced, include_str!("fixtures/fifo.json")).await;
    assert_eq!(seen.len(), 5);
    let failed = response.unwrap_err();
    assert_eq!((failed.failed, failed.total), (3, 6));
    // Nothing failing: the response as usual.
    let (_, ok) = run_failing(&traced, include_str!("fixtures/aws_trace_header.json")).await;
    assert!(ids(&ok.unwrap()).is_empty());
    let spans = collector.exactly(&provider, 8 + 3).await;
    let invocations: Vec<_> = spans
        .iter()
        .filter(|s| s.kind == mqtrace_testing::Kind::Server)
        .collect();
    assert_eq!(invocations.len(), 2);
    assert!(
        invocations
            .iter()
            .any(|s| matches!(&s.status, mqtrace_testing::SpanStatus::Error(m) if m.contains("3 of 6 records failed"))
                && s.attr("error.type").and_then(|v| v.as_str()) == Some(mqtrace_aws_lambda::BATCH_FAILED_ERROR)
                && s.attr("mqtrace.batch.failed_count").and_then(|v| v.as_i64()) == Some(3)),
        "{invocations:#?}"
    );
}

/// SNS to SQS without raw delivery: the producer's context is inside the SNS
/// envelope in the body. Read from there only when asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_envelopes_carry_the_context_when_asked() {
    for on in [false, true] {
        let Setup {
            collector,
            guard,
            provider,
            instrumenter,
        } = setup().await;
        let traced = TracedSqsHandler::new(&instrumenter, guard.flusher()).sns_envelopes(on);
        let event: SqsEvent =
            serde_json::from_str(include_str!("fixtures/sns_envelope.json")).unwrap();
        let response = traced
            .handle(
                LambdaEvent::new(event, lambda_runtime::Context::default()),
                |_| async { HandlerResult::Ok(()) },
            )
            .await
            .unwrap();
        assert!(response.batch_item_failures.is_empty());
        let spans = collector.exactly(&provider, 3).await;
        let record = spans.iter().find(|s| s.name == "process orders").unwrap();
        let linked: Vec<&str> = record.links.iter().map(|l| l.trace_id.as_str()).collect();
        // Inside a batch, the record span's parent is the batch span, which
        // links every record's producer too.
        let batch = spans.iter().find(|s| s.name == "orders process").unwrap();
        let batch_linked: Vec<&str> = batch.links.iter().map(|l| l.trace_id.as_str()).collect();
        if on {
            assert_eq!(linked, [W3C_A], "the envelope's traceparent");
            assert_eq!(batch_linked, [W3C_A]);
        } else {
            assert!(linked.is_empty(), "{linked:?}");
            assert!(batch_linked.is_empty(), "{batch_linked:?}");
        }
    }
}

/// Under lambda_runtime's own OpenTelemetry layer, mqtrace's invocation span can
/// be left out: the batch span is then a child of the current span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invocation_span_can_be_left_to_the_runtime() {
    let Setup {
        collector,
        guard,
        provider,
        instrumenter,
    } = setup().await;
    let traced = TracedSqsHandler::new(&instrumenter, guard.flusher()).invocation_span(false);
    let event: SqsEvent = serde_json::from_str(include_str!("fixtures/no_context.json")).unwrap();
    // What lambda_runtime's layer would have made around the handler.
    let runtime_span = provider
        .tracer("lambda_runtime")
        .start("runtime invocation");
    let cx = opentelemetry::Context::current_with_span(runtime_span);
    let response = {
        let _attached = cx.clone().attach();
        traced
            .handle(
                LambdaEvent::new(event, lambda_runtime::Context::default()),
                |_| async { HandlerResult::Ok(()) },
            )
            .await
            .unwrap()
    };
    assert!(response.batch_item_failures.is_empty());
    cx.span().end();
    assert_tree(
        &Forest::new(collector.exactly(&provider, 3).await).render(&TreeOptions::only(&[])),
        r#"
        trace #1
        runtime invocation [INTERNAL]
            orders process [CONSUMER]
                process orders [CONSUMER]
        "#,
    );
}

fn sqs_client() -> aws_sdk_sqs::Client {
    use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
    aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("eu-west-1"))
            .endpoint_url(mqtrace_testing::brokers::sqs_endpoint())
            .credentials_provider(Credentials::new("test", "test", None, None, "lambda-tests"))
            .build(),
    )
}

/// With a dead-letter queue, a permanent failure is sent there (on the harness's
/// SQS emulator) with mqtrace's metadata and leaves the response; a transient one
/// is still reported for SQS to hand out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_go_to_the_dead_letter_queue() {
    let client = sqs_client();
    let dead = client
        .create_queue()
        .queue_name(format!("lambda-dead-{:08x}", std::process::id()))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let Setup {
        collector,
        guard,
        provider,
        instrumenter,
    } = setup().await;
    let traced = TracedSqsHandler::new(&instrumenter, guard.flusher())
        .dead_letter_queue(client.clone(), &dead);
    // traceparent.json: the second record's body is "fail".
    let event: SqsEvent = serde_json::from_str(include_str!("fixtures/traceparent.json")).unwrap();
    let permanent_id = event.records[1].message_id.clone().unwrap();
    let (_, response) =
        run_failing_with(&traced, include_str!("fixtures/traceparent.json"), || {
            HandlerError::permanent("declined").with_type("declined")
        })
        .await;
    let response = response.unwrap();
    assert!(
        ids(&response).is_empty(),
        "dead-lettered, so deleted: {response:?}"
    );
    let copies = client
        .receive_message()
        .queue_url(&dead)
        .message_attribute_names("All")
        .wait_time_seconds(1)
        .send()
        .await
        .unwrap()
        .messages
        .unwrap_or_default();
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0].body(), Some("fail"));
    let attribute = |name: &str| {
        copies[0]
            .message_attributes()
            .and_then(|a| a.get(name))
            .and_then(|v| v.string_value())
            .map(str::to_owned)
    };
    assert_eq!(attribute("mqtrace-error-type").as_deref(), Some("declined"));
    assert_eq!(
        attribute("mqtrace-error-message").as_deref(),
        Some("declined")
    );
    assert!(attribute("mqtrace-failed-at").is_some());
    let spans = collector.exactly(&provider, 5).await;
    let forward = spans
        .iter()
        .find(|s| s.kind == mqtrace_testing::Kind::Producer)
        .unwrap();
    assert_eq!(
        forward.name,
        format!("send {}", dead.rsplit('/').next().unwrap())
    );
    let dead_lettered = spans
        .iter()
        .find(|s| {
            s.attr("mqtrace.message.disposition")
                .and_then(|v| v.as_str())
                == Some("dead_lettered")
                && s.kind == mqtrace_testing::Kind::Consumer
        })
        .unwrap();
    assert_eq!(
        forward.parent_span_id.as_deref(),
        Some(dead_lettered.span_id.as_str())
    );
    assert_eq!(
        dead_lettered
            .attr("messaging.message.id")
            .and_then(|v| v.as_str()),
        Some(permanent_id.as_str())
    );
    let _ = client.delete_queue().queue_url(&dead).send().await;
}

/// Records of a standard queue, three at a time: never more than three in
/// flight, each handler's own span under its own record span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_queue_records_run_concurrently_each_in_its_context() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let Setup {
        collector,
        guard,
        provider,
        instrumenter,
    } = setup().await;
    let traced = TracedSqsHandler::new(&instrumenter, guard.flusher()).concurrency(3);
    let event: SqsEvent = serde_json::from_str(include_str!("fixtures/standard_six.json")).unwrap();
    let (in_flight, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let tracer = provider.tracer("handler");
    let response = traced
        .handle(
            LambdaEvent::new(event, lambda_runtime::Context::default()),
            |record| {
                let id = record.message_id.clone().unwrap_or_default();
                let (in_flight, most, tracer) = (&in_flight, &most, tracer.clone());
                async move {
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    // Made in the handler: a child of this record's span.
                    tracer.start(format!("charge {id}")).end();
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    HandlerResult::Ok(())
                }
            },
        )
        .await
        .unwrap();
    assert!(ids(&response).is_empty());
    assert_eq!(
        most.load(Ordering::SeqCst),
        3,
        "at most three at once, and three were"
    );
    let spans = collector.exactly(&provider, 2 + 6 + 6).await;
    for i in 0..6 {
        let charge = spans
            .iter()
            .find(|s| s.name == format!("charge std-{i}"))
            .unwrap();
        let record = spans
            .iter()
            .find(|s| Some(&s.span_id) == charge.parent_span_id.as_ref())
            .unwrap();
        assert_eq!(
            record.attr("messaging.message.id").and_then(|v| v.as_str()),
            Some(format!("std-{i}").as_str()),
            "charge std-{i} is under its own record's span"
        );
    }
}

/// The layer composes with lambda_runtime's `tower` services: a per-record
/// service wrapped into a service of events answers with the partial batch
/// response, each record in its span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_wraps_a_per_record_service() {
    use aws_lambda_events::event::sqs::SqsMessage;
    use lambda_runtime::tower::{ServiceBuilder, ServiceExt as _};
    use mqtrace_aws_lambda::TracedSqsLayer;
    let Setup {
        collector,
        guard,
        provider,
        instrumenter,
    } = setup().await;
    let traced = TracedSqsHandler::new(&instrumenter, guard.flusher());
    let service = ServiceBuilder::new()
        .layer(TracedSqsLayer::new(traced))
        .service(lambda_runtime::service_fn(
            |record: SqsMessage| async move {
                if record.body.as_deref() == Some("fail") {
                    Err(HandlerError::transient("declined").with_type("declined"))
                } else {
                    Ok(())
                }
            },
        ));
    let event: SqsEvent = serde_json::from_str(include_str!("fixtures/traceparent.json")).unwrap();
    let failed_id = event.records[1].message_id.clone().unwrap();
    let response = service
        .oneshot(LambdaEvent::new(event, lambda_runtime::Context::default()))
        .await
        .unwrap();
    assert_eq!(ids(&response), [failed_id.as_str()]);
    let spans = collector.exactly(&provider, 4).await;
    let records: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "process orders")
        .collect();
    assert_eq!(records.len(), 2);
    assert_eq!(
        records
            .iter()
            .filter(|s| matches!(s.status, mqtrace_testing::SpanStatus::Error(_)))
            .count(),
        1
    );
}
