//! Kafka record headers of arbitrary keys and values (any bytes, missing values,
//! repeats): extraction never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqtrace::Propagation;
use mqtrace_rdkafka::HeadersExtractor;
use opentelemetry::propagation::Extractor;
use rdkafka::message::{Header, OwnedHeaders};

fuzz_target!(|entries: Vec<(String, Option<Vec<u8>>)>| {
    let headers = entries.iter().fold(OwnedHeaders::new(), |h, (key, value)| {
        h.insert(Header {
            key: key.as_str(),
            value: value.as_deref(),
        })
    });
    let e = HeadersExtractor(&headers);
    let _ = Propagation::builder()
        .w3c()
        .xray()
        .underscore()
        .baggage()
        .build()
        .extract(&e);
    for key in e.keys() {
        let _ = e.get(key);
    }
});
