//! Delivery guarantees of the full consumer on the SQS emulator, checked with
//! `mqtrace_testing::delivery`: FIFO order across failures.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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
