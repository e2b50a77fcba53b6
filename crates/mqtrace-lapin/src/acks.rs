//! Coalesced acknowledgements, for the full consumer and own loops alike: one
//! `basic.ack` with `multiple` for a run of settled deliveries, instead of a
//! frame per message.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lapin::options::BasicAckOptions;
use lapin::Channel;

/// How long a settled delivery's ack may wait for others to join it.
const ACK_DELAY: Duration = Duration::from_millis(5);

/// The deliveries of one channel between their arrival and their ack.
///
/// A delivery is *in flight* from its arrival until its handler has finished and
/// it was settled; one settled by an ack is *pending* until its ack is sent. A
/// flush acks, with one `multiple` frame, every pending delivery below the
/// lowest one still in flight, and (unless it is only a run) each pending
/// delivery above it on its own:
/// `multiple` never covers a delivery whose handler is still running, and one
/// rejected on its own (a nack) is no longer outstanding, so a later `multiple`
/// passes over it.
///
/// Nor does a `multiple` cover a delivery tag the batch has not seen: the tags of
/// a channel count up from 1 over every delivery on it, so a tag missing below a
/// settled one belongs to a handler that has not reported its arrival yet, to
/// another consumer on the same channel, or to a `basic.get`. A `multiple` goes
/// only up to the first tag not seen; settled deliveries above it are acked one
/// by one. Settling a delivery counts as its arrival, so a loop that forgets
/// [`AckCoalescer::arrived`] loses only coalescing, never a message.
#[derive(Debug, Default)]
pub(crate) struct AckBatch {
    state: Mutex<State>,
    /// Ack frames sent, across channels: what a test or benchmark compares with
    /// the messages acked.
    frames: Arc<AtomicU64>,
    /// Held by a flush from taking its acks until they are sent, so the frames
    /// of two flushes never cross (a `multiple` overtaken by a later one would
    /// name a delivery the broker no longer knows).
    flushing: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct State {
    in_flight: BTreeSet<u64>,
    pending: BTreeSet<u64>,
    /// Every tag from 1 to this one has been seen (arrived or settled).
    seen_upto: u64,
    /// Tags seen above a gap, waiting for the tags below them.
    seen_ahead: BTreeSet<u64>,
    /// The gap stayed open past [`MAX_AHEAD`] tags: this channel's tags are not
    /// all settled here, so nothing is acked with `multiple` any more.
    shared_channel: bool,
}

/// Tags seen above a gap before the batch concludes the channel is shared.
const MAX_AHEAD: usize = 4096;

impl State {
    fn seen(&mut self, tag: u64) {
        if self.shared_channel || tag <= self.seen_upto {
            return;
        }
        if tag == self.seen_upto + 1 {
            self.seen_upto = tag;
            while self.seen_ahead.first() == Some(&(self.seen_upto + 1)) {
                self.seen_ahead.pop_first();
                self.seen_upto += 1;
            }
            return;
        }
        self.seen_ahead.insert(tag);
        if self.seen_ahead.len() > MAX_AHEAD {
            self.seen_ahead.clear();
            self.shared_channel = true;
            tracing::warn!(target: "mqtrace", below = self.seen_upto + 1, "delivery tags of this channel are settled elsewhere (a second consumer or basic.get on the channel?); acks are sent one by one from now on");
        }
    }

    /// The lowest tag a `multiple` must not reach.
    fn floor(&self) -> u64 {
        let unseen = if self.shared_channel {
            0
        } else {
            self.seen_upto + 1
        };
        self.in_flight
            .first()
            .copied()
            .unwrap_or(u64::MAX)
            .min(unseen)
    }
}

/// The acks one flush sends: a `multiple` up to a tag, and single ones.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Flush {
    pub(crate) multiple: Option<u64>,
    pub(crate) single: Vec<u64>,
    /// Deliveries these frames ack.
    pub(crate) messages: u64,
}

