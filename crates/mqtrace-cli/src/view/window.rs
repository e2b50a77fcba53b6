//! The traces `view` keeps, bounded by traces and spans, and the snapshots the
//! ticks and the page take of them.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqtrace_testing::RecordedSpan;

/// One trace in the window. Its spans are shared with the snapshots the ticks
/// and the page take, never copied.
#[derive(Debug)]
struct Trace {
    spans: Vec<Arc<RecordedSpan>>,
    last_arrival: Instant,
    /// The number it is shown with, from 1 in order of arrival.
    number: usize,
    printed: usize,
    /// The journeys whose first hop is in this trace (their keys in
    /// `journey_numbers`), forgotten with it.
    journeys: Vec<String>,
}

/// The traces kept: at most `max` traces and `max_spans` spans, oldest traces
/// dropped first.
#[derive(Debug)]
pub(crate) struct Window {
    traces: HashMap<String, Trace>,
    pub(crate) order: VecDeque<String>,
    pub(crate) max: usize,
    pub(crate) max_spans: usize,
    /// Spans kept, in all traces.
    kept: usize,
    pub(crate) dropped: u64,
    /// Whether a trace was dropped to make room for spans, not for traces.
    pub(crate) dropped_for_spans: bool,
    /// Spans of traces that alone reached `max_spans`, not kept.
    pub(crate) dropped_spans: u64,
    pub(crate) received: u64,
    next_number: usize,
    journey_numbers: HashMap<String, usize>,
    next_journey: usize,
    /// Counts changes, so that an unchanged window is not worked out again.
    version: u64,
}

/// The window's spans at one moment, shared with it: taken under the lock
/// without copying a span, worked on after it.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) spans: Vec<Arc<RecordedSpan>>,
    /// The number each span's trace is shown with.
    pub(crate) numbers: Vec<usize>,
    pub(crate) dropped: u64,
    pub(crate) dropped_spans: u64,
}

impl Window {
    pub(crate) fn new(max: usize, max_spans: usize) -> Self {
        Self {
            traces: HashMap::new(),
            order: VecDeque::new(),
            max,
            max_spans,
            kept: 0,
            dropped: 0,
            dropped_for_spans: false,
            dropped_spans: 0,
            received: 0,
            next_number: 1,
            journey_numbers: HashMap::new(),
            next_journey: 1,
            version: 0,
        }
    }

    pub(crate) fn add(&mut self, spans: Vec<RecordedSpan>, now: Instant) {
        self.received += spans.len() as u64;
        self.version += 1;
        for span in spans {
            // Room for the span: the oldest other traces go first; a trace that
            // holds the whole allowance keeps what it has.
            while self.kept >= self.max_spans {
                let Some(at) = self.order.iter().position(|id| *id != span.trace_id) else {
                    break;
                };
                self.drop_trace(at);
                self.dropped_for_spans = true;
            }
            let trace = match self.traces.entry(span.trace_id.clone()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    self.order.push_back(span.trace_id.clone());
                    self.next_number += 1;
                    e.insert(Trace {
                        spans: Vec::new(),
                        last_arrival: now,
                        number: self.next_number - 1,
                        printed: 0,
                        journeys: Vec::new(),
                    })
                }
            };
            trace.last_arrival = now;
            if self.kept >= self.max_spans {
                self.dropped_spans += 1;
                continue;
            }
            trace.spans.push(Arc::new(span));
            self.kept += 1;
        }
        while self.order.len() > self.max {
            self.drop_trace(0);
        }
    }

    /// Forgets the trace at `at` in arrival order, with its journeys' numbers.
    pub(crate) fn drop_trace(&mut self, at: usize) {
        let Some(id) = self.order.remove(at) else {
            return;
        };
        if let Some(trace) = self.traces.remove(&id) {
            self.kept -= trace.spans.len();
            for journey in &trace.journeys {
                self.journey_numbers.remove(journey);
            }
        }
        self.dropped += 1;
    }

    #[cfg(test)]
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    #[cfg(test)]
    pub(crate) fn dropped_spans(&self) -> u64 {
        self.dropped_spans
    }

    /// Spans kept, in all traces.
    #[cfg(test)]
    pub(crate) fn span_count(&self) -> usize {
        self.kept
    }

    /// Journeys that keep a number.
    #[cfg(test)]
    pub(crate) fn journey_count(&self) -> usize {
        self.journey_numbers.len()
    }

    /// Changes so far: equal versions, equal windows.
    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    /// The spans kept, in arrival order of their traces, shared (not copied).
    pub(crate) fn snapshot(&self) -> Snapshot {
        let mut spans = Vec::with_capacity(self.kept);
        let mut numbers = Vec::with_capacity(self.kept);
        for trace in self.order.iter().filter_map(|id| self.traces.get(id)) {
            spans.extend(trace.spans.iter().cloned());
            numbers.extend(std::iter::repeat_n(trace.number, trace.spans.len()));
        }
        Snapshot {
            spans,
            numbers,
            dropped: self.dropped,
            dropped_spans: self.dropped_spans,
        }
    }

    /// The number a trace is shown with (0 for one no longer kept).
    pub(crate) fn number(&self, trace_id: &str) -> usize {
        self.traces.get(trace_id).map_or(0, |t| t.number)
    }

    /// The traces quiet for `quiet` (all with `None`) that are new or grew since
    /// they were printed, in arrival order, marked printed.
    pub(crate) fn ready(&mut self, now: Instant, quiet: Option<Duration>) -> Vec<String> {
        let mut out = Vec::new();
        for id in &self.order {
            let Some(trace) = self.traces.get_mut(id) else {
                continue;
            };
            let quiet_enough = quiet.is_none_or(|q| now.duration_since(trace.last_arrival) >= q);
            if quiet_enough && trace.printed < trace.spans.len() {
                trace.printed = trace.spans.len();
                out.push(id.clone());
            }
        }
        out
    }

    /// The number of the journey whose first hop is `first_hop` in `trace_id`:
    /// the one it was given, else the next.
    pub(crate) fn journey_number(&mut self, first_hop: &str, trace_id: &str) -> usize {
        if let Some(&n) = self.journey_numbers.get(first_hop) {
            return n;
        }
        let n = self.next_journey;
        self.next_journey += 1;
        self.journey_numbers.insert(first_hop.to_owned(), n);
        if let Some(trace) = self.traces.get_mut(trace_id) {
            trace.journeys.push(first_hop.to_owned());
        }
        n
    }
}
