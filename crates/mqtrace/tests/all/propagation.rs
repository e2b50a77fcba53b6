//! Propagation end to end through the embedded broker: W3C, underscore, X-Ray and
//! their combination; bad headers of every kind.

use bytes::Bytes;
use mqtrace::embedded::{HeaderExtractor, Headers, Message, TracedConsumer, TracedProducer};
use mqtrace::{Conventions, Propagation};
use mqtrace_testing::TreeOptions;
use opentelemetry::trace::TraceContextExt;
use proptest::prelude::*;

use crate::helpers::{assert_tree, broker_with, Harness};

const CONNECTED: &str = "
    trace #1
    send orders [PRODUCER]
        process orders [CONSUMER]
            ~> send orders (this trace)
    ";

/// Publishes with `producer` formats, consumes with `consumer` formats; returns the
/// header keys the message carried and the rendered tree.
async fn round_trip(producer: Propagation, consumer: Propagation) -> (Vec<String>, String) {
    let h = Harness::start().await;
    let broker = broker_with(&[("orders", None)]);
    let send = h.instrumenter(|b| b.conventions(Conventions::V1_45).propagation(producer));
    let process = h.instrumenter(|b| b.conventions(Conventions::V1_45).propagation(consumer));
    TracedProducer::new(broker.clone(), send)
        .send("orders", Message::new("x"))
        .await
        .unwrap();
    let keys = std::sync::Mutex::new(Vec::new());
    TracedConsumer::new(broker, "orders", process)
        .run_until_idle(|m| {
            *keys.lock().unwrap() = m.headers.iter().map(|(k, _)| k.to_owned()).collect();
            async { Ok(()) }
        })
        .await
        .unwrap();
    let keys = keys.into_inner().unwrap();
    let tree = h.forest(2).await.render(&TreeOptions::only(&[]));
    (keys, tree)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn w3c_round_trip() {
    let (keys, tree) = round_trip(Propagation::default(), Propagation::default()).await;
    // No `tracestate`: the producer's is empty, and an empty one is left out.
    assert_eq!(keys, ["traceparent"]);
    assert_tree(&tree, CONNECTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_round_trip() {
    let p = || Propagation::builder().underscore().build();
    let (keys, tree) = round_trip(p(), p()).await;
    assert_eq!(keys, ["trace_id", "span_id", "trace_flags"]);
    assert_tree(&tree, CONNECTED);
}

#[cfg(feature = "xray")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xray_round_trip() {
    let p = || Propagation::builder().xray().build();
    let (keys, tree) = round_trip(p(), p()).await;
    assert_eq!(keys, ["x-amzn-trace-id"]);
    assert_tree(&tree, CONNECTED);
}

#[cfg(feature = "xray")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_formats_reach_single_format_consumers() {
    let all = || {
        Propagation::builder()
            .w3c()
            .xray()
            .underscore()
            .baggage()
            .build()
    };
    for consumer in [
        Propagation::builder().xray().build(),
        Propagation::builder().underscore().build(),
        Propagation::default(),
    ] {
        let (keys, tree) = round_trip(all(), consumer).await;
        assert_eq!(
            keys,
            [
                "traceparent",
                "x-amzn-trace-id",
                "trace_id",
                "span_id",
                "trace_flags"
            ]
        );
        assert_tree(&tree, CONNECTED);
    }
}

/// Each of these is processed as usual, as a new root with no link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_headers_give_a_new_root() {
    let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let cases: Vec<(&str, Headers)> = vec![
        ("none", Headers::new()),
        ("malformed", one("traceparent", "00-not-a-trace-01")),
        ("truncated", one("traceparent", &valid[..40])),
        (
            "non-UTF-8",
            one_bytes("traceparent", b"00-4bf92f35\xff\xfe-00f067aa0ba902b7-01"),
        ),
        (
            "all-zero ids",
            one(
                "traceparent",
                "00-00000000000000000000000000000000-0000000000000000-01",
            ),
        ),
        (
            "oversized",
            one("traceparent", &format!("{valid}{}", " ".repeat(10_000))),
        ),
        ("duplicated", {
            let mut h = one("traceparent", valid);
            h.append("traceparent", valid);
            h
        }),
        (
            "unknown version ff",
            one(
                "traceparent",
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ),
    ];
    let h = Harness::start().await;
    let instrumenter = h.instrumenter(|b| b.conventions(Conventions::V1_45));
    let broker = broker_with(&[("orders", None)]);
    for (_, headers) in &cases {
        broker
            .publish(
                "orders",
                Message {
                    headers: headers.clone(),
                    body: Bytes::from_static(b"x"),
                },
            )
            .unwrap();
    }
    let stats = TracedConsumer::new(broker, "orders", instrumenter)
        .run_until_idle(|_| async { Ok(()) })
        .await
        .unwrap();
    assert_eq!(stats.settled, cases.len() as u64, "every message processed");
    let forest = h.forest(cases.len()).await;
    assert_eq!(forest.traces().len(), cases.len(), "each one its own trace");
    for (trace, (case, _)) in forest.traces().iter().zip(&cases) {
        assert_eq!(trace.len(), 1, "{case}");
        assert!(trace[0].parent_span_id.is_none(), "{case}: a root");
        assert!(trace[0].links.is_empty(), "{case}: no link");
        assert_ne!(
            trace[0].trace_id, "4bf92f3577b34da6a3ce929d0e0e4736",
            "{case}"
        );
    }
}

fn one(key: &str, value: &str) -> Headers {
    let mut h = Headers::new();
    h.insert(key, value.to_owned());
    h
}

fn one_bytes(key: &str, value: &'static [u8]) -> Headers {
    let mut h = Headers::new();
    h.insert(key, Bytes::from_static(value));
    h
}

fn header_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("traceparent".to_owned()),
        Just("tracestate".to_owned()),
        Just("baggage".to_owned()),
        Just("trace_id".to_owned()),
        Just("span_id".to_owned()),
        Just("trace_flags".to_owned()),
        Just("x-amzn-trace-id".to_owned()),
        Just("mqtrace-original-traceparent".to_owned()),
        "[a-zA-Z_-]{1,12}",
    ]
}

/// Every format the build has.
fn every_format() -> Propagation {
    let builder = Propagation::builder().w3c().underscore().baggage();
    #[cfg(feature = "xray")]
    let builder = builder.xray();
    builder.build()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// Arbitrary header bytes under the keys every format reads never panic and never
    /// yield a remote context, so they can never produce a link or a parent.
    #[test]
    fn arbitrary_header_bytes_never_yield_a_context(
        entries in proptest::collection::vec((header_key(), proptest::collection::vec(any::<u8>(), 0..200)), 0..8)
    ) {
        let mut headers = Headers::new();
        for (k, v) in entries {
            headers.append(k, v);
        }
        let all = every_format();
        let cx = all.extract(&HeaderExtractor(&headers));
        prop_assert!(!cx.span().span_context().is_valid());
        prop_assert!(mqtrace::forward::original_context(&HeaderExtractor(&headers)).is_none());
    }

    /// Arbitrary strings (valid UTF-8) in the same places: same promise.
    #[test]
    fn arbitrary_header_text_never_panics(
        entries in proptest::collection::vec((header_key(), ".{0,120}"), 0..8)
    ) {
        let mut headers = Headers::new();
        for (k, v) in entries {
            headers.append(k, v);
        }
        let all = every_format();
        let _ = all.extract(&HeaderExtractor(&headers));
    }
}
