//! `mqtrace demo --broker sqs://host:port`: the order pipeline on SQS.

use std::time::Duration;

use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::types::QueueAttributeName;
use aws_sdk_sqs::Client;
use mqtrace::embedded::ConsumerStats;
use mqtrace_aws_sqs::{TracedConsumer, TracedSqs};

use super::services::{order_body, DemoArgs, DemoError, Services};

/// `sqs://host:port`: an emulator at that address, any region, static test
/// credentials. `sqs://` alone: AWS itself, with region and credentials from the
/// environment (the SDK's default chain).
async fn client(broker: &str) -> Client {
    let authority = broker.trim_start_matches("sqs://").trim_end_matches('/');
    if authority.is_empty() {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        return Client::new(&config);
    }
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(
            std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()),
        ))
        .endpoint_url(format!("http://{authority}"))
        .credentials_provider(Credentials::new("test", "test", None, None, "mqtrace-demo"))
        .build();
    Client::from_conf(config)
}

/// Creates the run's queue and dead-letter queue, sends the orders, consumes until
/// each is settled or dead-lettered, counts the dead letters and deletes both queues.
pub(crate) async fn run(
    args: &DemoArgs,
    services: &Services,
) -> Result<(ConsumerStats, u64), DemoError> {
    let client = client(&args.broker).await;
    let run = format!("{:08x}", fastrand::u32(..));
    let create = |name: String| {
        client
            .create_queue()
            .queue_name(name)
            // A failed attempt comes back after a second.
            .attributes(QueueAttributeName::VisibilityTimeout, "1")
            .send()
    };
    let queue = create(format!("mqtrace-demo-orders-{run}"))
        .await
        .map_err(|e| DemoError::Sqs(e.to_string()))?
        .queue_url
        .unwrap_or_default();
    let dead = create(format!("mqtrace-demo-orders-dead-{run}"))
        .await
        .map_err(|e| DemoError::Sqs(e.to_string()))?
        .queue_url
        .unwrap_or_default();

    let bar = services.bar();
    bar.set_message("publishing");
    let producer = TracedSqs::new(client.clone(), services.producer());
    for order_id in 1..=args.messages {
        let body = String::from_utf8_lossy(&order_body(order_id)).into_owned();
        producer
            .send(client.send_message().queue_url(&queue).message_body(body))
            .await
            .map_err(|e| DemoError::Sqs(e.to_string()))?;
        bar.inc(1);
    }

    bar.set_position(0);
    bar.set_message("processing");
    let worker = services.worker();
    let budget = worker.retry_policy().max_attempts();
    let consumer = TracedConsumer::new(client.clone(), &queue, &worker)
        .dead_letter_queue(&dead)
        .wait_time_seconds(1)
        .receive_spans(false, false);
    let orders = services.finishing(args, budget);
    let all_done = orders.all_done(args.messages);
    let on_message = move |message: mqtrace_aws_sqs::Received| {
        orders.call(message.body().as_bytes().to_vec(), message.attempt())
    };
    let all = args.messages;
    let deadline = Duration::from_secs(60 + all);
    let stats = tokio::time::timeout(deadline, consumer.run_until(on_message, all_done))
        .await
        .map_err(|_| DemoError::Sqs(format!("not done within {deadline:?}")))??;

    let mut dead_letters = 0;
    loop {
        let got = client
            .receive_message()
            .queue_url(&dead)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .map_err(|e| DemoError::Sqs(e.to_string()))?
            .messages
            .unwrap_or_default();
        if got.is_empty() {
            break;
        }
        dead_letters += got.len() as u64;
        for m in got {
            let _ = client
                .delete_message()
                .queue_url(&dead)
                .set_receipt_handle(m.receipt_handle)
                .send()
                .await;
        }
    }
    for url in [&queue, &dead] {
        let _ = client.delete_queue().queue_url(url).send().await;
    }
    Ok((stats, dead_letters))
}
