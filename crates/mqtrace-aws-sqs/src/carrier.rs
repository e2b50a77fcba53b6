//! OpenTelemetry carriers over SQS message attributes.

use std::collections::HashMap;

use aws_sdk_sqs::types::MessageAttributeValue;
use mqtrace::propagation::lookup;
use opentelemetry::propagation::{Extractor, Injector};

/// SQS accepts at most this many message attributes per message.
pub const MAX_MESSAGE_ATTRIBUTES: usize = 10;

/// Message attributes, as the SDK's requests and messages hold them.
pub type MessageAttributes = HashMap<String, MessageAttributeValue>;

/// Writes trace headers as `String` message attributes. It does not count: inject
/// through [`mqtrace::Propagation::inject_within`] with the room left under
/// [`MAX_MESSAGE_ATTRIBUTES`], so a message never exceeds it and never carries
/// half a context.
#[derive(Debug)]
pub struct MessageAttributesInjector<'a>(pub &'a mut MessageAttributes);

impl Injector for MessageAttributesInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        match MessageAttributeValue::builder()
            .data_type("String")
            .string_value(value)
            .build()
        {
            Ok(v) => {
                self.0.insert(key.to_owned(), v);
            }
            Err(e) => tracing::debug!(target: "mqtrace", key, error = %e, "attribute skipped"),
        }
    }
}

/// Reads trace headers from message attributes: `String` attributes (including
/// custom `String.*` types), keys compared without regard to case. Binary and
/// number attributes, and a key present in two spellings with different values,
/// read as absent.
#[derive(Debug, Clone, Copy)]
pub struct MessageAttributesExtractor<'a>(pub &'a MessageAttributes);

impl<'a> MessageAttributesExtractor<'a> {
    /// The value of `key`, borrowed from the attributes.
    pub fn value(self, key: &str) -> Option<&'a str> {
        let v = lookup(self.0.iter().map(|(k, v)| (k.as_str(), v)), key)?;
        v.data_type()
            .starts_with("String")
            .then(|| v.string_value())
            .flatten()
    }

    /// Every key.
    pub fn names(self) -> Vec<&'a str> {
        self.0.keys().map(String::as_str).collect()
    }
}

impl Extractor for MessageAttributesExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.value(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.names()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_sqs::primitives::Blob;

    #[test]
    fn round_trip_and_damage() {
        let mut attrs = MessageAttributes::new();
        MessageAttributesInjector(&mut attrs).set("traceparent", "00-x".into());
        attrs.insert(
            "bin".into(),
            MessageAttributeValue::builder()
                .data_type("Binary")
                .binary_value(Blob::new("x"))
                .build()
                .unwrap_or_else(|_| unreachable!()),
        );
        MessageAttributesInjector(&mut attrs).set("Dup", "a".into());
        MessageAttributesInjector(&mut attrs).set("dup", "b".into());
        let e = MessageAttributesExtractor(&attrs);
        assert_eq!(e.get("TraceParent"), Some("00-x"));
        assert_eq!(e.get("bin"), None);
        assert_eq!(e.get("dup"), None);
        assert_eq!(e.keys().len(), 4);
    }

    mod arbitrary {
        use super::*;
        use proptest::prelude::*;

        fn attribute() -> impl Strategy<Value = MessageAttributeValue> {
            (
                prop_oneof![
                    Just("String"),
                    Just("String.custom"),
                    Just("Number"),
                    Just("Binary")
                ],
                proptest::option::of(".{0,64}"),
            )
                .prop_map(|(data_type, value)| {
                    MessageAttributeValue::builder()
                        .data_type(data_type)
                        .set_string_value(value)
                        .build()
                        .unwrap_or_else(|_| unreachable!("data type is set"))
                })
        }

        proptest! {
            /// Any attributes: no panic, and a value comes back only from a
            /// `String` attribute the message really has under that key.
            #[test]
            fn any_attributes_read_safely(
                entries in proptest::collection::hash_map("[ -~]{0,40}", attribute(), 0..12),
                key in "[ -~]{0,40}",
            ) {
                let e = MessageAttributesExtractor(&entries);
                if let Some(got) = e.get(&key) {
                    let held = entries.iter().any(|(k, v)| {
                        k.eq_ignore_ascii_case(&key)
                            && v.data_type().starts_with("String")
                            && v.string_value() == Some(got)
                    });
                    prop_assert!(held);
                }
                prop_assert_eq!(e.keys().len(), entries.len());
            }

            /// Whatever is injected reads back unchanged.
            #[test]
            fn injected_values_read_back(key in "[a-z][a-z0-9_-]{0,40}", value in ".{0,300}") {
                let mut attrs = MessageAttributes::new();
                MessageAttributesInjector(&mut attrs).set(&key, value.clone());
                prop_assert_eq!(MessageAttributesExtractor(&attrs).value(&key), Some(value.as_str()));
            }
        }
    }
}
