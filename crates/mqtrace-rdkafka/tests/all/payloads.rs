//! Payload edges on Kafka: an empty value, bytes that are not UTF-8, and 1 MiB of
//! random bytes (above librdkafka's default `message.max.bytes`, so the clients
//! raise it), each failing once and going through the retry topic before it
//! succeeds. The handler sees the same bytes on every attempt; the spans record
//! each value's size.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mqtrace::HandlerError;
use mqtrace_rdkafka::{TracedConsumer, TracedProducer};
use mqtrace_testing::Kind;
use rdkafka::producer::FutureRecord;

use crate::helpers::{when_count, within, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_binary_and_one_mib_values_survive_a_retry_unchanged() {
    let h = Harness::start().await;
    let (topic, retry) = (h.name("blobs"), h.name("blobs.retry"));
    h.topics(&[&topic, &retry]).await;
    let instrumenter = h.instrumenter(|b| b.body_size(true));
    let mut config = h.config();
    config.set("message.max.bytes", "2000000");
    let producer = TracedProducer::from_config(&config, instrumenter.clone()).unwrap();
    let mut big = vec![0u8; 1 << 20];
    fastrand::fill(&mut big);
    let bodies: Vec<Vec<u8>> = vec![Vec::new(), vec![0xff, 0xfe, 0x00, 0xc3, 0x28], big];
    assert!(std::str::from_utf8(&bodies[1]).is_err());
    for body in &bodies {
        producer
            .send(
                FutureRecord::<str, [u8]>::to(&topic).payload(body.as_slice()),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let seen = Arc::new(Mutex::new(Vec::<(Vec<u8>, bool)>::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let (recorder, counted) = (Arc::clone(&seen), Arc::clone(&calls));
    let mut consumer_config = h.consumer_config();
    consumer_config.set("message.max.bytes", "2000000");
    let forwarder = TracedProducer::from_config(&config, instrumenter.clone()).unwrap();
    let stats = within(
        60,
        TracedConsumer::from_config(&consumer_config, &[&topic, &retry], forwarder, instrumenter)
            .unwrap()
            .retry_topic(&retry)
            .run_until(
                move |r| {
                    let retried = r.topic() != topic;
                    let body = r.payload().unwrap_or_default().to_vec();
                    recorder.lock().unwrap().push((body, retried));
                    counted.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if retried {
                            Ok(())
                        } else {
                            Err(HandlerError::transient("first try fails"))
                        }
                    }
                },
                when_count(&calls, 2 * bodies.len()),
            ),
    )
    .await
    .unwrap();
    assert_eq!(
        (stats.retried, stats.settled, stats.dead_lettered),
        (3, 3, 0)
    );
    let seen = seen.lock().unwrap().clone();
    for body in &bodies {
        let firsts = seen.iter().filter(|(b, r)| b == body && !r).count();
        let retries = seen.iter().filter(|(b, r)| b == body && *r).count();
        assert_eq!((firsts, retries), (1, 1), "{} bytes", body.len());
    }
    let spans = h.spans(4 * bodies.len()).await;
    for body in &bodies {
        let n = body.len() as i64;
        let kinds: Vec<Kind> = spans
            .iter()
            .filter(|s| {
                s.attr("messaging.message.body.size")
                    .and_then(|v| v.as_i64())
                    == Some(n)
            })
            .map(|s| s.kind)
            .collect();
        assert_eq!(kinds.len(), 4, "{n} bytes: {kinds:?}");
        assert_eq!(kinds.iter().filter(|k| **k == Kind::Consumer).count(), 2);
    }
}
