//! The delivery contract on RabbitMQ (issue 24's defects 1, 2 and 11), each test
//! checked by the delivery ledger (`mqtrace_testing::delivery`): nothing acked
//! before its handler succeeded or its copy was stored, nothing lost.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};
use mqtrace::{Disposition, HandlerError, Instrumenter, Settlement};
use mqtrace_lapin::{declare_exchange, AckCoalescer, DeliveryTracer, QueueSpec, TracedConsumer};
use mqtrace_testing::delivery::{Contract, Ledger, Settled as Seen};

use crate::helpers::{drain_at_least, number_of, publish_numbered, when_count, within, Harness};

/// Records a settlement the way the ledger reads it.
pub(crate) fn seen(ledger: &Ledger, id: &str, settled: &mqtrace::Settled) {
    match (settled.settlement, settled.disposition) {
        (Settlement::Ack, Disposition::Settle) => ledger.settled(id, Seen::Done),
        (Settlement::Ack, _) => ledger.settled(id, Seen::Forwarded),
        _ => {}
    }
}

async fn consume(channel: &Channel, queue: &str) -> lapin::Consumer {
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap()
}

/// Runs `n` numbered messages of `queue` through one delivery each: the handler
/// fails transiently on every one, and each is settled by `tracer`.
async fn fail_each(
    h: &Harness,
    tracer: &DeliveryTracer,
    queue: &str,
    n: usize,
    ledger: &Ledger,
) -> Vec<mqtrace::Settled> {
    let (connection, channel) = h.channel().await;
    let mut deliveries = consume(&channel, queue).await;
    let mut out = Vec::new();
    for _ in 0..n {
        let delivery = within(10, deliveries.next()).await.unwrap().unwrap();
        let id = number_of(&delivery.data).to_string();
        let processed = tracer
            .process(&delivery, |_| {
                let call = ledger.started(&id);
                async move {
                    call.finished(false);
                    Err(HandlerError::transient("dependency down"))
                }
            })
            .await;
        let settled = tracer.settle(processed, delivery, &channel).await;
        seen(ledger, &id, &settled);
        out.push(settled);
    }
    drop(deliveries);
    channel.close(200, "done".into()).await.unwrap();
    connection.close(200, "done".into()).await.unwrap();
    out
}

/// Defect 1: a retry forwarded through an exchange with no binding. Published
/// without `mandatory`, the broker dropped the copy and still confirmed it, and
/// the original was acked: the message was gone (on 3bb4c55 this test found the
/// queue empty, `lost 1`). Now the copy comes back as a return, the forward
/// counts as failed, and the original is requeued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_retry_keeps_the_original() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let (_connection, channel) = h.channel().await;
    let queue = QueueSpec::new(h.name("unroutable-retry"));
    queue.declare(&channel).await.unwrap();
    let nowhere = h.name("retry.nowhere");
    declare_exchange(&channel, &nowhere, ExchangeKind::Direct)
        .await
        .unwrap();
    let ledger = Ledger::new();
    publish_numbered(&channel, &instrumenter, queue.name(), 1).await;
    ledger.sent("0", "");

    let tracer = DeliveryTracer::new(instrumenter, &queue).retry_via(&nowhere, "delay");
    let settled = fail_each(&h, &tracer, queue.name(), 1, &ledger).await;
    assert_eq!(settled[0].settlement, Settlement::Redeliver);
    assert!(settled[0].redelivered);

    let waiting = drain_at_least(&channel, queue.name(), 1).await;
    ledger.waiting(waiting.iter().map(|d| number_of(&d.data).to_string()));
    let a = ledger.check(
        "rabbitmq unroutable retry",
        Contract::at_least_once().duplicates(0),
    );
    assert_eq!((a.sent, a.waiting, a.failed_attempts), (1, 1, 1));
}

