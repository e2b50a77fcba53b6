//! The independent conventions check: what a run exported, written as a capture
//! and judged by `scripts/semconv-check.mjs` against the registry as the npm package
//! `@opentelemetry/semantic-conventions` publishes it.

use std::path::PathBuf;

use crate::span::{AttrValue, Kind, RecordedSpan};
use crate::RecordedMetric;

/// The repository's root (this crate lives in `crates/mqtrace-testing`).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn typed(value: &AttrValue) -> serde_json::Value {
    let (kind, v) = match value {
        AttrValue::Str(s) => ("string", serde_json::Value::from(s.as_str())),
        AttrValue::Int(i) => ("int", serde_json::Value::from(*i)),
        AttrValue::Double(d) => ("double", serde_json::Value::from(*d)),
        AttrValue::Bool(b) => ("bool", serde_json::Value::from(*b)),
        AttrValue::Other(o) => ("other", serde_json::Value::from(o.as_str())),
    };
    serde_json::json!({ "type": kind, "value": v })
}

/// Checks the messaging spans (every kind but INTERNAL, which are the
/// application's) and the metric streams against the registry; panics with the
/// checker's findings, or with how to get the registry when it is missing.
pub fn check(spans: &[RecordedSpan], metrics: &[RecordedMetric]) {
    match judge(spans, metrics) {
        Ok(printed) => println!("{printed}"),
        Err(printed) => panic!("conventions check failed:\n{printed}"),
    }
}

/// What the checker says: `Ok` with its summary, `Err` with its findings.
/// Panics when the checker cannot run at all (no node, no registry).
pub fn judge(spans: &[RecordedSpan], metrics: &[RecordedMetric]) -> Result<String, String> {
    let mut capture = String::new();
    for s in spans.iter().filter(|s| s.kind != Kind::Internal) {
        let attributes: serde_json::Map<_, _> = s
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), typed(v)))
            .collect();
        capture.push_str(
            &serde_json::json!({"kind": "span", "name": s.name, "attributes": attributes})
                .to_string(),
        );
        capture.push('\n');
    }
    for m in metrics {
        let attributes: serde_json::Map<_, _> = m
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), typed(v)))
            .collect();
        capture.push_str(
            &serde_json::json!({"kind": "metric", "name": m.name, "attributes": attributes})
                .to_string(),
        );
        capture.push('\n');
    }
    let path = std::env::temp_dir().join(format!(
        "mqtrace-semconv-{}-{:08x}.jsonl",
        std::process::id(),
        fastrand::u32(..)
    ));
    if let Err(e) = std::fs::write(&path, capture) {
        panic!("cannot write the capture {}: {e}", path.display());
    }
    let root = root();
    let out = std::process::Command::new("node")
        .arg(root.join("scripts/semconv-check.mjs"))
        .arg(&path)
        .arg(root.join("docs/span-model.md"))
        .output();
    let _ = std::fs::remove_file(&path);
    let out = match out {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run node for the conventions check ({e}): scripts/brokers.sh start \
             installs what it needs"
        ),
    };
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) => Ok(printed),
        Some(1) => Err(printed),
        _ => panic!("the conventions check could not run:\n{printed}"),
    }
}
