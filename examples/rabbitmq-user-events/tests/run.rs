//! The example runs against the test harness's RabbitMQ and its spans arrive, as
//! one trace per event, at an OTLP collector.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use mqtrace_testing::{brokers, unindent, Collector, Forest, TreeOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_events_are_traced_end_to_end() {
    let url = brokers::rabbitmq_url();
    let collector = Collector::start().await.unwrap();
    let stdout = mqtrace_testing::examples::run(
        env!("CARGO_BIN_EXE_rabbitmq-user-events"),
        &[("AMQP_URL", &url)],
        &collector,
    )
    .await;
    assert!(
        stdout.contains("audit: ConsumerStats { settled: 2, retried: 0, dead_lettered: 1"),
        "{stdout}"
    );
    let spans = collector.wait_for_spans(10, Duration::from_secs(10)).await;
    let mut options = TreeOptions::only(&["error.type"]);
    options.services = true;
    // The two consumers process each event at the same time: their spans' order
    // among siblings varies, so lines are compared in sorted order. Indentation
    // still pins every span's depth.
    let sorted = |text: &str| {
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        lines.sort();
        lines.join("\n")
    };
    let expected = unindent(
        r#"
        trace #1
        send users:user.created [PRODUCER] (accounts)
            process users:user.created:welcome-email [CONSUMER] (welcome-email)
                ~> send users:user.created (this trace)
                send welcome mail [INTERNAL] (welcome-email)
            process users:user.created:audit [CONSUMER] (audit)
                ~> send users:user.created (this trace)
        trace #2
        send users:user.created [PRODUCER] (accounts)
            process users:user.created:welcome-email [CONSUMER] (welcome-email)
                ~> send users:user.created (this trace)
                send welcome mail [INTERNAL] (welcome-email)
            process users:user.created:audit [CONSUMER] (audit)
                ~> send users:user.created (this trace)
        trace #3
        send users:user.deleted [PRODUCER] (accounts)
            process users:user.deleted:audit [CONSUMER] (audit) ERROR("event without an email address") error.type="missing_email"
                ~> send users:user.deleted (this trace)
        "#,
    );
    let actual = Forest::new(spans).render(&options);
    assert_eq!(sorted(&actual), sorted(&expected), "{actual}");
}
