//! Endpoints of the real brokers integration tests talk to.
//!
//! `scripts/test.sh` starts RabbitMQ, a Kafka-protocol broker and an SQS emulator on
//! loopback and exports their endpoints in the variables below (or passes on the ones
//! a developer already set). A test that needs a broker and finds no endpoint, or
//! cannot connect, fails with instructions: it never skips.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// `amqp://user:pass@host:port/vhost` of the RabbitMQ under test.
pub const RABBITMQ_ENV: &str = "MQTRACE_TEST_RABBITMQ_URL";
/// `host:port` of the Kafka-protocol broker under test.
pub const KAFKA_ENV: &str = "MQTRACE_TEST_KAFKA_BOOTSTRAP";
/// `http://host:port` of the SQS endpoint under test.
pub const SQS_ENV: &str = "MQTRACE_TEST_SQS_ENDPOINT";

const HOW: &str = "run the whole suite with `scripts/test.sh`, or start the brokers with \
`scripts/brokers.sh start` and `source .mqtrace-test/env` before `cargo test`";

/// The value of `var`, or a failure naming `what` needs it and how to set it up.
pub(crate) fn env_or_explain(var: &str, what: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!("{what} is needed by this test but {var} is not set: {HOW}"),
    }
}

/// Fails unless something accepts TCP connections at `host:port`.
fn reachable(what: &str, host_port: &str) {
    let addrs: Vec<_> = match host_port.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => panic!("{what} endpoint {host_port:?} does not resolve ({e}): {HOW}"),
    };
    let ok = addrs
        .iter()
        .any(|a| TcpStream::connect_timeout(a, Duration::from_secs(3)).is_ok());
    assert!(
        ok,
        "{what} at {host_port} does not accept connections: {HOW}"
    );
}

fn host_port(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

/// The RabbitMQ URL, checked to accept connections.
pub fn rabbitmq_url() -> String {
    let url = env_or_explain(RABBITMQ_ENV, "RabbitMQ");
    reachable("RabbitMQ", host_port(&url));
    url
}

/// Variable naming a `rabbitmqctl` wrapper bound to the RabbitMQ node under test.
pub const RABBITMQCTL_ENV: &str = "MQTRACE_TEST_RABBITMQCTL";

/// Runs `rabbitmqctl` against the node under test (e.g. `stop_app`, `start_app`,
/// `await_startup`), for tests that restart the broker. Fails with instructions when
/// the node was not started by `scripts/brokers.sh` or the command fails.
pub fn rabbitmqctl(args: &[&str]) {
    let ctl = env_or_explain(RABBITMQCTL_ENV, "Control of the RabbitMQ node");
    let out = std::process::Command::new(&ctl).args(args).output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "`{ctl} {}` failed ({}): {}",
            args.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("cannot run {ctl} ({e}): {HOW}"),
    }
}

/// The Kafka bootstrap address, checked to accept connections.
pub fn kafka_bootstrap() -> String {
    let bootstrap = env_or_explain(KAFKA_ENV, "A Kafka-protocol broker");
    let first = bootstrap.split(',').next().unwrap_or(&bootstrap).to_owned();
    reachable("Kafka", &first);
    bootstrap
}

/// The SQS endpoint URL, checked to accept connections.
pub fn sqs_endpoint() -> String {
    let url = env_or_explain(SQS_ENV, "An SQS endpoint");
    reachable("SQS", host_port(&url));
    url
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn host_port_strips_scheme_credentials_and_path() {
        assert_eq!(
            host_port("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "127.0.0.1:5672"
        );
        assert_eq!(host_port("http://127.0.0.1:9324"), "127.0.0.1:9324");
        assert_eq!(host_port("127.0.0.1:9092"), "127.0.0.1:9092");
    }
}