impl AckBatch {
    /// A batch that counts its frames in `frames`.
    pub(crate) fn counting(frames: Arc<AtomicU64>) -> Self {
        Self {
            state: Mutex::default(),
            frames,
            flushing: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent sets behind.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A delivery arrived.
    pub(crate) fn arrived(&self, tag: u64) {
        let mut state = self.state();
        state.seen(tag);
        state.in_flight.insert(tag);
    }

    /// A delivery was settled by an ack, which waits for the next flush: its
    /// handling is over.
    pub(crate) fn acked(&self, tag: u64) {
        let mut state = self.state();
        state.seen(tag);
        state.in_flight.remove(&tag);
        state.pending.insert(tag);
    }

    /// A delivery's handling is over, however it was settled (a nack has been
    /// sent by then).
    pub(crate) fn finished(&self, tag: u64) {
        let mut state = self.state();
        state.seen(tag);
        state.in_flight.remove(&tag);
    }

    /// Acks waiting to be sent.
    pub(crate) fn pending(&self) -> usize {
        self.state().pending.len()
    }

    /// Takes what a flush sends now. Every delivery below the floor (the lowest
    /// in flight, or the first tag not seen) has been settled here: acked
    /// (pending) or nacked on its own.
    /// `singles`: the pending deliveries above the lowest in flight too, each to
    /// be acked on its own; otherwise they stay pending for a later run.
    pub(crate) fn take(&self, singles: bool) -> Flush {
        let mut state = self.state();
        let floor = state.floor();
        let mut above = state.pending.split_off(&floor);
        let below = std::mem::take(&mut state.pending);
        if !singles {
            state.pending = std::mem::take(&mut above);
        }
        Flush {
            multiple: below.last().copied(),
            messages: (below.len() + above.len()) as u64,
            single: above.into_iter().collect(),
        }
    }

    /// Sends what is pending on `channel`. Returns the deliveries whose ack could
    /// not be sent (the broker hands them out again).
    pub(crate) async fn flush(&self, channel: &Channel) -> u64 {
        self.send(channel, true).await
    }

    /// Sends the run below the lowest delivery in flight as one `multiple`, and
    /// leaves the acks above it pending (a later run takes them, or the timed
    /// flush). Returns the deliveries whose ack could not be sent.
    pub(crate) async fn flush_run(&self, channel: &Channel) -> u64 {
        self.send(channel, false).await
    }

    async fn send(&self, channel: &Channel, singles: bool) -> u64 {
        let _one_at_a_time = self.flushing.lock().await;
        let flush = self.take(singles);
        let mut failed = 0;
        let mut send = async |tag: u64, multiple: bool, covers: u64| {
            self.frames.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = channel.basic_ack(tag, BasicAckOptions { multiple }).await {
                tracing::warn!(target: "mqtrace", error = %e, delivery_tag = tag, "cannot acknowledge; the broker delivers again");
                failed += covers;
            }
        };
        let singles = flush.single.len() as u64;
        if let Some(tag) = flush.multiple {
            send(tag, true, flush.messages - singles).await;
        }
        for tag in flush.single {
            send(tag, false, 1).await;
        }
        failed
    }
}

/// Coalesced acks for a consumer loop of your own, on one channel: what
/// [`crate::TracedConsumer`] does. Settle with
/// [`crate::DeliveryTracer::settle_coalesced`]: a delivery settled by an ack
/// joins the pending run, and a task of the coalescer's sends the run as one
/// `basic.ack` with `multiple` within 5 ms, at once when half the prefetch window
/// is pending ([`AckCoalescer::prefetch`]), or when [`AckCoalescer::flush`] says.
/// Nacks go at once. A crash before the ack means redelivery, never loss.
///
/// A loop that hands deliveries to concurrent tasks calls
/// [`AckCoalescer::arrived`] with each delivery tag in the order the stream
/// yields them, so that acks coalesce across deliveries still being handled. A
/// `multiple` never covers a tag the coalescer has not seen arrive or settle:
/// a loop that skips `arrived`, a second consumer on the same channel, or a
/// `basic_get` there cost coalescing (those acks go one by one), never a
/// message. Use one coalescer per channel, made before the channel's first
/// delivery, and one consumer per channel for the acks to coalesce.
///
/// Made inside a tokio runtime; the flushing task ends with the last clone. Call
/// [`AckCoalescer::flush`] before dropping it or closing the channel: acks still
/// pending then are not sent, and their deliveries come again.
#[derive(Debug, Clone)]
pub struct AckCoalescer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    batch: AckBatch,
    channel: Channel,
    wake: Arc<tokio::sync::Notify>,
    /// Pending acks that are sent at once rather than after the delay.
    flush_at: std::sync::atomic::AtomicUsize,
}

impl AckCoalescer {
    /// Coalesces the acks of deliveries from `channel`.
    pub fn new(channel: Channel) -> Self {
        Self::counting(channel, Arc::default())
    }

