//! A consumer stopped mid-stream and a new one in the same group: it resumes at
//! the last committed offset and no record is lost.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use mqtrace::HandlerResult;

use tokio::sync::Notify;

use crate::helpers::{send_numbered, within, Harness};

const RECORDS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_consumer_resumes_from_the_committed_offset() {
    let h = Harness::start().await;
    let topic = h.name("stream");
    h.topics(&[&topic]).await;
    let instrumenter = h.instrumenter(|b| b);
    let producer = h.producer(&instrumenter);
    send_numbered(&producer, &topic, RECORDS).await;
    let processed = Arc::new(Mutex::new(Vec::<usize>::new()));
    let consume = |stop_after: usize| {
        let processed = Arc::clone(&processed);
        let count = Arc::new(AtomicUsize::new(0));
        // Stops the loop right after the record that reaches `stop_after`, before
        // it takes another.
        let stop = Arc::new(Notify::new());
        let (counted, stopper) = (Arc::clone(&count), Arc::clone(&stop));
        let consumer = h.consumer(&[&topic], &instrumenter);
        async move {
            consumer
                .run_until(
                    move |record| {
                        let (processed, counted, stopper) = (
                            Arc::clone(&processed),
                            Arc::clone(&counted),
                            Arc::clone(&stopper),
                        );
                        async move {
                            let id: usize = record.json()?;
                            processed.lock().unwrap().push(id);
                            if counted.fetch_add(1, Ordering::SeqCst) + 1 == stop_after {
                                stopper.notify_one();
                            }
                            HandlerResult::Ok(())
                        }
                    },
                    async move { stop.notified().await },
                )
                .await
        }
    };
    // The first consumer stops after 12 records, the second takes the rest.
    let first = within(60, consume(12)).await.unwrap();
    assert_eq!(first.settled, 12);
    let second = within(60, consume(RECORDS - 12)).await.unwrap();
    assert_eq!(second.settled, (RECORDS - 12) as u64);

    let processed = processed.lock().unwrap().clone();
    let distinct: BTreeSet<usize> = processed.iter().copied().collect();
    let lost = (0..RECORDS).filter(|i| !distinct.contains(i)).count();
    println!(
        "kafka consumer restart: sent {RECORDS}, processed {} ({} again), lost {lost}",
        processed.len(),
        processed.len() - distinct.len()
    );
    assert_eq!(lost, 0);
    // The second consumer started where the first committed: in order, no rerun.
    assert_eq!(processed, (0..RECORDS).collect::<Vec<_>>());
}
