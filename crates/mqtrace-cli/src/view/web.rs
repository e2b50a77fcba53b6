//! `mqtrace view --web`: a page on loopback (answering loopback `Host` names
//! only, against DNS rebinding) drawing each message journey as a
//! waterfall across services and traces, with parents and links drawn between the
//! hops. `/` is the page with the journeys in it; `/api/journeys` is the same data,
//! which the page polls while `view` is listening.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::window::{Snapshot, Window};
use crate::journey::{self, Index, Role};

const PAGE: &str = include_str!("view.html");
const DATA_SLOT: &str = "/*MQTRACE_DATA*/null";

/// The journeys of a snapshot of the window as the page draws them.
pub(crate) fn data(snapshot: &Snapshot, live: bool) -> Value {
    let index = Index::new(snapshot.spans.iter().map(|s| &**s));
    let journeys = journey::journeys(&index);
    let mut out = Vec::new();
    for (n, j) in journeys.iter().enumerate() {
        let start = j
            .hops
            .iter()
            .map(|&i| index.spans[i].start_unix_nano)
            .min()
            .unwrap_or(0);
        let mut hops = Vec::new();
        let mut edges = Vec::new();
        for &i in &j.hops {
            let span = index.spans[i];
            let role = index.role(i).hop_name();
            hops.push(json!({
                "id": span.span_id,
                "role": role,
                "name": span.name,
                "service": span.service,
                "destination": journey::destination(span),
                "trace": snapshot.numbers[i],
                "start_us": span.start_unix_nano.saturating_sub(start) / 1_000,
                "duration_us": span.duration_micros(),
                "attempt": index.attempt(i),
                "error": journey::error_of(span),
                "disposition": journey::disposition(span),
                "queue_s": if index.role(i) == Role::Process { index.queue_time(i) } else { None },
            }));
            for (to, via) in index.contexts(i) {
                if j.hops.iter().any(|&h| index.spans[h].span_id == to) {
                    edges.push(json!({
                        "from": to,
                        "to": span.span_id,
                        "via": if via == journey::Via::Parent { "parent" } else { "link" },
                    }));
                }
            }
        }
        out.push(json!({
            "number": n + 1,
            "destination": j.destination(&index),
            "message_id": j.message_id(&index),
            "attempts": j.attempts(&index),
            "traces": j.traces(&index),
            "outcome": j.outcome(&index),
            "hops": hops,
            "edges": edges,
        }));
    }
    let mut summaries = journey::summaries(&index, &journeys);
    json!({
        "live": live,
        "spans": snapshot.spans.len(),
        "dropped_traces": snapshot.dropped,
        "dropped_spans": snapshot.dropped_spans,
        "journeys": out,
        "summary": journey::render_summaries(&mut summaries, true),
    })
}

/// The page with `json` in it. Inside a `<script>`, `</` would end it early and
/// `<!--` open a comment that swallows the rest; JSON has `<` only inside
/// strings, where `\u003c` says the same.
fn page(json: &[u8]) -> String {
    let json = String::from_utf8_lossy(json).replace('<', "\\u003c");
    PAGE.replacen(DATA_SLOT, &json, 1)
}

/// Whether a `Host` header names this machine's loopback: `localhost`,
/// `127.x.x.x` or `[::1]`, with or without a port. A page of another site whose
/// name was rebound to 127.0.0.1 (DNS rebinding) sends its own name, and is not
/// answered.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((addr, rest)) if rest.is_empty() || port(rest) => {
                return addr
                    .parse::<std::net::Ipv6Addr>()
                    .is_ok_and(|a| a.is_loopback());
            }
            _ => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, rest)) if port(&format!(":{rest}")) => name,
            Some(_) => return false,
            None => host,
        },
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.is_loopback())
}

/// `:` and a port number.
fn port(rest: &str) -> bool {
    rest.strip_prefix(':')
        .is_some_and(|p| !p.is_empty() && p.parse::<u16>().is_ok())
}

/// The page's JSON, worked out again only when the window changed.
#[derive(Debug, Default)]
struct Cache {
    version: Option<u64>,
    json: Bytes,
}

fn current_json(window: &Mutex<Window>, cache: &Mutex<Cache>, live: bool) -> Bytes {
    let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
    let (version, snapshot) = {
        let w = window.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.version == Some(w.version()) {
            return cache.json.clone();
        }
        (w.version(), w.snapshot())
    };
    // The window's lock is released: the receivers go on while this is worked out.
    let json = Bytes::from(data(&snapshot, live).to_string());
    *cache = Cache {
        version: Some(version),
        json: json.clone(),
    };
    json
}

fn status(code: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = code;
    response
}

