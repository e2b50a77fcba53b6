//! A consumer stopped mid-stream and a new one in the same group: it resumes at
//! the last committed offset and no record is lost, handled twice or out of
//! order (the delivery checker's line).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use mqtrace::HandlerResult;
use mqtrace_testing::delivery::{Contract, Ledger};
use tokio::sync::Notify;

use crate::helpers::{committed_offset, send_numbered, within, Harness};

const RECORDS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_consumer_resumes_from_the_committed_offset() {
    let h = Harness::start().await;
    let topic = h.name("stream");
    h.topics(&[&topic]).await;
    let instrumenter = h.instrumenter(|b| b);
    let producer = h.producer(&instrumenter);
    send_numbered(&producer, &topic, RECORDS).await;
    let ledger = Ledger::new();
    for i in 0..RECORDS {
        ledger.sent(i.to_string(), "0");
    }
    let processed = Arc::new(Mutex::new(Vec::<usize>::new()));
    let consume = |stop_after: usize| {
        let (processed, ledger) = (Arc::clone(&processed), ledger.clone());
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
                        let (processed, counted, stopper, ledger) = (
                            Arc::clone(&processed),
                            Arc::clone(&counted),
                            Arc::clone(&stopper),
                            ledger.clone(),
                        );
                        async move {
                            let id: usize = record.json()?;
                            ledger.started(id.to_string()).finished(true);
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

    let committed = committed_offset(&h, &topic).await;
    ledger.committed("0", committed);
    ledger.waiting((committed.max(0)..RECORDS as i64).map(|i| i.to_string()));
    ledger.check("kafka consumer restart", Contract::ordered().duplicates(0));
    assert_eq!(committed, RECORDS as i64);
    // The second consumer started where the first committed: in order, no rerun.
    let processed = processed.lock().unwrap().clone();
    assert_eq!(processed, (0..RECORDS).collect::<Vec<_>>());
}
