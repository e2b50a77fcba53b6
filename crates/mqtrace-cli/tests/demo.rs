//! `mqtrace demo` as a user runs it: the printed trees against a golden file, and
//! the summary's promises.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Command;

fn demo(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mqtrace"))
        .arg("demo")
        .args(args)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .output()
        .expect("mqtrace runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The same seed prints the same trees. Regenerate after an intended change with
/// `MQTRACE_BLESS=1 cargo test -p mqtrace-cli`.
#[test]
fn printed_trees_match_the_golden_file() {
    let (ok, stdout, stderr) = demo(&[
        "--messages",
        "8",
        "--seed",
        "3",
        "--show",
        "0",
        "--no-timings",
    ]);
    assert!(ok, "demo failed: {stderr}");
    mqtrace_testing::assert_golden(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/demo.txt"),
        &stdout,
    );
}

/// The default run: every trace complete, nothing lost, retries and dead letters
/// happened and show forward spans with both links.
#[test]
fn default_run_connects_every_message() {
    let (ok, stdout, stderr) = demo(&["--messages", "50"]);
    assert!(ok, "demo failed: {stderr}");
    let summary = stdout.lines().last().unwrap();
    let numbers: Vec<u64> = summary
        .split(" · ")
        .map(|part| part.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    let [sent, processed, retried, dead, traces, complete] = numbers[..] else {
        panic!("summary: {summary}")
    };
    assert_eq!(sent, 50);
    assert_eq!(processed + dead, sent, "lost = 0: {summary}");
    assert!(retried > 0 && dead > 0, "{summary}");
    // The metrics say the same: every send and retry forward, every delivery.
    let attempts = sent + retried;
    assert!(
        stdout.contains(&format!(
            "  orders: sent {attempts} · consumed {attempts} · process p50 "
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("  orders.dlq: sent {dead} ·")),
        "{stdout}"
    );
    assert_eq!(traces, sent);
    assert_eq!(complete, traces, "{summary}");
    assert!(stdout.contains(r#"mqtrace.link.relationship="original_message""#));
    assert!(stdout.contains(r#"mqtrace.link.relationship="processing_attempt""#));
}

#[test]
fn unsupported_broker_and_bad_rate_fail_clearly() {
    let (ok, _, stderr) = demo(&["--broker", "carrier-pigeon://x"]);
    assert!(!ok);
    assert!(
        stderr.contains("is not supported: use `embedded`"),
        "{stderr}"
    );
    let (ok, _, stderr) = demo(&["--fail-rate", "2"]);
    assert!(!ok);
    assert!(stderr.contains("--fail-rate"), "{stderr}");
}

/// A run's capture (`--save`): `mqtrace doctor` finds nothing wrong in it, and
/// `mqtrace view` follows each order as one journey.
fn check_capture(capture: &std::path::Path, orders: usize) {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mqtrace"))
            .args(args)
            .arg(capture)
            .output()
            .expect("mqtrace runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, doctor) = run(&["doctor"]);
    assert_eq!(code, Some(0), "{doctor}");
    assert!(
        doctor.starts_with("mqtrace doctor: no broken propagation in "),
        "{doctor}"
    );
    assert!(
        doctor.ends_with(&format!(" ({orders} message journeys)\n")),
        "{doctor}"
    );
    let (code, view) = run(&["view", "--journeys-only", "--no-timings", "--load"]);
    assert_eq!(code, Some(0), "{view}");
    assert_eq!(
        view.matches("\njourney #").count() + usize::from(view.starts_with("journey #")),
        orders,
        "{view}"
    );
    let _ = std::fs::remove_file(capture);
}

fn capture_path(broker: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "mqtrace-demo-{broker}-{}.jsonl",
        std::process::id()
    ))
}

/// On a real RabbitMQ the pipeline ends as it does on the embedded broker: the
/// same seed gives the same retries and dead letters, and every trace is complete.
#[test]
fn rabbitmq_run_matches_the_embedded_run() {
    let url = mqtrace_testing::brokers::rabbitmq_url();
    let args = ["--messages", "30", "--seed", "11", "--show", "1"];
    let (ok, embedded, stderr) = demo(&args);
    assert!(ok, "embedded demo failed: {stderr}");
    let capture = capture_path("rabbitmq");
    let save = ["--broker", &url, "--save", capture.to_str().unwrap()];
    let (ok, rabbit, stderr) = demo(&[&args[..], &save].concat());
    assert!(ok, "RabbitMQ demo failed: {stderr}");
    check_capture(&capture, 30);
    let summary = |out: &str| out.lines().last().unwrap().to_owned();
    assert_eq!(summary(&rabbit), summary(&embedded));
    assert!(
        summary(&rabbit).ends_with("traces 30 · complete 30"),
        "{rabbit}"
    );
    assert!(rabbit.contains("send mqtrace-demo.orders."), "{rabbit}");
}

/// On a real Kafka-protocol broker too: the same summary as the embedded run.
#[test]
fn kafka_run_matches_the_embedded_run() {
    let bootstrap = mqtrace_testing::brokers::kafka_bootstrap();
    let args = ["--messages", "30", "--seed", "11", "--show", "1"];
    let (ok, embedded, stderr) = demo(&args);
    assert!(ok, "embedded demo failed: {stderr}");
    let broker = format!("kafka://{bootstrap}");
    let capture = capture_path("kafka");
    let save = ["--broker", &broker, "--save", capture.to_str().unwrap()];
    let (ok, kafka, stderr) = demo(&[&args[..], &save].concat());
    assert!(ok, "Kafka demo failed: {stderr}");
    check_capture(&capture, 30);
    let summary = |out: &str| out.lines().last().unwrap().to_owned();
    assert_eq!(summary(&kafka), summary(&embedded));
    assert!(
        summary(&kafka).ends_with("traces 30 · complete 30"),
        "{kafka}"
    );
    assert!(kafka.contains("send mqtrace-demo.orders."), "{kafka}");
}

/// On the SQS emulator too: retries by redelivery, the same summary.
#[test]
fn sqs_run_matches_the_embedded_run() {
    let endpoint = mqtrace_testing::brokers::sqs_endpoint();
    let args = ["--messages", "20", "--seed", "11", "--show", "1"];
    let (ok, embedded, stderr) = demo(&args);
    assert!(ok, "embedded demo failed: {stderr}");
    let broker = format!("sqs://{}", endpoint.trim_start_matches("http://"));
    let capture = capture_path("sqs");
    let save = ["--broker", &broker, "--save", capture.to_str().unwrap()];
    let (ok, sqs, stderr) = demo(&[&args[..], &save].concat());
    assert!(ok, "SQS demo failed: {stderr}");
    check_capture(&capture, 20);
    let summary = |out: &str| out.lines().last().unwrap().to_owned();
    assert_eq!(summary(&sqs), summary(&embedded));
    assert!(summary(&sqs).ends_with("traces 20 · complete 20"), "{sqs}");
}
