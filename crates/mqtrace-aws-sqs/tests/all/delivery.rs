//! Delivery guarantees of the full consumer on the SQS emulator, checked with
//! `mqtrace_testing::delivery`: FIFO order across failures, and deletes and
//! visibility for handlers of very different speeds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;
use mqtrace::{HandlerError, HandlerResult};
use mqtrace_aws_sqs::TracedConsumer;
use mqtrace_testing::delivery::{Contract, Ledger};

use crate::helpers::{when_count, within, Harness};

/// The bodies left on `url` at the end of a run.
async fn waiting(h: &Harness, url: &str) -> Vec<String> {
    h.drain(url)
        .await
        .iter()
        .map(|m| m.body().unwrap_or_default().to_owned())
        .collect()
}

/// Issue 24 item 5. A FIFO queue with two groups; the first message of group
/// `g` fails once. The rest of `g` received with it must be neither handled
/// nor deleted in that receive, so that `g` is handled in order once the failed
/// message comes back; group `h` goes on.
///
/// Failed before the fix: the consumer handled and deleted `g-1`..`g-3` right
/// after `g-0` failed, and `g-0` succeeded only on its redelivery: "later
/// messages succeeded before earlier ones (earlier, later): [("g-0", "g-1"),
/// ("g-0", "g-2"), ("g-0", "g-3")]".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_failure_holds_the_rest_of_its_group() {
    let h = Harness::start().await;
    let url = h
        .queue(
            "orders.fifo",
            &[
                (QueueAttributeName::FifoQueue, "true".into()),
                (QueueAttributeName::ContentBasedDeduplication, "true".into()),
                (QueueAttributeName::VisibilityTimeout, "1".into()),
            ],
        )
        .await;
    let instrumenter = h.instrumenter(|b| b);
    let ledger = Ledger::new();
    let bodies = [
        ("g-0", "g"),
        ("g-1", "g"),
        ("h-0", "h"),
        ("g-2", "g"),
        ("h-1", "h"),
        ("g-3", "g"),
    ];
    for (body, group) in bodies {
        h.client
            .send_message()
            .queue_url(&url)
            .message_group_id(group)
            .message_body(body)
            .send()
            .await
            .unwrap();
        ledger.sent(body, group);
    }
    let attempts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let done = Arc::new(AtomicUsize::new(0));
    let (handled, counted, tries) = (ledger.clone(), Arc::clone(&done), Arc::clone(&attempts));
    let stats = within(
        60,
        TracedConsumer::new(h.client.clone(), &url, &instrumenter)
            .wait_time_seconds(1)
            .run_until(
                move |m| {
                    let (ledger, done, tries) =
                        (handled.clone(), Arc::clone(&counted), Arc::clone(&tries));
                    async move {
                        let body = m.body().to_owned();
                        let invocation = ledger.started(body.clone());
                        let attempt = {
                            let mut tries = tries.lock().unwrap();
                            let n = tries.entry(body.clone()).or_default();
                            *n += 1;
                            *n
                        };
                        let ok = !(body == "g-0" && attempt == 1);
                        invocation.finished(ok);
                        if !ok {
                            return Err(HandlerError::transient("inventory down"));
                        }
                        if ledger.successes(&body) == 1 {
                            done.fetch_add(1, Ordering::SeqCst);
                        }
                        HandlerResult::Ok(())
                    }
                },
                when_count(&done, bodies.len()),
            ),
    )
    .await
    .unwrap();
    ledger.waiting(waiting(&h, &url).await);
    ledger.check(
        "sqs fifo failure in a group",
        Contract::ordered().duplicates(0),
    );
    // g-0 failed once; the others of g received with it were held back.
    assert_eq!(stats.settled, 6, "{stats:?}");
}

/// Issue 24 item 9. One receive of ten messages on a queue with a 2 s
/// visibility timeout: nine handled at once, one taking 5 s. A second consumer
/// polls the same queue. The fast messages' deletes must not wait for the slow
/// one, and the slow one must stay invisible while its handler runs, so that
/// the second consumer receives nothing twice.
///
/// Failed before the fix: the receive's deletes were made once the slow handler
/// was done, 5 s after the receive, so the second consumer received and handled
/// the nine fast messages again after 2 s, and the slow one too: "10
/// duplicates, at most 0 allowed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_deletes_do_not_wait_for_a_slow_handler() {
    let h = Harness::start_alone().await;
    let instrumenter = h.instrumenter(|b| b);
    let (url, ledger) = ten_on_a_short_timeout(&h, "mixed-speeds", &instrumenter).await;
    let done = Arc::new(AtomicUsize::new(0));
    let slow_started = Arc::new(AtomicUsize::new(0));
    let handler = slow_and_fast(&ledger, &done, &slow_started);
    // Both stop 3 s after the last first success: time for the second to
    // receive whatever became visible again.
    let stop = futures_util::future::FutureExt::shared(Box::pin(stop_after(&done, 10)));
    let consumer = TracedConsumer::new(h.client.clone(), &url, &instrumenter).wait_time_seconds(1);
    let first = consumer.run_until(handler.clone(), stop.clone());
    let second = async {
        when_count(&slow_started, 1).await;
        consumer.run_until(handler.clone(), stop.clone()).await
    };
    let (a, b) = within(60, async { tokio::join!(first, second) }).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    ledger.waiting(waiting(&h, &url).await);
    println!(
        "sqs mixed speeds: consumers settled {} + {}; {} DeleteMessageBatch calls",
        a.settled,
        b.settled,
        consumer.delete_requests()
    );
    ledger.check(
        "sqs slow and fast handlers in one receive, two consumers",
        Contract::at_least_once().duplicates(0),
    );
}