/// Defect 1, the dead-letter side: the queue's dead-letter queue was deleted, so
/// its fanout exchange routes nowhere. A spent budget's dead-letter copy used to
/// be dropped and confirmed, then the original acked (gone, counted
/// `dead_lettered`; on 3bb4c55 this test found nothing anywhere). Now the copy is
/// returned and the original requeued; never rejected into the exchange that
/// just refused its copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_with_its_queue_deleted_keeps_the_original() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b.retry_policy(mqtrace::RetryPolicy::attempts(1)));
    let (_connection, channel) = h.channel().await;
    let dlq = h.name("dlq-gone.dead");
    let queue = QueueSpec::new(h.name("dlq-gone")).dead_letter(h.name("dlq-gone.dlx"), &dlq);
    queue.declare(&channel).await.unwrap();
    channel
        .queue_delete(dlq.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let ledger = Ledger::new();
    publish_numbered(&channel, &instrumenter, queue.name(), 1).await;
    ledger.sent("0", "");

    let tracer = DeliveryTracer::new(instrumenter, &queue);
    let settled = fail_each(&h, &tracer, queue.name(), 1, &ledger).await;
    assert_eq!(
        (settled[0].disposition, settled[0].settlement),
        (Disposition::Retry, Settlement::Redeliver)
    );

    let waiting = drain_at_least(&channel, queue.name(), 1).await;
    ledger.waiting(waiting.iter().map(|d| number_of(&d.data).to_string()));
    let a = ledger.check(
        "rabbitmq dead-letter queue deleted",
        Contract::at_least_once().duplicates(0),
    );
    assert_eq!((a.sent, a.waiting, a.dead_lettered), (1, 1, 0));
}

/// Defect 1, the opt-in: a forward on a channel without publisher confirms is
/// not trusted. The original is requeued and the forward span says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_without_confirms_is_not_trusted_unless_asked() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let (_connection, channel) = h.channel().await;
    let queue = QueueSpec::new(h.name("no-confirms"));
    queue.declare(&channel).await.unwrap();
    publish_numbered(&channel, &instrumenter, queue.name(), 2).await;

    let connection = lapin::Connection::connect(&h.url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let plain = connection.create_channel().await.unwrap();
    plain
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let mut deliveries = consume(&plain, queue.name()).await;
    let strict = DeliveryTracer::new(instrumenter.clone(), &queue);
    let trusting = DeliveryTracer::new(instrumenter, &queue).unconfirmed_forwards(true);
    let mut what = Vec::new();
    for tracer in [&strict, &trusting] {
        let delivery = within(10, deliveries.next()).await.unwrap().unwrap();
        let processed = tracer
            .process(&delivery, |_| async {
                Err(HandlerError::transient("dependency down"))
            })
            .await;
        let s = tracer.settle(processed, delivery, &plain).await;
        what.push((s.disposition, s.settlement, s.redelivered));
    }
    assert_eq!(
        what,
        [
            (Disposition::Retry, Settlement::Redeliver, true),
            (Disposition::Retry, Settlement::Ack, false),
        ]
    );
    drop(deliveries);
    plain.close(200, "done".into()).await.unwrap();
    connection.close(200, "done".into()).await.unwrap();
    // The requeued original and the trusted retry copy: both still there.
    assert_eq!(drain_at_least(&channel, queue.name(), 2).await.len(), 2);
}