    /// A coalescer that counts its frames in `frames` (the full consumer's,
    /// across its connections).
    pub(crate) fn counting(channel: Channel, frames: Arc<AtomicU64>) -> Self {
        let wake = Arc::new(tokio::sync::Notify::new());
        let shared = Arc::new(Shared {
            batch: AckBatch::counting(frames),
            channel,
            wake: Arc::clone(&wake),
            flush_at: std::sync::atomic::AtomicUsize::new(5),
        });
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            loop {
                // The first ack of a run wakes the task; a tick now and then tells
                // it whether the coalescer is gone.
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                match weak.upgrade() {
                    Some(shared) if shared.batch.pending() > 0 => {}
                    Some(_) => continue,
                    None => break,
                }
                tokio::time::sleep(ACK_DELAY).await;
                let Some(shared) = weak.upgrade() else { break };
                shared.batch.flush(&shared.channel).await;
            }
        });
        Self { shared }
    }

    /// The channel's prefetch count (`basic_qos`; default taken: 10): half of it
    /// settled is acked at once rather than after the delay, so the broker
    /// keeps delivering while a run waits.
    pub fn prefetch(self, count: u16) -> Self {
        self.shared
            .flush_at
            .store(usize::from(count / 2).max(1), Ordering::Relaxed);
        self
    }

    /// A delivery was taken from the consumer's stream: call in the stream's
    /// order before handing it to a concurrent task.
    pub fn arrived(&self, delivery_tag: u64) {
        self.shared.batch.arrived(delivery_tag);
    }

    /// Sends the pending acks now (before closing the channel, say). Returns the
    /// deliveries whose ack could not be sent: the broker delivers them again.
    pub async fn flush(&self) -> u64 {
        self.shared.batch.flush(&self.shared.channel).await
    }

    /// `basic.ack` frames sent so far.
    pub fn frames(&self) -> u64 {
        self.shared.batch.frames.load(Ordering::Relaxed)
    }

    pub(crate) fn batch(&self) -> &AckBatch {
        &self.shared.batch
    }

    pub(crate) fn channel(&self) -> &Channel {
        &self.shared.channel
    }

    /// After a settlement: half the prefetch window pending is sent now, less
    /// by the flushing task within [`ACK_DELAY`].
    pub(crate) async fn settled(&self) {
        let pending = self.shared.batch.pending();
        if pending >= self.shared.flush_at.load(Ordering::Relaxed) {
            self.shared.batch.flush_run(&self.shared.channel).await;
        }
        if self.shared.batch.pending() > 0 {
            self.shared.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(arrived: &[u64]) -> AckBatch {
        let b = AckBatch::default();
        for t in arrived {
            b.arrived(*t);
        }
        b
    }

    #[test]
    fn in_order_acks_go_out_as_one_multiple() {
        let b = batch(&[1, 2, 3]);
        for t in [1, 2, 3] {
            b.acked(t);
        }
        assert_eq!(
            b.take(true),
            Flush {
                multiple: Some(3),
                single: vec![],
                messages: 3
            }
        );
        assert_eq!(b.pending(), 0);
        assert_eq!(b.take(true).messages, 0);
    }

    #[test]
    fn a_delivery_still_handled_bounds_the_multiple() {
        // 3 is still running: 1 and 2 go as a multiple, 4 and 5 on their own.
        let b = batch(&[1, 2, 3, 4, 5]);
        for t in [1, 2, 4, 5] {
            b.acked(t);
        }
        assert_eq!(
            b.take(true),
            Flush {
                multiple: Some(2),
                single: vec![4, 5],
                messages: 4
            }
        );
        b.acked(3);
        assert_eq!(b.take(true).multiple, Some(3));
    }

    #[test]
    fn a_run_leaves_the_acks_above_a_delivery_still_handled() {
        let b = batch(&[1, 2, 3, 4]);
        for t in [1, 2, 4] {
            b.acked(t);
        }
        assert_eq!(
            b.take(false),
            Flush {
                multiple: Some(2),
                single: vec![],
                messages: 2
            }
        );
        assert_eq!(b.pending(), 1, "4 waits for 3");
        b.acked(3);
        assert_eq!(b.take(false).multiple, Some(4));
    }

    #[test]
    fn a_nacked_delivery_is_passed_over() {
        // 2 was nacked on its own (finished without an ack): the multiple up to 3
        // no longer covers it at the broker, and is not held back by it.
        let b = batch(&[1, 2, 3]);
        b.acked(1);
        b.finished(2);
        b.acked(3);
        assert_eq!(
            b.take(true),
            Flush {
                multiple: Some(3),
                single: vec![],
                messages: 2
            }
        );
    }

    #[test]
    fn a_tag_never_seen_bounds_the_multiple() {
        // 3 was handed to a task that did not report its arrival (or belongs to
        // another consumer of the channel): nothing at or above it goes as a
        // `multiple`, which would ack it unfinished.
        let b = batch(&[1, 2, 4]);
        for t in [1, 2, 4] {
            b.acked(t);
        }
        assert_eq!(
            b.take(true),
            Flush {
                multiple: Some(2),
                single: vec![4],
                messages: 3
            }
        );
    }

    #[test]
    fn settling_counts_as_arriving() {
        // A loop that never calls `arrived`: 2 settles before 1, so 2 waits (or
        // goes alone) until 1 is settled too.
        let b = AckBatch::default();
        b.acked(2);
        assert_eq!(b.take(false).multiple, None);
        assert_eq!(b.pending(), 1);
        b.acked(1);
        assert_eq!(
            b.take(false),
            Flush {
                multiple: Some(2),
                single: vec![],
                messages: 2
            }
        );
    }

    #[test]
    fn a_gap_that_never_closes_turns_multiple_off() {
        // Tag 1 is another consumer's; after MAX_AHEAD tags the batch stops
        // waiting for it and acks one by one.
        let b = AckBatch::default();
        for t in 2..(MAX_AHEAD as u64 + 3) {
            b.acked(t);
        }
        let flush = b.take(true);
        assert_eq!(flush.multiple, None);
        assert_eq!(flush.single.len(), MAX_AHEAD + 1);
        assert!(b.state().shared_channel);
        assert!(b.state().seen_ahead.is_empty(), "bounded");
        b.acked(1);
        assert_eq!(b.take(true).multiple, None);
    }

    #[test]
    fn nothing_pending_sends_nothing() {
        let b = batch(&[1]);
        assert_eq!(
            b.take(true),
            Flush {
                multiple: None,
                single: vec![],
                messages: 0
            }
        );
    }
}
