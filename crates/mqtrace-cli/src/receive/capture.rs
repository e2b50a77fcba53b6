//! Captures: OTLP JSON lines, one trace export request per line, the format of the
//! OpenTelemetry Collector's file exporter. `mqtrace view --save` and
//! `mqtrace demo --save` write them; `view --load` and `doctor` read them (and
//! files the collector wrote: lines of metrics or logs are passed over).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use mqtrace_testing::{spans_of, RecordedSpan};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

/// Why a capture could not be read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CaptureError {
    #[error("cannot open capture {0}: {1}")]
    Open(PathBuf, std::io::Error),
    #[error("cannot read capture {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("capture {0}, line {1}: not an OTLP JSON export request ({2})")]
    Line(PathBuf, usize, serde_json::Error),
    #[error("cannot write capture {0}: {1}")]
    Write(PathBuf, std::io::Error),
}

/// What a capture holds.
#[derive(Debug, Default)]
pub(crate) struct Capture {
    pub(crate) spans: Vec<RecordedSpan>,
    /// Lines that held no spans (metrics, logs, empty requests).
    pub(crate) other_lines: usize,
}

/// Reads a capture file.
pub(crate) fn load(path: &Path) -> Result<Capture, CaptureError> {
    let file = std::fs::File::open(path).map_err(|e| CaptureError::Open(path.to_owned(), e))?;
    read(std::io::BufReader::new(file), path)
}

pub(crate) fn read(input: impl BufRead, path: &Path) -> Result<Capture, CaptureError> {
    let mut capture = Capture::default();
    for (index, line) in input.lines().enumerate() {
        let line = line.map_err(|e| CaptureError::Read(path.to_owned(), e))?;
        if line.trim().is_empty() {
            continue;
        }
        let request: ExportTraceServiceRequest = serde_json::from_str(&line)
            .map_err(|e| CaptureError::Line(path.to_owned(), index + 1, e))?;
        let spans = spans_of(&request);
        if spans.is_empty() {
            capture.other_lines += 1;
        }
        capture.spans.extend(spans);
    }
    Ok(capture)
}

/// Writes trace requests to a capture file, one line each, flushed per request so
/// a capture cut short by Ctrl-C keeps every whole line.
#[derive(Debug)]
pub(crate) struct Writer {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
}

impl Writer {
    pub(crate) fn create(path: &Path) -> Result<Self, CaptureError> {
        let file =
            std::fs::File::create(path).map_err(|e| CaptureError::Write(path.to_owned(), e))?;
        Ok(Self {
            path: path.to_owned(),
            out: std::io::BufWriter::new(file),
        })
    }

    pub(crate) fn write(
        &mut self,
        request: &ExportTraceServiceRequest,
    ) -> Result<(), CaptureError> {
        let fail = |e| CaptureError::Write(self.path.clone(), e);
        serde_json::to_writer(&mut self.out, request).map_err(|e| fail(e.into()))?;
        self.out.write_all(b"\n").map_err(fail)?;
        self.out.flush().map_err(fail)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_the_collectors_file_exporter_format() {
        // As the OpenTelemetry Collector's file exporter writes it: ids in hex,
        // times and integers as strings, a metrics line in between.
        let text = r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"shop"}}]},"scopeSpans":[{"scope":{"name":"x"},"spans":[{"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","parentSpanId":"","name":"send orders","kind":4,"startTimeUnixNano":"1544712660000000000","endTimeUnixNano":"1544712661000000000","attributes":[{"key":"messaging.system","value":{"stringValue":"kafka"}},{"key":"mqtrace.message.attempt","value":{"intValue":"2"}}],"status":{}}]}]}]}
{"resourceMetrics":[]}

"#;
        let capture = read(text.as_bytes(), Path::new("t.jsonl")).unwrap();
        assert_eq!(capture.other_lines, 1);
        let [span] = &capture.spans[..] else {
            panic!("{:?}", capture.spans)
        };
        assert_eq!(span.service, "shop");
        assert_eq!(span.trace_id, "5b8efff798038103d269b633813fc60c");
        assert_eq!(span.parent_span_id, None);
        assert_eq!(span.start_unix_nano, 1_544_712_660_000_000_000);
        assert_eq!(
            span.attr("mqtrace.message.attempt")
                .and_then(|v| v.as_i64()),
            Some(2)
        );
    }

    #[test]
    fn a_bad_line_is_named() {
        let text = "{\"resourceSpans\":[]}\n{\"resourceSpans\": [\n";
        let err = read(text.as_bytes(), Path::new("t.jsonl")).unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with("capture t.jsonl, line 2: not an OTLP JSON export request"),
            "{message}"
        );
    }

    #[test]
    fn what_is_written_reads_back() {
        let dir = std::env::temp_dir().join(format!("mqtrace-capture-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("round-trip.jsonl");
        let text = r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"shop"}}]},"scopeSpans":[{"spans":[{"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","name":"send orders","kind":4,"startTimeUnixNano":"1","endTimeUnixNano":"2","links":[{"traceId":"5b8efff798038103d269b633813fc60d","spanId":"eee19b7ec3c1b175"}]}]}]}]}"#;
        let request: ExportTraceServiceRequest = serde_json::from_str(text).unwrap();
        let mut writer = Writer::create(&path).unwrap();
        writer.write(&request).unwrap();
        writer.write(&request).unwrap();
        drop(writer);
        let capture = load(&path).unwrap();
        assert_eq!(capture.spans.len(), 2);
        assert_eq!(capture.spans[0], spans_of(&request)[0]);
        assert_eq!(capture.spans[0].links[0].span_id, "eee19b7ec3c1b175");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
