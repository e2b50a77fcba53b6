//! OpenTelemetry carriers over Kafka record headers.

use mqtrace::propagation::lookup;
use opentelemetry::propagation::{Extractor, Injector};
use rdkafka::message::{Header, Headers, OwnedHeaders};

/// Writes trace headers into a record's [`OwnedHeaders`], keys as given, values as
/// UTF-8 bytes. rdkafka's headers grow by value, so the injector holds them until
/// [`OwnedHeadersInjector::into_headers`].
#[derive(Debug)]
pub struct OwnedHeadersInjector {
    headers: Option<OwnedHeaders>,
}

impl OwnedHeadersInjector {
    /// Starts from `headers` (the record's own, or [`OwnedHeaders::new`]).
    pub fn new(headers: OwnedHeaders) -> Self {
        Self {
            headers: Some(headers),
        }
    }

    /// The headers with everything injected.
    pub fn into_headers(self) -> OwnedHeaders {
        self.headers.unwrap_or_default()
    }
}

impl Injector for OwnedHeadersInjector {
    /// Sets `key`, replacing any entry of the same key (compared without regard
    /// to case): a record that already carries a context (injected by the
    /// application, or copied from a consumed record) must not end up with two,
    /// which consumers read as none.
    fn set(&mut self, key: &str, value: String) {
        let mut headers = self.headers.take().unwrap_or_default();
        if headers.iter().any(|h| h.key.eq_ignore_ascii_case(key)) {
            let mut kept = OwnedHeaders::new_with_capacity(headers.count());
            for h in headers.iter().filter(|h| !h.key.eq_ignore_ascii_case(key)) {
                kept = kept.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
            headers = kept;
        }
        self.headers = Some(headers.insert(Header {
            key,
            value: Some(value.as_bytes()),
        }));
    }
}

/// Reads trace headers from a record's headers (`BorrowedHeaders` of a consumed
/// message, or `OwnedHeaders`).
///
/// Keys match without regard to case. A value that is not UTF-8, a header without
/// a value, or a key present twice with different values reads as absent, so a
/// damaged header means "no remote context", never a wrong one.
#[derive(Debug)]
pub struct HeadersExtractor<'a, H: ?Sized>(pub &'a H);

impl<'a, H: Headers + ?Sized> HeadersExtractor<'a, H> {
    /// The value of `key`, borrowed from the headers.
    pub fn value(&self, key: &str) -> Option<&'a str> {
        let headers = self.0;
        let entries = (0..headers.count())
            .filter_map(|i| headers.try_get(i))
            .map(|h| (h.key, h.value));
        std::str::from_utf8(lookup(entries, key)??).ok()
    }

    /// Every key, in order, repeats included.
    pub fn names(&self) -> Vec<&'a str> {
        (0..self.0.count())
            .filter_map(|i| self.0.try_get(i).map(|h| h.key))
            .collect()
    }
}

impl<H: Headers + ?Sized> Extractor for HeadersExtractor<'_, H> {
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

    #[test]
    fn injection_replaces_a_context_already_there() {
        let mut existing = OwnedHeaders::new();
        existing = existing.insert(Header {
            key: "TraceParent",
            value: Some(b"00-old".as_slice()),
        });
        existing = existing.insert(Header {
            key: "x-tenant",
            value: Some(b"acme".as_slice()),
        });
        let mut injector = OwnedHeadersInjector::new(existing);
        injector.set("traceparent", "00-new".into());
        let headers = injector.into_headers();
        let all: Vec<(&str, Option<&[u8]>)> = headers.iter().map(|h| (h.key, h.value)).collect();
        assert_eq!(
            all,
            [
                ("x-tenant", Some(b"acme".as_slice())),
                ("traceparent", Some(b"00-new".as_slice()))
            ]
        );
    }

    fn headers(pairs: &[(&str, Option<&[u8]>)]) -> OwnedHeaders {
        pairs.iter().fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header { key, value: *value })
        })
    }

    #[test]
    fn inject_then_extract() {
        let mut i = OwnedHeadersInjector::new(headers(&[("x-tenant", Some(b"acme"))]));
        i.set("traceparent", "00-abc".into());
        let h = i.into_headers();
        let e = HeadersExtractor(&h);
        assert_eq!(e.get("traceparent"), Some("00-abc"));
        assert_eq!(e.get("X-Tenant"), Some("acme"));
        assert_eq!(e.keys(), ["x-tenant", "traceparent"]);
    }

    #[test]
    fn damaged_headers_read_as_absent() {
        let h = headers(&[
            ("bin", Some(&[0xff, 0xfe])),
            ("null", None),
            ("dup", Some(b"a")),
            ("DUP", Some(b"b")),
            ("same", Some(b"s")),
            ("same", Some(b"s")),
        ]);
        let e = HeadersExtractor(&h);
        assert_eq!(e.get("bin"), None);
        assert_eq!(e.get("null"), None);
        assert_eq!(e.get("dup"), None);
        assert_eq!(e.get("same"), Some("s"));
        assert_eq!(e.get("absent"), None);
    }

    mod arbitrary {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any headers (any bytes, missing values, repeats): no panic, and a
            /// value comes back only as UTF-8 the headers really hold.
            #[test]
            fn any_headers_read_safely(
                entries in proptest::collection::vec(
                    ("[ -~]{0,40}", proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64))),
                    0..12,
                ),
                key in "[ -~]{0,40}",
            ) {
                let headers = entries.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
                    h.insert(Header { key: k.as_str(), value: v.as_deref() })
                });
                let e = HeadersExtractor(&headers);
                if let Some(got) = e.get(&key) {
                    let held = entries.iter().any(|(k, v)| {
                        k.eq_ignore_ascii_case(&key) && v.as_deref() == Some(got.as_bytes())
                    });
                    prop_assert!(held);
                }
                prop_assert_eq!(e.keys().len(), entries.len());
            }

            /// Whatever is injected reads back unchanged.
            #[test]
            fn injected_values_read_back(key in "[a-z][a-z0-9_-]{0,40}", value in ".{0,300}") {
                let mut i = OwnedHeadersInjector::new(OwnedHeaders::new());
                i.set(&key, value.clone());
                let h = i.into_headers();
                prop_assert_eq!(HeadersExtractor(&h).value(&key), Some(value.as_str()));
            }
        }
    }
}
