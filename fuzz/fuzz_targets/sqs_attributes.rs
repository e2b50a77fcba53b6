//! SQS message attributes of arbitrary keys, data types and values: extraction
//! never panics, and injection never exceeds the 10-attribute limit.
#![no_main]

use aws_sdk_sqs::types::MessageAttributeValue;
use libfuzzer_sys::fuzz_target;
use mqtrace::Propagation;
use mqtrace_aws_sqs::{
    MessageAttributes, MessageAttributesExtractor, MessageAttributesInjector,
    MAX_MESSAGE_ATTRIBUTES,
};
use opentelemetry::propagation::Extractor;

fuzz_target!(|entries: Vec<(String, String, Option<String>)>| {
    let mut attributes = MessageAttributes::new();
    for (key, data_type, value) in entries {
        if let Ok(v) = MessageAttributeValue::builder()
            .data_type(data_type)
            .set_string_value(value)
            .build()
        {
            attributes.insert(key, v);
        }
    }
    let all = Propagation::builder()
        .w3c()
        .xray()
        .underscore()
        .baggage()
        .build();
    let e = MessageAttributesExtractor(&attributes);
    let cx = all.extract(&e);
    for key in e.keys() {
        let _ = e.get(key);
    }
    // Whatever was found, re-injected within the room left: never over the limit.
    let before = attributes.len();
    if before <= MAX_MESSAGE_ATTRIBUTES {
        let room = MAX_MESSAGE_ATTRIBUTES - before;
        let mut copy = attributes.clone();
        all.inject_within(&cx, &mut MessageAttributesInjector(&mut copy), room);
        assert!(copy.len() <= MAX_MESSAGE_ATTRIBUTES.max(before));
    }
});
