//! `mqtrace view --web`: a page on loopback drawing each message journey as a
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

use crate::journey::{self, Index, Role};
use crate::view::Window;

const PAGE: &str = include_str!("view.html");
const DATA_SLOT: &str = "/*MQTRACE_DATA*/null";

/// The journeys of the window as the page draws them.
pub(crate) fn data(window: &Window, live: bool) -> Value {
    let spans = window.spans();
    let index = Index::new(&spans);
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
            let span = &index.spans[i];
            let role = index.role(i).hop_name();
            hops.push(json!({
                "id": span.span_id,
                "role": role,
                "name": span.name,
                "service": span.service,
                "destination": journey::destination(span),
                "trace": window.number(&span.trace_id),
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
        "spans": spans.len(),
        "dropped_traces": window.dropped(),
        "journeys": out,
        "summary": journey::render_summaries(&mut summaries, true),
    })
}

fn page(data: &Value) -> String {
    // Inside a <script>, "</" would end it early.
    let json = data.to_string().replace("</", "<\\/");
    PAGE.replacen(DATA_SLOT, &json, 1)
}

fn respond(
    window: &Mutex<Window>,
    live: bool,
    req: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let data = || data(&window.lock().unwrap_or_else(PoisonError::into_inner), live);
    let (body, kind) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => (page(&data()), "text/html; charset=utf-8"),
        (&Method::GET, "/api/journeys") => (data().to_string(), "application/json"),
        _ => {
            let mut response = Response::new(Full::new(Bytes::from_static(b"not found")));
            *response.status_mut() = StatusCode::NOT_FOUND;
            return response;
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
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
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of file descriptors, say: wait rather than spin.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let window = window.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let response = respond(&window, live, &req);
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
        let mut w = Window::new(10);
        w.add(c.spans, Instant::now());
        let data = data(&w, false);
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
        let html = page(&json!({"x": "</script>"}));
        assert!(html.contains(r#"{"x":"<\/script>"}"#));
        assert!(!html.contains(DATA_SLOT));
    }
}
