//! SQS-triggered Lambda events with records of arbitrary ids, bodies, source ARNs,
//! system attributes (`AWSTraceHeader`, `SentTimestamp`, `ApproximateReceiveCount`
//! among them) and message attributes of any data type: the handler wrapper never
//! panics, and the partial batch response names exactly the records that failed,
//! in order, together with those held back behind a failed record of their FIFO
//! message group (which the handler never sees).
#![no_main]

use std::sync::OnceLock;

use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::LambdaEvent;
use libfuzzer_sys::{arbitrary, fuzz_target};
use mqtrace::{HandlerError, HandlerResult, Instrumenter};
use mqtrace_aws_lambda::TracedSqsHandler;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::{json, Map, Value};

#[derive(Debug, arbitrary::Arbitrary)]
struct FuzzRecord {
    message_id: Option<String>,
    body: Option<String>,
    event_source_arn: Option<String>,
    /// Named ones first, so that the fuzzer reaches them often.
    trace_header: Option<String>,
    sent_timestamp: Option<String>,
    receive_count: Option<String>,
    attributes: Vec<(String, String)>,
    /// Key, data type, string value.
    message_attributes: Vec<(String, Option<String>, Option<String>)>,
    fails: bool,
}

fn handler() -> &'static (tokio::runtime::Runtime, TracedSqsHandler) {
    static HANDLER: OnceLock<(tokio::runtime::Runtime, TracedSqsHandler)> = OnceLock::new();
    HANDLER.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let provider = SdkTracerProvider::builder().build();
        let instrumenter = Instrumenter::builder().tracer_provider(&provider).build();
        let flush = move || {
            let _ = provider.force_flush();
        };
        (runtime, TracedSqsHandler::new(&instrumenter, flush))
    })
}

fn record_json(r: &FuzzRecord) -> Value {
    let mut attributes: Map<String, Value> = r
        .attributes
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    for (name, value) in [
        ("AWSTraceHeader", &r.trace_header),
        ("SentTimestamp", &r.sent_timestamp),
        ("ApproximateReceiveCount", &r.receive_count),
    ] {
        if let Some(v) = value {
            attributes.insert(name.to_owned(), json!(v));
        }
    }
    let message_attributes: Map<String, Value> = r
        .message_attributes
        .iter()
        .map(|(k, data_type, value)| {
            (
                k.clone(),
                json!({ "dataType": data_type, "stringValue": value }),
            )
        })
        .collect();
    json!({
        "messageId": r.message_id,
        "body": r.body,
        "eventSource": "aws:sqs",
        "eventSourceARN": r.event_source_arn,
        "attributes": attributes,
        "messageAttributes": message_attributes,
    })
}

fuzz_target!(|records: Vec<FuzzRecord>| {
    let event = json!({ "Records": records.iter().map(record_json).collect::<Vec<_>>() });
    // The event type's own parsing is not under test.
    let Ok(event) = serde_json::from_value::<SqsEvent>(event) else {
        return;
    };
    // Which records the handler should see, and which should be reported: a
    // record behind a failed one of its message group is held back, unhandled.
    let group = |r: &FuzzRecord| {
        r.attributes
            .iter()
            .rev()
            .find(|(k, _)| k == "MessageGroupId")
            .map(|(_, v)| v.clone())
    };
    let mut blocked: Vec<String> = Vec::new();
    let mut handled = Vec::new();
    let mut expected = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let g = group(r);
        if g.as_ref().is_some_and(|g| blocked.contains(g)) {
            expected.push(r.message_id.clone().unwrap_or_default());
            continue;
        }
        handled.push(i);
        if r.fails {
            expected.push(r.message_id.clone().unwrap_or_default());
            blocked.extend(g);
        }
    }
    let (runtime, traced) = handler();
    let mut next = 0;
    let response = runtime
        .block_on(traced.handle(
            LambdaEvent::new(event, lambda_runtime::Context::default()),
            |_| {
                let fails = records[handled[next]].fails;
                next += 1;
                async move {
                    if fails {
                        Err(HandlerError::transient("fuzzed failure"))
                    } else {
                        HandlerResult::Ok(())
                    }
                }
            },
        ))
        .expect("partial batch responses are on");
    assert_eq!(next, handled.len(), "every record not held back was handled");
    let got: Vec<String> = response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone())
        .collect();
    assert_eq!(got, expected);
});