/// Defect 2: two consumers on one channel, each loop with a coalescer of its
/// own. The first queue's delivery (tag 1) is still in its handler when the
/// second loop acks its five (tags 2-6). On 3bb4c55 the second coalescer sent
/// `basic.ack multiple` up to 6, which acked tag 1 unfinished: once the channel
/// closed, the first queue was empty (`lost 1`). Now a `multiple` never covers a
/// tag its coalescer has not seen, and the unfinished delivery comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coalescer_never_acks_another_consumers_delivery() {
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let (_connection, channel) = h.channel().await;
    let slow = QueueSpec::new(h.name("shared-slow"));
    let fast = QueueSpec::new(h.name("shared-fast"));
    slow.declare(&channel).await.unwrap();
    fast.declare(&channel).await.unwrap();
    let ledger = Ledger::new();
    publish_numbered(&channel, &instrumenter, slow.name(), 1).await;
    ledger.sent("slow-0", "slow");
    publish_numbered(&channel, &instrumenter, fast.name(), 5).await;
    for i in 0..5 {
        ledger.sent(format!("fast-{i}"), "fast");
    }

    let (consumer_connection, shared) = h.channel().await;
    let mut slow_deliveries = consume(&shared, slow.name()).await;
    let held = within(10, slow_deliveries.next()).await.unwrap().unwrap();
    assert_eq!(held.delivery_tag, 1);
    let _slow_call = ledger.started("slow-0");

    let tracer = Arc::new(DeliveryTracer::new(instrumenter, &fast));
    let acks = AckCoalescer::new(shared.clone()).prefetch(2);
    let mut fast_deliveries = consume(&shared, fast.name()).await;
    for _ in 0..5 {
        let delivery = within(10, fast_deliveries.next()).await.unwrap().unwrap();
        acks.arrived(delivery.delivery_tag);
        let id = format!("fast-{}", number_of(&delivery.data));
        let processed = tracer
            .process(&delivery, |_| {
                let call = ledger.started(&id);
                async move {
                    call.finished(true);
                    Ok(())
                }
            })
            .await;
        let settled = tracer.settle_coalesced(processed, delivery, &acks).await;
        seen(&ledger, &id, &settled);
    }
    assert_eq!(acks.flush().await, 0);
    // Let every ack frame reach the broker, then close the channel with the
    // slow delivery unacknowledged.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop((slow_deliveries, fast_deliveries, held));
    shared.close(200, "done".into()).await.unwrap();
    consumer_connection.close(200, "done".into()).await.unwrap();

    let waiting = drain_at_least(&channel, slow.name(), 1).await;
    ledger.waiting(
        waiting
            .iter()
            .map(|d| format!("slow-{}", number_of(&d.data))),
    );
    assert!(
        crate::helpers::drain(&channel, fast.name())
            .await
            .is_empty(),
        "the fast queue's deliveries were all acked"
    );
    let a = ledger.check(
        "rabbitmq two consumers on one channel",
        Contract::at_least_once().duplicates(0),
    );
    assert_eq!((a.processed, a.waiting), (5, 1));
}

/// Defect 11: lapin answers `Ok(false)` to an ack on a closed channel; on
/// 3bb4c55 the delivery counted as settled (`settle_failed` false, no error on
/// the span). Now it is a settle failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_on_a_closed_channel_is_a_settle_failure() {
    let h = Harness::start().await;
    let instrumenter: Instrumenter = h.instrumenter(|b| b);
    let (_connection, channel) = h.channel().await;
    let queue = QueueSpec::new(h.name("closed-ack"));
    queue.declare(&channel).await.unwrap();
    let ledger = Ledger::new();
    publish_numbered(&channel, &instrumenter, queue.name(), 1).await;
    ledger.sent("0", "");

    let (consumer_connection, consumer) = h.channel().await;
    let mut deliveries = consume(&consumer, queue.name()).await;
    let delivery = within(10, deliveries.next()).await.unwrap().unwrap();
    let tracer = DeliveryTracer::new(instrumenter, &queue);
    let processed = tracer
        .process(&delivery, |_| {
            let call = ledger.started("0");
            async move {
                call.finished(true);
                Ok(())
            }
        })
        .await;
    drop(deliveries);
    consumer.close(200, "gone".into()).await.unwrap();
    let settled = tracer.settle(processed, delivery, &consumer).await;
    assert!(settled.settle_failed, "{settled:?}");
    consumer_connection.close(200, "done".into()).await.unwrap();

    // Not acked: the broker hands it out again.
    let waiting = drain_at_least(&channel, queue.name(), 1).await;
    ledger.waiting(waiting.iter().map(|d| number_of(&d.data).to_string()));
    let a = ledger.check(
        "rabbitmq ack on a closed channel",
        Contract::at_least_once().duplicates(0),
    );
    assert_eq!((a.processed, a.waiting), (1, 1));
    let stats_failed = u64::from(settled.settle_failed);
    println!("rabbitmq ack on a closed channel: settle failures {stats_failed}");
}