fn respond(
    window: &Mutex<Window>,
    cache: &Mutex<Cache>,
    live: bool,
    req: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| {
            req.uri()
                .authority()
                .map(hyper::http::uri::Authority::as_str)
        });
    if !host.is_some_and(loopback_host) {
        return status(
            StatusCode::MISDIRECTED_REQUEST,
            "mqtrace view answers loopback names only (localhost, 127.0.0.1, [::1])",
        );
    }
    let (body, kind) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => {
            let json = current_json(window, cache, live);
            (Bytes::from(page(&json)), "text/html; charset=utf-8")
        }
        (&Method::GET, "/api/journeys") => (current_json(window, cache, live), "application/json"),
        _ => return status(StatusCode::NOT_FOUND, "not found"),
    };
    let mut response = Response::new(Full::new(body));
    if let Ok(value) = hyper::header::HeaderValue::from_str(kind) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Serves the page on `addr` until the process ends; returns the bound address.
pub(crate) async fn serve(
    addr: SocketAddr,
    window: Arc<Mutex<Window>>,
    live: bool,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot serve the page on {addr}: {e}"))
    })?;
    let bound = listener.local_addr()?;
    let cache = Arc::new(Mutex::new(Cache::default()));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of file descriptors, say: wait rather than spin.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let (window, cache) = (window.clone(), cache.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let response = respond(&window, &cache, live, &req);
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Instant;

    use super::*;
    use crate::journey::fixture::Spans;

    #[test]
    fn the_page_carries_the_journeys_with_their_edges() {
        let mut c = Spans::default();
        c.retried("1", 0);
        let mut w = Window::new(10, 100);
        w.add(c.spans, Instant::now());
        let data = data(&w.snapshot(), false);
        let journey = &data["journeys"][0];
        let roles: Vec<&str> = journey["hops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["send", "process", "forward", "process"]);
        // process ← send (parent and link), forward ← process (parent and link),
        // forward ← send (link), process 2 ← forward (parent and link).
        assert_eq!(journey["edges"].as_array().unwrap().len(), 7);
        assert_eq!(journey["outcome"], "settled");
        let html = page(json!({"x": "</script>"}).to_string().as_bytes());
        assert!(html.contains(r#"{"x":"\u003c/script>"}"#));
        assert!(!html.contains(DATA_SLOT));
    }

    /// A span named `<!--<script` would open a comment inside the page's script
    /// and blank it: every `<` of the embedded JSON is written `\u003c`.
    #[test]
    fn the_embedded_json_has_no_less_than_sign() {
        let data = json!({"name": "<!--<script", "other": "</script>"});
        let html = page(data.to_string().as_bytes());
        let embedded = html
            .split_once("const INITIAL = ")
            .and_then(|(_, rest)| rest.split_once(";\n"))
            .map(|(json, _)| json)
            .unwrap();
        assert_eq!(
            embedded,
            r#"{"name":"\u003c!--\u003cscript","other":"\u003c/script>"}"#
        );
        assert_eq!(serde_json::from_str::<Value>(embedded).unwrap(), data);
    }

    /// Sends `GET path` with this `Host` header (none when `None`) and returns the
    /// status code.
    async fn get(addr: SocketAddr, host: Option<&str>, path: &str) -> u16 {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let host = host.map_or_else(String::new, |h| format!("Host: {h}\r\n"));
        let request = format!("GET {path} HTTP/1.1\r\n{host}Connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        answer
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap()
    }

    /// DNS rebinding: a page of another site whose name now resolves to 127.0.0.1
    /// would read `/api/journeys`, its own name in `Host`. Only loopback names are
    /// answered; any other `Host` (or none) gets 421 Misdirected Request.
    #[tokio::test]
    async fn only_loopback_hosts_are_answered() {
        let window = Arc::new(Mutex::new(Window::new(10, 100)));
        let addr = serve(SocketAddr::from(([127, 0, 0, 1], 0)), window, true)
            .await
            .unwrap();
        let port = addr.port();
        for host in [
            "localhost".to_owned(),
            format!("localhost:{port}"),
            "LocalHost".to_owned(),
            "127.0.0.1".to_owned(),
            format!("127.0.0.1:{port}"),
            "127.1.2.3:80".to_owned(),
            "[::1]".to_owned(),
            format!("[::1]:{port}"),
        ] {
            assert_eq!(get(addr, Some(&host), "/api/journeys").await, 200, "{host}");
            assert_eq!(get(addr, Some(&host), "/").await, 200, "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:4320",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "[::2]:4320",
            "0.0.0.0",
            "::1",
            "",
        ] {
            assert_eq!(get(addr, Some(host), "/api/journeys").await, 421, "{host}");
            assert_eq!(get(addr, Some(host), "/").await, 421, "{host}");
        }
    }
}
