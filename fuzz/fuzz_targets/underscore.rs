//! The underscore-key propagator (and every other format) on arbitrary header maps:
//! extraction never panics, and what it finds is a valid context or none.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqtrace::propagation::SimpleCarrier;
use mqtrace::Propagation;
use opentelemetry::trace::TraceContextExt as _;

fuzz_target!(|entries: Vec<(String, String)>| {
    let carrier: SimpleCarrier = entries.into_iter().collect();
    let all = Propagation::builder()
        .underscore()
        .w3c()
        .xray()
        .baggage()
        .build();
    let cx = all.extract(&carrier);
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        // Whatever was accepted survives a round trip.
        let mut out = SimpleCarrier::new();
        all.inject(&cx, &mut out);
        let again = all.extract(&out);
        assert_eq!(again.span().span_context().trace_id(), sc.trace_id());
    }
});
