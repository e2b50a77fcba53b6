//! Payload edges on RabbitMQ: an empty body, bytes that are not UTF-8, and 1 MiB
//! of random bytes, each failing once and retried (republished by the consumer)
//! before it succeeds. The handler sees the same bytes on every attempt; the spans
//! record each body's size.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use mqtrace::HandlerError;
use mqtrace_lapin::{QueueSpec, TracedConsumer, TracedPublisher};
use mqtrace_testing::Kind;

use crate::helpers::{drain, when_count, within, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_binary_and_one_mib_bodies_survive_a_retry_unchanged() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b.body_size(true));
    let (_connection, channel) = h.channel().await;
    let queue = QueueSpec::new(h.name("blobs")).dead_letter(h.name("b.dlx"), h.name("b.dead"));
    queue.declare(&channel).await.unwrap();
    let mut big = vec![0u8; 1 << 20];
    fastrand::fill(&mut big);
    let bodies: Vec<Vec<u8>> = vec![Vec::new(), vec![0xff, 0xfe, 0x00, 0xc3, 0x28], big];
    assert!(std::str::from_utf8(&bodies[1]).is_err());
    let publisher = TracedPublisher::new(channel.clone(), instrumenter.clone());
    for body in &bodies {
        let c = publisher
            .publish(
                "".into(),
                queue.name().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
        assert!(c.is_ack());
    }
    // Every delivery: (body, attempt number as the handler saw it).
    let seen = Arc::new(Mutex::new(Vec::<(Vec<u8>, bool)>::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let (recorder, counted) = (Arc::clone(&seen), Arc::clone(&calls));
    let stats = within(
        60,
        TracedConsumer::new(&h.url, queue.clone(), instrumenter).run_until(
            move |m| {
                let retried = m.header("mqtrace-attempt").is_some();
                recorder.lock().unwrap().push((m.body().to_vec(), retried));
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
    assert!(drain(&channel, queue.name()).await.is_empty());
    let seen = seen.lock().unwrap().clone();
    for body in &bodies {
        let firsts = seen.iter().filter(|(b, r)| b == body && !r).count();
        let retries = seen.iter().filter(|(b, r)| b == body && *r).count();
        assert_eq!((firsts, retries), (1, 1), "{} bytes", body.len());
    }
    // send + process + retry send + process, per body: sizes exact on every span.
    let spans = h.spans(4 * bodies.len()).await;
    for body in &bodies {
        let n = body.len() as i64;
        let with_size = spans
            .iter()
            .filter(|s| {
                s.attr("messaging.message.body.size")
                    .and_then(|v| v.as_i64())
                    == Some(n)
            })
            .map(|s| s.kind)
            .collect::<Vec<_>>();
        assert_eq!(with_size.len(), 4, "{n} bytes: {with_size:?}");
        assert_eq!(
            with_size.iter().filter(|k| **k == Kind::Consumer).count(),
            2
        );
    }
}
