//! Running an example binary against the harness's brokers and a collector, and the
//! span tree the own-loop examples share.

use std::time::Duration;

use crate::{assert_tree, Collector, Forest, TreeOptions};

/// Runs the example binary at `path` with `env` and the collector as its OTLP
/// endpoint (gRPC), waits for it, and returns what it printed. Panics, with its
/// output, when it fails.
pub async fn run(path: &str, env: &[(&str, &str)], collector: &Collector) -> String {
    let mut command = tokio::process::Command::new(path);
    command
        .envs(env.iter().copied())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.grpc_endpoint())
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL");
    let out = match command.output().await {
        Ok(out) => out,
        Err(e) => panic!("cannot run {path}: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{path} failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// How a broker hands a failed message back for its next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// mqtrace forwards it (RabbitMQ, Kafka): each attempt is a child of the
    /// forward span that sent it.
    Forwarded,
    /// The broker redelivers the same message (SQS): every attempt is a child of
    /// the original send.
    Redelivered,
}

/// The trees of the own-loop examples' three payments (`p-1` and `p-2` settled,
/// `p-3` failing with a timeout three times and then dead-lettered to
/// `dead_letter`), rendered with `error.type`, `mqtrace.message.attempt` and
/// `mqtrace.message.disposition`, the run's suffix shown as `RUN`.
pub fn own_loop_payments(retry: Retry, dead_letter: &str) -> String {
    const SEND: &str = "send payments-RUN [PRODUCER]";
    const LINK: &str = "~> send payments-RUN (this trace)";
    let process = |attempt: u32, disposition: &str| {
        let error = if disposition == "settled" {
            String::new()
        } else {
            r#" ERROR("gateway timeout") error.type="timeout""#.to_owned()
        };
        format!(
            "process payments-RUN [CONSUMER]{error} mqtrace.message.attempt={attempt} mqtrace.message.disposition=\"{disposition}\""
        )
    };
    let forward = |target: &str, attempt: u32, disposition: &str| {
        format!(
            "send {target} [PRODUCER] mqtrace.message.attempt={attempt} mqtrace.message.disposition=\"{disposition}\""
        )
    };
    let forward_links = [
        r#"~> send payments-RUN (this trace) mqtrace.link.relationship="original_message""#,
        r#"~> process payments-RUN (this trace) mqtrace.link.relationship="processing_attempt""#,
    ];
    let mut lines: Vec<(usize, String)> = Vec::new();
    for trace in 1..=2 {
        lines.push((0, format!("trace #{trace}")));
        lines.push((0, SEND.to_owned()));
        lines.push((1, process(1, "settled")));
        lines.push((2, LINK.to_owned()));
    }
    lines.push((0, "trace #3".to_owned()));
    lines.push((0, SEND.to_owned()));
    let mut depth = 1;
    for attempt in 1..=3u32 {
        let last = attempt == 3;
        let disposition = if last { "dead_lettered" } else { "retried" };
        lines.push((depth, process(attempt, disposition)));
        lines.push((depth + 1, LINK.to_owned()));
        if last || retry == Retry::Forwarded {
            let target = if last { dead_letter } else { "payments-RUN" };
            lines.push((depth + 1, forward(target, attempt, disposition)));
            for link in forward_links {
                lines.push((depth + 2, link.to_owned()));
            }
        }
        if retry == Retry::Forwarded {
            depth += 2;
        }
    }
    let mut text = String::new();
    for (depth, line) in lines {
        text.push_str(&"    ".repeat(depth));
        text.push_str(&line);
        text.push('\n');
    }
    text
}

/// Runs an own-loop example with `env` (its broker's endpoint and a queue or topic
/// named `payments-{run}`) and checks what every one of them must show: the
/// consumer's counts and the whole span tree of [`own_loop_payments`], `spans`
/// spans in all; then that its spans and metrics pass the independent
/// conventions check ([`crate::semconv`]).
pub async fn check_own_loop(
    path: &str,
    env: &[(&str, &str)],
    run: &str,
    retry: Retry,
    dead_letter: &str,
    spans: usize,
) {
    let collector = match Collector::start().await {
        Ok(c) => c,
        Err(e) => panic!("cannot start the collector: {e}"),
    };
    let stdout = self::run(path, env, &collector).await;
    assert!(
        stdout.contains(
            "payments: ConsumerStats { settled: 2, retried: 2, dead_lettered: 1, dropped: 0, redelivered: 0, settle_failures: 0"
        ),
        "{stdout}"
    );
    let received = collector
        .wait_for_spans(spans, Duration::from_secs(10))
        .await;
    assert_eq!(received.len(), spans, "{received:#?}");
    let options = TreeOptions::only(&[
        "error.type",
        "mqtrace.message.attempt",
        "mqtrace.message.disposition",
    ]);
    assert_tree(
        &Forest::new(received.clone())
            .render(&options)
            .replace(run, "RUN"),
        &own_loop_payments(retry, dead_letter),
    );
    // The example's metrics leave with its telemetry's shutdown, as its spans do.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while collector.metrics().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = collector.metrics();
    assert!(!metrics.is_empty(), "the example exported no metrics");
    crate::semconv::check(&received, &metrics);
}