/// Ten numbered messages on a standard queue of the test's own with a 2 s
/// visibility timeout, each recorded in a new ledger as sent (a standard queue
/// keeps no order: each message is its own scope).
async fn ten_on_a_short_timeout(
    h: &Harness,
    base: &str,
    instrumenter: &mqtrace::Instrumenter,
) -> (String, Ledger) {
    let url = h
        .queue(base, &[(QueueAttributeName::VisibilityTimeout, "2".into())])
        .await;
    let ledger = Ledger::new();
    h.send_numbered(&url, 10, instrumenter).await;
    for i in 0..10 {
        ledger.sent(i.to_string(), i.to_string());
    }
    (url, ledger)
}

/// A handler recording in `ledger`: the message `0` takes 5 s, the others none.
fn slow_and_fast(
    ledger: &Ledger,
    done: &Arc<AtomicUsize>,
    slow_started: &Arc<AtomicUsize>,
) -> impl Fn(
    mqtrace_aws_sqs::Received,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = HandlerResult> + Send>>
       + Clone {
    let (ledger, done, slow_started) = (ledger.clone(), Arc::clone(done), Arc::clone(slow_started));
    move |m: mqtrace_aws_sqs::Received| {
        let (ledger, done, slow_started) =
            (ledger.clone(), Arc::clone(&done), Arc::clone(&slow_started));
        Box::pin(async move {
            let body = m.body().to_owned();
            let invocation = ledger.started(body.clone());
            if body == "0" {
                slow_started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            invocation.finished(true);
            if ledger.successes(&body) == 1 {
                done.fetch_add(1, Ordering::SeqCst);
            }
            HandlerResult::Ok(())
        })
    }
}

/// Completes 3 s after `done` reaches `n`.
fn stop_after(done: &Arc<AtomicUsize>, n: usize) -> impl std::future::Future<Output = ()> {
    let all = when_count(done, n);
    async move {
        all.await;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

/// Issue 24 item 9, for a loop of one's own: the same slow message handled
/// through `MessageTracer::process` with `keep_visible`, its visibility extended
/// while the handler runs, and the fast ones deleted by age through
/// `delete_pending`, while a `TracedConsumer` polls the same queue.
///
/// `keep_visible` and `delete_pending` are new, so this cannot run on the code
/// before the fix; with `keep_visible` turned off (a zero duration) it fails:
/// the consumer receives the slow message after 2 s and handles it again, "1
/// duplicates, at most 0 allowed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_own_loop_keeps_a_slow_message_invisible() {
    let h = Harness::start_alone().await;
    let instrumenter = h.instrumenter(|b| b);
    let (url, ledger) = ten_on_a_short_timeout(&h, "own-mixed-speeds", &instrumenter).await;
    let done = Arc::new(AtomicUsize::new(0));
    let slow_started = Arc::new(AtomicUsize::new(0));
    let handler = slow_and_fast(&ledger, &done, &slow_started);
    let stop = futures_util::future::FutureExt::shared(Box::pin(stop_after(&done, 10)));
    let tracer = mqtrace_aws_sqs::MessageTracer::new(h.client.clone(), &url, &instrumenter)
        .keep_visible(Duration::from_secs(2));
    let own = async {
        let messages = h.receive(&url).await;
        let batch = mqtrace_aws_sqs::DeleteBatch::new();
        let handled = futures_util::future::join_all(messages.iter().map(|message| {
            let (tracer, handler, batch) = (&tracer, handler.clone(), &batch);
            async move {
                let received = mqtrace_aws_sqs::Received::from(message.clone());
                let processed = tracer.process(message, |_| handler(received)).await;
                tracer.settle_batched(processed, message, batch).await;
            }
        }));
        let flush = async {
            // Deletes by age, beside the handlers.
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if batch
                    .oldest_age()
                    .is_some_and(|a| a >= Duration::from_millis(250))
                {
                    assert_eq!(tracer.delete_pending(&batch).await, 0);
                }
            }
        };
        tokio::select! {
            _ = handled => {}
            () = flush => {}
        }
        assert_eq!(tracer.delete_pending(&batch).await, 0);
        messages.len()
    };
    let consumer = TracedConsumer::new(h.client.clone(), &url, &instrumenter).wait_time_seconds(1);
    let second = async {
        when_count(&slow_started, 1).await;
        consumer.run_until(handler.clone(), stop.clone()).await
    };
    let (received, b) = within(60, async { tokio::join!(own, second) }).await;
    b.unwrap();
    ledger.waiting(waiting(&h, &url).await);
    println!("sqs own loop, mixed speeds: the own loop received {received}");
    ledger.check(
        "sqs own loop, slow and fast handlers, a consumer beside it",
        Contract::at_least_once().duplicates(0),
    );
}
