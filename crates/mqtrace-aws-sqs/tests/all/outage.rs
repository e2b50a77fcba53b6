//! The SQS endpoint goes away mid-stream and comes back, under a consumer and
//! under a producer. The emulator keeps no state across a restart, so the outage
//! is made by a proxy in front of it that stops listening (connections refused,
//! open ones closed) and listens again: what the client sees of a killed and
//! restarted endpoint. Each test accounts for every message sent.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;
use mqtrace::HandlerResult;
use mqtrace_aws_sqs::{TracedConsumer, TracedSqs};
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
    }
    let processed = Arc::new(Mutex::new(Vec::<usize>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let all_seen = Arc::new(tokio::sync::Notify::new());
    let consumer = TracedConsumer::new(through_proxy, &url, &instrumenter)
        .wait_time_seconds(1)
        .max_messages(2)
        .receive_spans(false, false);
    let run = {
        let (processed, count, all_seen) = (
            Arc::clone(&processed),
            Arc::clone(&count),
            Arc::clone(&all_seen),
        );
        tokio::spawn(async move {
            consumer
                .run_until(
                    move |m| {
                        let (processed, count) = (Arc::clone(&processed), Arc::clone(&count));
                        async move {
                            processed.lock().unwrap().push(m.json()?);
                            count.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(20)).await;
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
            let distinct: BTreeSet<usize> = processed.lock().unwrap().iter().copied().collect();
            if distinct.len() == MESSAGES && on_queue(&h, &url).await == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    all_seen.notify_one();
    let stats = within(30, run).await.unwrap().unwrap();
    let processed = processed.lock().unwrap().clone();
    let distinct: BTreeSet<usize> = processed.iter().copied().collect();
    let lost = (0..MESSAGES).filter(|i| !distinct.contains(i)).count();
    let waiting = on_queue(&h, &url).await;
    println!(
        "sqs endpoint down under the consumer: sent {MESSAGES}, {done_at_cut} done when it went; \
         processed {} ({} duplicates), waiting {waiting}, dead-lettered 0, lost {lost}; \
         failed receives {}, failed deletes {}",
        processed.len(),
        processed.len() - distinct.len(),
        stats.receive_failures,
        stats.settle_failures
    );
    assert_eq!(lost, 0);
    assert_eq!(waiting, 0);
    // (The SDK's own retries absorb part of the outage; what they do not is
    // counted here.)
    assert!(
        stats.receive_failures + stats.settle_failures > 0,
        "the outage was seen by the consumer"
    );
    assert_eq!(stats.settled as usize, processed.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_side_endpoint_down_and_back() {
    let h = Harness::start().await;
    let proxy = proxy_to_sqs().await;
    let through_proxy = client(&format!("http://{}", proxy.addr()));
    let url = h.queue("payments", &[]).await;
    let instrumenter = h.instrumenter(|b| b);
    let producer = Arc::new(TracedSqs::new(through_proxy.clone(), instrumenter.clone()));
    let acked = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let send_all = {
        let (producer, url, acked, failed) = (
            Arc::clone(&producer),
            url.clone(),
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
                acked.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    within(60, when_count(&acked, 10)).await;
    outage(&proxy).await;
    within(120, send_all).await.unwrap();
    let stored: Vec<usize> = h
        .drain(&url)
        .await
        .iter()
        .map(|m| m.body().unwrap().parse().unwrap())
        .collect();
    let distinct: BTreeSet<usize> = stored.iter().copied().collect();
    let lost = (0..MESSAGES).filter(|i| !distinct.contains(i)).count();
    let failed = failed.load(Ordering::SeqCst);
    println!(
        "sqs endpoint down under the producer: sent {MESSAGES}, failed attempts {failed}, \
         stored {} ({} duplicates), lost {lost}",
        stored.len(),
        stored.len() - distinct.len()
    );
    assert_eq!(lost, 0);
    assert!(failed > 0, "the outage was seen by the producer");
    let spans = h.spans(MESSAGES + failed).await;
    let errors = spans
        .iter()
        .filter(|s| matches!(s.status, SpanStatus::Error(_)))
        .count();
    assert_eq!(errors, failed, "each failed attempt is an Error span");
}
