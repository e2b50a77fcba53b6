//! Batch send: create spans per entry, a send span per request of 10, per-entry
//! failures, and a trace per message on the consumer side.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use mqtrace::HandlerResult;
use mqtrace_aws_sqs::{TracedConsumer, TracedSqs};
use mqtrace_testing::{Kind, SpanStatus};

use crate::helpers::{when_count, within, Harness};

fn entry(i: usize, body: &str) -> SendMessageBatchRequestEntry {
    SendMessageBatchRequestEntry::builder()
        .id(format!("e{i}"))
        .message_body(body)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_of_25_is_three_requests_with_a_context_per_message() {
    let h = Harness::start().await;
    let url = h.queue("bulk", &[]).await;
    let instrumenter = h.instrumenter(|b| b);
    let entries: Vec<_> = (0..25).map(|i| entry(i, &format!("m{i}"))).collect();
    let results = TracedSqs::new(h.client.clone(), instrumenter.clone())
        .send_batch(&url, entries)
        .await;
    assert_eq!(results.len(), 3, "25 entries: 10 + 10 + 5");
    let sizes: Vec<usize> = results
        .iter()
        .map(|r| r.as_ref().unwrap().successful().len())
        .collect();
    assert_eq!(sizes, [10, 10, 5]);

    let seen = Arc::new(AtomicUsize::new(0));
    let handled = Arc::clone(&seen);
    within(
        60,
        TracedConsumer::new(h.client.clone(), &url, &instrumenter)
            .wait_time_seconds(1)
            .receive_spans(false, false)
            .run_until(
                move |_| {
                    handled.fetch_add(1, Ordering::SeqCst);
                    async { HandlerResult::Ok(()) }
                },
                when_count(&seen, 25),
            ),
    )
    .await
    .unwrap();
    let spans = h.spans(25 + 3 + 25).await;
    let creates: Vec<_> = spans
        .iter()
        .filter(|s| s.name.starts_with("create"))
        .collect();
    let sends: Vec<_> = spans
        .iter()
        .filter(|s| s.name.starts_with("send"))
        .collect();
    let processes: Vec<_> = spans
        .iter()
        .filter(|s| s.name.starts_with("process"))
        .collect();
    assert_eq!((creates.len(), sends.len(), processes.len()), (25, 3, 25));
    assert!(creates.iter().all(|s| s.kind == Kind::Producer));
    assert!(sends.iter().all(|s| s.kind == Kind::Client));
    // Each send links exactly its 10, 10 and 5 creates.
    let mut linked: Vec<usize> = sends.iter().map(|s| s.links.len()).collect();
    linked.sort_unstable();
    assert_eq!(linked, [5, 10, 10]);
    let create_ids: HashSet<&str> = creates.iter().map(|s| s.span_id.as_str()).collect();
    // Every process span is the child of a distinct create span: its own context.
    let parents: HashSet<&str> = processes
        .iter()
        .map(|s| s.parent_span_id.as_deref().unwrap())
        .collect();
    assert_eq!(parents.len(), 25);
    assert!(parents.is_subset(&create_ids));
    // One trace per message.
    let traces: HashSet<&str> = processes.iter().map(|s| s.trace_id.as_str()).collect();
    assert_eq!(traces.len(), 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_entry_is_marked_on_its_create_span() {
    let h = Harness::start().await;
    let url = h.queue("partial", &[]).await;
    let instrumenter = h.instrumenter(|b| b);
    // A delay above SQS's 900 s is refused for that entry alone.
    let refused = SendMessageBatchRequestEntry::builder()
        .id("e1")
        .message_body("too late")
        .delay_seconds(1000)
        .build()
        .unwrap();
    let entries = vec![entry(0, "fine"), refused, entry(2, "fine too")];
    let results = TracedSqs::new(h.client.clone(), instrumenter)
        .send_batch(&url, entries)
        .await;
    let out = results[0].as_ref().unwrap();
    assert_eq!(out.successful().len(), 2);
    assert_eq!(out.failed().len(), 1);
    let spans = h.spans(4).await;
    let failed: Vec<_> = spans
        .iter()
        .filter(|s| matches!(s.status, SpanStatus::Error(_)))
        .map(|s| s.name.replace(&h.run, "RUN"))
        .collect();
    assert_eq!(
        failed,
        ["create partial-RUN", "send partial-RUN"],
        "{spans:#?}"
    );
    assert_eq!(h.drain(&url).await.len(), 2);
}
