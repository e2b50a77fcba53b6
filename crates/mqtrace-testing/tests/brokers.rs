//! The brokers the test script starts are there and accept connections. Run without
//! them, this fails and says how to start them.
#![allow(missing_docs)]

#[test]
fn rabbitmq_accepts_connections() {
    assert!(mqtrace_testing::brokers::rabbitmq_url().starts_with("amqp://"));
}

#[test]
fn kafka_protocol_broker_accepts_connections() {
    assert!(!mqtrace_testing::brokers::kafka_bootstrap().is_empty());
}

#[test]
fn sqs_endpoint_accepts_connections() {
    assert!(mqtrace_testing::brokers::sqs_endpoint().starts_with("http"));
}