/// Stop in the middle of a batch (issue 24's stop-mid-flight cell, the full
/// consumer): 20 messages, a prefetch of 10 and 4 handlers at once, each 100 ms;
/// the stop comes once 6 handlers have started, so handlers are running and
/// prefetched deliveries wait unhandled. Every running handler finishes and is
/// acked before the channel closes; whatever was only prefetched goes back to
/// the queue. Nothing lost, nothing handled twice, nothing both handled and
/// still on the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_in_the_middle_of_a_batch_finishes_the_running_handlers() {
    const MESSAGES: usize = 20;
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b);
    let (_connection, channel) = h.channel().await;
    let queue = QueueSpec::new(h.name("stop-mid-batch"));
    queue.declare(&channel).await.unwrap();
    let ledger = Ledger::new();
    publish_numbered(&channel, &instrumenter, queue.name(), MESSAGES).await;
    // No order is promised with 4 handlers at once: each message is its own scope.
    for i in 0..MESSAGES {
        ledger.sent(i.to_string(), i.to_string());
    }

    let started = Arc::new(AtomicUsize::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let running_at_stop = Arc::new(AtomicUsize::new(0));
    let (recording, counted, now_running) =
        (ledger.clone(), Arc::clone(&started), Arc::clone(&running));
    let stop = {
        let (started, running, at_stop) = (
            Arc::clone(&started),
            Arc::clone(&running),
            Arc::clone(&running_at_stop),
        );
        async move {
            when_count(&started, 6).await;
            at_stop.store(running.load(Ordering::SeqCst), Ordering::SeqCst);
        }
    };
    let stats = within(
        30,
        TracedConsumer::new(&h.url, queue.clone(), instrumenter)
            .prefetch(10)
            .concurrency(4)
            .run_until(
                move |message| {
                    let call = recording.started(number_of(message.body()).to_string());
                    now_running.fetch_add(1, Ordering::SeqCst);
                    counted.fetch_add(1, Ordering::SeqCst);
                    let running = Arc::clone(&now_running);
                    async move {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        call.finished(true);
                        running.fetch_sub(1, Ordering::SeqCst);
                        Ok(())
                    }
                },
                stop,
            ),
    )
    .await
    .unwrap();

    ledger.waiting(
        crate::helpers::drain(&channel, queue.name())
            .await
            .iter()
            .map(|d| number_of(&d.data).to_string()),
    );
    let a = ledger.check(
        "rabbitmq stop in the middle of a batch",
        Contract::at_least_once().duplicates(0),
    );
    let running_at_stop = running_at_stop.load(Ordering::SeqCst);
    println!(
        "rabbitmq stop in the middle of a batch: handlers running at the stop {running_at_stop}, \
         started {}, still running after it {}; acked {}",
        started.load(Ordering::SeqCst),
        running.load(Ordering::SeqCst),
        stats.settled
    );
    assert!(
        running_at_stop >= 2,
        "the stop came while handlers ran: {running_at_stop}"
    );
    assert_eq!(
        running.load(Ordering::SeqCst),
        0,
        "every running handler finished before the consumer returned"
    );
    assert!(a.waiting > 0, "prefetched deliveries went back unhandled");
    // Each message in one place: every handled one acked (the coalesced acks
    // flushed at the stop), every other one back on the queue.
    assert_eq!(a.processed + a.waiting, a.sent);
    assert_eq!(stats.settled, a.processed);
}
