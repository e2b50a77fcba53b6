//! RabbitMQ header tables of arbitrary keys and values (strings, byte arrays of
//! any bytes, numbers): extraction never panics.
#![no_main]

use lapin::types::{AMQPValue, ByteArray, FieldTable, LongString, ShortString};
use libfuzzer_sys::fuzz_target;
use mqtrace::Propagation;
use mqtrace_lapin::FieldTableExtractor;
use opentelemetry::propagation::Extractor;

fuzz_target!(|entries: Vec<(String, u8, Vec<u8>)>| {
    let mut table = FieldTable::default();
    for (key, kind, bytes) in entries {
        let Ok(key) = ShortString::try_new(key) else {
            continue;
        };
        let value = match kind % 4 {
            0 => AMQPValue::LongString(LongString::from(bytes)),
            1 => AMQPValue::ByteArray(ByteArray::from(bytes)),
            2 => AMQPValue::LongInt(bytes.len() as i32),
            _ => match ShortString::try_new(String::from_utf8_lossy(&bytes).into_owned()) {
                Ok(s) => AMQPValue::ShortString(s),
                Err(_) => continue,
            },
        };
        table.insert(key, value);
    }
    let e = FieldTableExtractor(&table);
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
