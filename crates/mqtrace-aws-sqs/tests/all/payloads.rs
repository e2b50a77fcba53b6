//! Payload edges on SQS: an empty body, bodies at and above the 256 KiB limit, and
//! trace context that would take a message over the size limit.
//!
//! The emulator enforces no size limit, so these tests check what the library
//! sends. (SQS bodies are strings: non-UTF-8 bytes cannot be sent at all.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use aws_sdk_sqs::types::{MessageSystemAttributeName, SendMessageBatchRequestEntry};
use mqtrace::HandlerResult;
use mqtrace_aws_sqs::{
    message_size, TracedConsumer, TracedSqs, CONTEXT_OMITTED, DEFAULT_MAX_MESSAGE_BYTES,
};
use mqtrace_testing::Kind;

use crate::helpers::{when_count, within, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_attributes_that_would_overflow_the_size_limit_are_left_out() {
    let h = Harness::start().await;
    let url = h.queue("large", &[]).await;
    let instrumenter = h.instrumenter(|b| b.body_size(true));
    let producer = TracedSqs::new(h.client.clone(), instrumenter);
    // Fits alone; with the traceparent attribute (about 80 bytes) it would not.
    let near_limit = "x".repeat(DEFAULT_MAX_MESSAGE_BYTES - 20);
    producer
        .send(
            h.client
                .send_message()
                .queue_url(&url)
                .message_body(&near_limit),
        )
        .await
        .unwrap();
    let entry = SendMessageBatchRequestEntry::builder()
        .id("big")
        .message_body(&near_limit)
        .build()
        .unwrap();
    let small = SendMessageBatchRequestEntry::builder()
        .id("small")
        .message_body("small")
        .build()
        .unwrap();
    for r in producer.send_batch(&url, vec![entry, small]).await {
        assert!(r.unwrap().failed.is_empty());
    }

    let messages = h.drain(&url).await;
    assert_eq!(messages.len(), 3);
    let mut with_xray = 0;
    for m in &messages {
        let body = m.body().unwrap();
        let attributes = m.message_attributes().cloned().unwrap_or_default();
        assert!(message_size(body, &attributes) <= DEFAULT_MAX_MESSAGE_BYTES);
        let xray = m
            .attributes()
            .unwrap()
            .contains_key(&MessageSystemAttributeName::AwsTraceHeader);
        if body == "small" {
            assert!(attributes.contains_key("traceparent"));
        } else {
            assert!(attributes.is_empty(), "{attributes:?}");
        }
        with_xray += usize::from(xray);
    }
    // The X-Ray header does not count toward the size, so it goes even with the
    // big body. (The emulator keeps it for single sends only, not in batches.)
    assert_eq!(with_xray, 1);
    let spans = h.spans(4).await;
    let omitted: Vec<_> = spans
        .iter()
        .filter(|s| s.kind == Kind::Producer)
        .map(|s| {
            (
                s.attr("messaging.message.body.size").unwrap().as_i64(),
                s.attr(CONTEXT_OMITTED).and_then(|v| v.as_str()),
            )
        })
        .collect();
    let big = Some((DEFAULT_MAX_MESSAGE_BYTES - 20) as i64);
    assert_eq!(
        omitted
            .iter()
            .filter(|o| **o == (big, Some("message_size")))
            .count(),
        2,
        "{omitted:?}"
    );
    assert!(omitted.contains(&(Some(5), None)), "{omitted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_and_large_bodies_are_processed_unchanged() {
    let h = Harness::start().await;
    let url = h.queue("edges", &[]).await;
    let instrumenter = h.instrumenter(|b| b.body_size(true));
    let producer = TracedSqs::new(h.client.clone(), instrumenter.clone());
    // Empty (real SQS refuses it; the caller gets that error and an Error span),
    // exactly 256 KiB, and 1 MiB (SQS's largest, on queues that allow it).
    let bodies = [
        String::new(),
        "a".repeat(DEFAULT_MAX_MESSAGE_BYTES),
        "b".repeat(1 << 20),
    ];
    for body in &bodies {
        producer
            .send(h.client.send_message().queue_url(&url).message_body(body))
            .await
            .unwrap();
    }
    let received = Arc::new(Mutex::new(Vec::<String>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let (seen, counted) = (Arc::clone(&received), Arc::clone(&count));
    let stats = within(
        60,
        TracedConsumer::new(h.client.clone(), &url, &instrumenter)
            .wait_time_seconds(1)
            .receive_spans(false, false)
            .run_until(
                move |m| {
                    seen.lock().unwrap().push(m.body().to_owned());
                    counted.fetch_add(1, Ordering::SeqCst);
                    async { HandlerResult::Ok(()) }
                },
                when_count(&count, bodies.len()),
            ),
    )
    .await
    .unwrap();
    assert_eq!(stats.settled, 3);
    let mut got = received.lock().unwrap().clone();
    got.sort_by_key(String::len);
    assert_eq!(got, bodies);
    assert!(h.drain(&url).await.is_empty(), "all deleted");
    let mut sizes: Vec<(Kind, i64)> = h
        .spans(6)
        .await
        .iter()
        .map(|s| {
            (
                s.kind,
                s.attr("messaging.message.body.size")
                    .unwrap()
                    .as_i64()
                    .unwrap(),
            )
        })
        .collect();
    sizes.sort_by_key(|(k, n)| (*n, format!("{k:?}")));
    let expected: Vec<i64> = bodies.iter().map(|b| b.len() as i64).collect();
    for (i, n) in expected.iter().enumerate() {
        assert_eq!(sizes[2 * i].1, *n);
        assert_eq!(sizes[2 * i + 1].1, *n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_copy_near_the_size_limit_keeps_what_fits() {
    let h = Harness::start().await;
    let url = h.queue("near", &[]).await;
    let dlq = h.queue("near-dead", &[]).await;
    let instrumenter = h.instrumenter(|b| b.body_size(true));
    // 40 bytes of room for attributes.
    let body = "{".repeat(DEFAULT_MAX_MESSAGE_BYTES - 40);
    TracedSqs::new(h.client.clone(), instrumenter.clone())
        .send(h.client.send_message().queue_url(&url).message_body(&body))
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let stats = within(
        30,
        TracedConsumer::new(h.client.clone(), &url, &instrumenter)
            .dead_letter_queue(&dlq)
            .wait_time_seconds(1)
            .receive_spans(false, false)
            .run_until(
                move |m| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let _: serde_json::Value = m.json()?;
                        HandlerResult::Ok(())
                    }
                },
                when_count(&calls, 1),
            ),
    )
    .await
    .unwrap();
    assert_eq!(stats.dead_lettered, 1);
    assert!(h.drain(&url).await.is_empty());
    let dead = h.drain(&dlq).await;
    assert_eq!(dead.len(), 1);
    let attributes = dead[0].message_attributes().cloned().unwrap_or_default();
    assert_eq!(dead[0].body(), Some(body.as_str()));
    assert!(message_size(&body, &attributes) <= DEFAULT_MAX_MESSAGE_BYTES);
    let names: Vec<&str> = attributes.keys().map(String::as_str).collect();
    // The error type ranks first and fits (36 bytes); nothing else does.
    assert_eq!(
        names,
        ["mqtrace-error-type"],
        "the metadata that fits, first by rank"
    );
}
