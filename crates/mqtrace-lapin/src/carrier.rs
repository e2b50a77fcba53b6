//! OpenTelemetry carriers over an AMQP header table.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use mqtrace::propagation::lookup;
use opentelemetry::propagation::{Extractor, Injector};

/// Writes trace headers into a [`FieldTable`] as long strings, keys as given.
///
/// A key longer than AMQP's 255-byte limit for table keys is skipped (logged at
/// debug level) rather than panicking.
#[derive(Debug)]
pub struct FieldTableInjector<'a>(pub &'a mut FieldTable);

impl Injector for FieldTableInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        match ShortString::try_new(key) {
            Ok(key) => {
                self.0
                    .insert(key, AMQPValue::LongString(LongString::from(value)));
            }
            Err(e) => tracing::debug!(target: "mqtrace", key, error = %e, "header key skipped"),
        }
    }
}

/// Reads trace headers from a [`FieldTable`].
///
/// Keys are matched without regard to case, as HTTP-style propagators expect. Long
/// strings, (legacy) short strings and byte arrays are read when they hold UTF-8;
/// any other value type, invalid UTF-8, or the same key present in two spellings
/// with different values reads as absent, so a damaged header means "no remote
/// context", never a wrong one.
#[derive(Debug, Clone, Copy)]
pub struct FieldTableExtractor<'a>(pub &'a FieldTable);

fn as_str(value: &AMQPValue) -> Option<&str> {
    let bytes = match value {
        AMQPValue::LongString(s) => s.as_bytes(),
        AMQPValue::ShortString(s) => return Some(s.as_str()),
        AMQPValue::ByteArray(b) => b.as_slice(),
        _ => return None,
    };
    std::str::from_utf8(bytes).ok()
}

impl<'a> FieldTableExtractor<'a> {
    /// The value of `key`, borrowed from the table (see the type's rules).
    pub fn value(self, key: &str) -> Option<&'a str> {
        lookup(self.0.into_iter().map(|(k, v)| (k.as_str(), v)), key).and_then(as_str)
    }

    /// Every key, as sent.
    pub fn names(self) -> Vec<&'a str> {
        self.0.into_iter().map(|(k, _)| k.as_str()).collect()
    }
}

impl Extractor for FieldTableExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.value(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.names()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use lapin::types::ByteArray;

    #[test]
    fn round_trip_keeps_case_and_reads_case_insensitively() {
        let mut table = FieldTable::default();
        FieldTableInjector(&mut table).set("traceparent", "00-abc".into());
        FieldTableInjector(&mut table).set("X-Tenant", "acme".into());
        assert!(table.contains_key("X-Tenant"));
        let e = FieldTableExtractor(&table);
        assert_eq!(e.get("traceparent"), Some("00-abc"));
        assert_eq!(e.get("x-tenant"), Some("acme"));
        assert_eq!(e.get("missing"), None);
        let mut keys = e.keys();
        keys.sort_unstable();
        assert_eq!(keys, ["X-Tenant", "traceparent"]);
    }

    #[test]
    fn byte_arrays_and_short_strings_are_read_when_utf8() {
        let mut table = FieldTable::default();
        table.insert(
            "a".into(),
            AMQPValue::ByteArray(ByteArray::from(b"ok".as_slice())),
        );
        table.insert(
            "b".into(),
            AMQPValue::ByteArray(ByteArray::from(vec![0xff, 0xfe])),
        );
        table.insert("c".into(), AMQPValue::ShortString("short".into()));
        table.insert("d".into(), AMQPValue::LongInt(7));
        table.insert(
            "e".into(),
            AMQPValue::LongString(LongString::from(vec![0xc3, 0x28])),
        );
        let e = FieldTableExtractor(&table);
        assert_eq!(e.get("a"), Some("ok"));
        assert_eq!(e.get("b"), None);
        assert_eq!(e.get("c"), Some("short"));
        assert_eq!(e.get("d"), None);
        assert_eq!(e.get("e"), None);
    }

    #[test]
    fn conflicting_spellings_read_as_absent() {
        let mut table = FieldTable::default();
        let mut i = FieldTableInjector(&mut table);
        i.set("traceparent", "one".into());
        i.set("TraceParent", "two".into());
        i.set("tracestate", "same".into());
        i.set("TRACESTATE", "same".into());
        let e = FieldTableExtractor(&table);
        assert_eq!(e.get("traceparent"), None);
        assert_eq!(e.get("tracestate"), Some("same"));
    }

    #[test]
    fn overlong_keys_are_skipped() {
        let mut table = FieldTable::default();
        FieldTableInjector(&mut table).set(&"k".repeat(300), "v".into());
        assert!(table.inner().is_empty());
    }

    mod arbitrary {
        use super::*;
        use proptest::prelude::*;

        fn value() -> impl Strategy<Value = AMQPValue> {
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..64)
                    .prop_map(|b| AMQPValue::LongString(LongString::from(b))),
                proptest::collection::vec(any::<u8>(), 0..64)
                    .prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
                any::<i32>().prop_map(AMQPValue::LongInt),
                Just(AMQPValue::Void),
            ]
        }

        proptest! {
            /// Any table, any key: no panic, and a value comes back only as UTF-8
            /// the table really holds under that key (in some spelling).
            #[test]
            fn any_table_reads_safely(
                entries in proptest::collection::vec(("[ -~]{0,40}", value()), 0..12),
                key in "[ -~]{0,40}",
            ) {
                let mut table = FieldTable::default();
                for (k, v) in entries {
                    table.insert(k.into(), v);
                }
                let e = FieldTableExtractor(&table);
                if let Some(got) = e.get(&key) {
                    let held = table.inner().iter().any(|(k, v)| {
                        k.as_str().eq_ignore_ascii_case(&key) && as_str(v) == Some(got)
                    });
                    prop_assert!(held);
                }
                prop_assert_eq!(e.keys().len(), table.inner().len());
            }

            /// Whatever is injected under a valid key reads back unchanged.
            #[test]
            fn injected_values_read_back(key in "[a-z][a-z0-9_-]{0,40}", value in ".{0,300}") {
                let mut table = FieldTable::default();
                FieldTableInjector(&mut table).set(&key, value.clone());
                prop_assert_eq!(FieldTableExtractor(&table).value(&key), Some(value.as_str()));
            }
        }
    }
}
