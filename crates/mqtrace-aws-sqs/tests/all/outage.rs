//! The SQS endpoint goes away mid-stream and comes back, under a consumer and
//! under a producer. The emulator keeps no state across a restart, so the outage
//! is made by a proxy in front of it that stops listening (connections refused,
//! open ones closed) and listens again: what the client sees of a killed and
//! restarted endpoint. Each test accounts for every message sent through the
//! delivery checker (`mqtrace_testing::delivery`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;
use mqtrace::HandlerResult;
use mqtrace_aws_sqs::{TracedConsumer, TracedSqs};
use mqtrace_testing::delivery::{Contract, Ledger};
use mqtrace_testing::faults::{Mode, Proxy};
use mqtrace_testing::{brokers, SpanStatus};

use crate::helpers::{client, when_count, within, Harness};

const MESSAGES: usize = 40;

async fn proxy_to_sqs() -> Proxy {
    let endpoint = brokers::sqs_endpoint();
    let host_port = endpoint.trim_start_matches("http://");
    let upstream: SocketAddr = host_port.parse().unwrap();
    Proxy::start(upstream).await.unwrap()
}

/// Refuses connections for six seconds, then forwards again: longer than the
/// SDK's own retries (three attempts, a few seconds), so the library sees failures.
async fn outage(proxy: &Proxy) {
    proxy.set(Mode::Refuse);
    tokio::time::sleep(Duration::from_secs(6)).await;
    proxy.set(Mode::Forward);
}

/// Messages on the queue, visible or in flight.
async fn on_queue(h: &Harness, url: &str) -> usize {
    let attrs = h
        .client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .unwrap();
    attrs
        .attributes()
        .into_iter()
        .flatten()
        .map(|(_, v)| v.parse::<usize>().unwrap())
        .sum()
}

/// The message ids `0`..`MESSAGES` of a standard queue: no order is promised,
/// so each is its own scope in the ledger.
fn scope(id: usize) -> String {
    id.to_string()
}

/// The bodies left on `url`, now visible.
async fn bodies_left(h: &Harness, url: &str) -> Vec<String> {
    h.drain(url)
        .await
        .iter()
        .filter_map(|m| m.body().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_side_endpoint_down_and_back() {
    let h = Harness::start().await;
    let proxy = proxy_to_sqs().await;
    let through_proxy = client(&format!("http://{}", proxy.addr()));
    let url = h
        .queue(
            "orders",
            &[(QueueAttributeName::VisibilityTimeout, "2".into())],
        )
        .await;
    let instrumenter = h.instrumenter(|b| b);
    let producer = TracedSqs::new(h.client.clone(), instrumenter.clone());
    let ledger = Ledger::new();
    for i in 0..MESSAGES {
        producer
            .send(
                h.client
                    .send_message()
                    .queue_url(&url)
                    .message_body(i.to_string()),
            )
            .await
            .unwrap();
        ledger.sent(i.to_string(), scope(i));
    }
    let count = Arc::new(AtomicUsize::new(0));
    let all_seen = Arc::new(tokio::sync::Notify::new());
    let consumer = TracedConsumer::new(through_proxy, &url, &instrumenter)
        .wait_time_seconds(1)
        .max_messages(2)
        .receive_spans(false, false);
    let run = {
        let (ledger, count, all_seen) = (ledger.clone(), Arc::clone(&count), Arc::clone(&all_seen));
        tokio::spawn(async move {
            consumer
                .run_until(
                    move |m| {
                        let (ledger, count) = (ledger.clone(), Arc::clone(&count));
                        async move {
                            let id: usize = m.json()?;
                            let invocation = ledger.started(id.to_string());
                            count.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            invocation.finished(true);
                            HandlerResult::Ok(())
                        }
                    },
                    async move { all_seen.notified().await },
                )
                .await
        })
    };
    within(60, when_count(&count, 10)).await;
    let done_at_cut = count.load(Ordering::SeqCst);
    outage(&proxy).await;
    // Every message processed, and the queue empty (nothing waiting or in flight).
    within(120, async {
        loop {
            if ledger.accounting().processed == MESSAGES as u64 && on_queue(&h, &url).await == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    all_seen.notify_one();
    let stats = within(30, run).await.unwrap().unwrap();
    ledger.waiting(bodies_left(&h, &url).await);
    let a = ledger.check(
        "sqs endpoint down under the consumer",
        Contract::at_least_once(),
    );
    println!(
        "sqs endpoint down under the consumer: {done_at_cut} invocations when it went; \
         failed receives {}, failed deletes {}",
        stats.receive_failures, stats.settle_failures
    );
    assert_eq!(a.waiting, 0);
    assert_eq!(on_queue(&h, &url).await, 0, "nothing left in flight");
    // (The SDK's own retries absorb part of the outage; what they do not is
    // counted here.)
    assert!(
        stats.receive_failures + stats.settle_failures > 0,
        "the outage was seen by the consumer"
    );
    // Every successful invocation, duplicates included, was settled.
    assert_eq!(stats.settled, a.processed + a.duplicates);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_side_endpoint_down_and_back() {
    let h = Harness::start().await;
    let proxy = proxy_to_sqs().await;
    let through_proxy = client(&format!("http://{}", proxy.addr()));
    let url = h.queue("payments", &[]).await;
    let instrumenter = h.instrumenter(|b| b);
    let producer = Arc::new(TracedSqs::new(through_proxy.clone(), instrumenter.clone()));
    let ledger = Ledger::new();
    let acked = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let send_all = {
        let (producer, url, ledger, acked, failed) = (
            Arc::clone(&producer),
            url.clone(),
            ledger.clone(),
            Arc::clone(&acked),
            Arc::clone(&failed),
        );
        tokio::spawn(async move {
            for i in 0..MESSAGES {
                // A failed send is an Error span and an error handed back; the
                // application sends again.
                while producer
                    .send(
                        through_proxy
                            .send_message()
                            .queue_url(&url)
                            .message_body(i.to_string()),
                    )
                    .await
                    .is_err()
                {
                    failed.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                ledger.sent(i.to_string(), scope(i));
                acked.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    within(60, when_count(&acked, 10)).await;
    outage(&proxy).await;
    within(120, send_all).await.unwrap();
    // What the queue stored, read back: each copy counts as a successful
    // handling (a send retried after a lost answer stores a duplicate).
    for body in bodies_left(&h, &url).await {
        ledger.started(body).finished(true);
    }
    ledger.check(
        "sqs endpoint down under the producer (the queue read back)",
        Contract::at_least_once(),
    );
    let failed = failed.load(Ordering::SeqCst);
    println!("sqs endpoint down under the producer: failed send attempts {failed}");
    assert!(failed > 0, "the outage was seen by the producer");
    let spans = h.spans(MESSAGES + failed).await;
    let errors = spans
        .iter()
        .filter(|s| matches!(s.status, SpanStatus::Error(_)))
        .count();
    assert_eq!(errors, failed, "each failed attempt is an Error span");
}
