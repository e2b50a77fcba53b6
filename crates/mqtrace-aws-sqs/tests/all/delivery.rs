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

/// Issue 24's matrix, stop in the middle of a batch. A FIFO queue with one
/// group: ten messages arrive in one receive and are handled in order, 100 ms
/// each; the full consumer is told to stop while the third handler runs. It
/// promises to finish the receive it is in and settle it (a stop is checked
/// between receives only): the rest of the receive is handled in order and
/// every handled message deleted, nothing handled after a later message of the
/// group, and nothing received again. A consumer restarted on the queue past
/// the visibility timeout handles whatever the first left; it must find
/// nothing already handled, which `duplicates(0)` checks.
///
/// Checked to fail: with the first consumer's run dropped when the stop is
/// signalled (a stop that abandons its receive), the restarted consumer
/// received the whole group again, `m-0` and `m-1` handled twice and the
/// emulator handing `m-9` out first: "processed 10 (2 duplicates) ...
/// reordered 7", failing on the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_fifo_receive_settles_that_receive_in_order() {
    const MESSAGES: usize = 10;
    const STOP_AT: usize = 3;
    let h = Harness::start().await;
    let url = h
        .queue(
            "stop-mid-batch.fifo",
            &[
                (QueueAttributeName::FifoQueue, "true".into()),
                (QueueAttributeName::ContentBasedDeduplication, "true".into()),
                (QueueAttributeName::VisibilityTimeout, "2".into()),
            ],
        )
        .await;
    let instrumenter = h.instrumenter(|b| b);
    let ledger = Ledger::new();
    for i in 0..MESSAGES {
        let body = format!("m-{i}");
        h.client
            .send_message()
            .queue_url(&url)
            .message_group_id("g")
            .message_body(&body)
            .send()
            .await
            .unwrap();
        ledger.sent(body, "g");
    }
    let started = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    let handler = {
        let (ledger, started, stop) = (ledger.clone(), Arc::clone(&started), Arc::clone(&stop));
        move |m: mqtrace_aws_sqs::Received| {
            let (ledger, started, stop) = (ledger.clone(), Arc::clone(&started), Arc::clone(&stop));
            async move {
                let invocation = ledger.started(m.body());
                // The stop is asked for while this handler runs.
                if started.fetch_add(1, Ordering::SeqCst) + 1 == STOP_AT {
                    stop.notify_one();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                invocation.finished(true);
                HandlerResult::Ok(())
            }
        }
    };
    let consumer = TracedConsumer::new(h.client.clone(), &url, &instrumenter).wait_time_seconds(1);
    let first_receive = std::time::Instant::now();
    let first = within(
        60,
        consumer.run_until(handler.clone(), {
            let stop = Arc::clone(&stop);
            async move { stop.notified().await }
        }),
    )
    .await
    .unwrap();
    let by_first = started.load(Ordering::SeqCst);
    // Restarted: runs until a receive past the first's visibility timeout.
    let restart = tokio::time::Instant::from_std(first_receive) + Duration::from_millis(3_500);
    let second = within(
        60,
        consumer.run_until(handler, tokio::time::sleep_until(restart)),
    )
    .await
    .unwrap();
    ledger.waiting(waiting(&h, &url).await);
    let a = ledger.check(
        "sqs fifo, stopped in the middle of a receive",
        Contract::ordered().duplicates(0),
    );
    println!(
        "sqs fifo stop mid-receive: stop asked at handler {STOP_AT}; the stopped consumer \
         handled {by_first} and settled {}, the restarted one settled {}",
        first.settled, second.settled
    );
    // The stop really came in the middle of a receive, and that receive was
    // finished and settled, not abandoned.
    assert!(by_first > STOP_AT, "the stop came after the receive");
    assert_eq!(first.settled as usize, by_first, "{first:?}");
    assert_eq!(a.waiting, 0);
}

/// Issue 24's matrix, dead-letter destination missing. The consumer's
/// dead-letter queue has been deleted; message `1` fails permanently. Its copy
/// cannot be sent, so it must stay on its queue (handed back, never deleted)
/// and come back after the visibility timeout; the others are handled. The
/// consumer stops once `1` has failed twice (it came back); what is left is
/// drained.
///
/// Checked to fail: without `dead_letter_queue` the consumer drops a permanent
/// failure (deletes it, `dropped`), and the checker says "lost [\"1\"]".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dead_letter_queue_leaves_the_message_on_its_queue() {
    let h = Harness::start().await;
    let url = h
        .queue(
            "dead-gone",
            &[(QueueAttributeName::VisibilityTimeout, "1".into())],
        )
        .await;
    let dead = h.queue("dead-gone-dlq", &[]).await;
    h.client
        .delete_queue()
        .queue_url(&dead)
        .send()
        .await
        .unwrap();
    let instrumenter = h.instrumenter(|b| b);
    let ledger = Ledger::new();
    h.send_numbered(&url, 3, &instrumenter).await;
    for i in 0..3 {
        ledger.sent(i.to_string(), i.to_string());
    }
    let failed = Arc::new(AtomicUsize::new(0));
    let (recording, failing) = (ledger.clone(), Arc::clone(&failed));
    let stats = within(
        60,
        TracedConsumer::new(h.client.clone(), &url, &instrumenter)
            .dead_letter_queue(&dead)
            .wait_time_seconds(1)
            .run_until(
                move |m| {
                    let (ledger, failing) = (recording.clone(), Arc::clone(&failing));
                    async move {
                        let invocation = ledger.started(m.body());
                        let ok = m.body() != "1";
                        invocation.finished(ok);
                        if ok {
                            return Ok(());
                        }
                        failing.fetch_add(1, Ordering::SeqCst);
                        Err(HandlerError::permanent("malformed order"))
                    }
                },
                // Once `1` came back and failed again; or, should it not come
                // back, 3 s (three visibility timeouts) after its first failure.
                {
                    let (again, once) = (when_count(&failed, 2), when_count(&failed, 1));
                    async move {
                        tokio::select! {
                            () = again => {}
                            () = async {
                                once.await;
                                tokio::time::sleep(Duration::from_secs(3)).await;
                            } => {}
                        }
                    }
                },
            ),
    )
    .await
    .unwrap();
    // Left with its visibility timeout running: visible again after it.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    ledger.waiting(waiting(&h, &url).await);
    let a = ledger.check("sqs dead-letter queue missing", Contract::at_least_once());
    println!(
        "sqs dead-letter queue missing: consumer settled {}, dead-lettered {}, dropped {}, \
         handed back after a failed forward {}",
        stats.settled, stats.dead_lettered, stats.dropped, stats.redelivered
    );
    assert_eq!((a.processed, a.waiting, a.dead_lettered), (2, 1, 0));
    assert!(a.failed_attempts >= 2, "{a:?}");
    assert_eq!((stats.dead_lettered, stats.dropped), (0, 0), "{stats:?}");
    assert_eq!(stats.redelivered, a.failed_attempts, "{stats:?}");
}
