//! `mqtrace demo --broker kafka://host:port`: the order pipeline on a real Kafka.

use std::time::Duration;

use mqtrace::embedded::ConsumerStats;
use mqtrace_rdkafka::{TracedConsumer, TracedProducer};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::FutureRecord;
use rdkafka::ClientConfig;

use super::services::{order_body, DemoArgs, DemoError, Services};

const ANSWER: Duration = Duration::from_secs(10);

fn config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("client.id", "mqtrace-demo")
        .set("message.timeout.ms", "10000");
    c
}

/// Creates the run's topics, produces the orders, consumes until each is settled
/// or dead-lettered, counts the dead letters and deletes the topics.
pub(crate) async fn run(
    args: &DemoArgs,
    services: &Services,
) -> Result<(ConsumerStats, u64), DemoError> {
    let bootstrap = args
        .broker
        .strip_prefix("kafka://")
        .unwrap_or(&args.broker)
        .trim_end_matches('/');
    let run = format!("{:08x}", fastrand::u32(..));
    let (topic, dead) = (
        format!("mqtrace-demo.orders.{run}"),
        format!("mqtrace-demo.orders.dead.{run}"),
    );
    let admin: AdminClient<DefaultClientContext> = config(bootstrap).create()?;
    let options = AdminOptions::new().operation_timeout(Some(ANSWER));
    let new = [
        NewTopic::new(&topic, 1, TopicReplication::Fixed(1)),
        NewTopic::new(&dead, 1, TopicReplication::Fixed(1)),
    ];
    let created = tokio::time::timeout(ANSWER, admin.create_topics(&new, &options))
        .await
        .map_err(|_| DemoError::KafkaTimeout(ANSWER))??;
    for result in created {
        result.map_err(|(name, code)| DemoError::KafkaTopic(name, code))?;
    }

    let bar = services.bar();
    bar.set_message("publishing");
    let producer = TracedProducer::from_config(&config(bootstrap), services.producer())?;
    for order_id in 1..=args.messages {
        let key = order_id.to_string();
        let body = order_body(order_id);
        producer
            .send(FutureRecord::to(&topic).key(&key).payload(&body), ANSWER)
            .await
            .map_err(|(e, _)| e)?;
        bar.inc(1);
    }

    bar.set_position(0);
    bar.set_message("processing");
    let worker = services.worker();
    let budget = worker.retry_policy().max_attempts();
    let mut consumer_config = config(bootstrap);
    consumer_config
        .set("group.id", format!("mqtrace-demo-{run}"))
        .set("auto.offset.reset", "earliest");
    let forwarder = TracedProducer::from_config(&config(bootstrap), worker.clone())?;
    let consumer = TracedConsumer::from_config(&consumer_config, &[&topic], forwarder, worker)?
        .dead_letter_topic(&dead);
    let orders = services.finishing(args, budget);
    let all_done = orders.all_done(args.messages);
    let on_record = move |record: mqtrace_rdkafka::Record| {
        orders.call(
            record.payload().unwrap_or_default().to_vec(),
            record.attempt(),
        )
    };
    let all = args.messages;
    let deadline = Duration::from_secs(60 + all / 10);
    let stats = tokio::time::timeout(deadline, consumer.run_until(on_record, all_done))
        .await
        .map_err(|_| DemoError::KafkaTimeout(deadline))??;
    // Closed before its topics are deleted: librdkafka 2.12 can crash (a freed
    // metadata cache entry) when a live consumer's subscribed topic goes away.
    drop(consumer);

    // The dead-letter topic's high watermark is the number of dead letters.
    let reader: BaseConsumer = config(bootstrap).create()?;
    let (_, dead_letters) = reader.fetch_watermarks(&dead, 0, ANSWER)?;
    // Best effort: a broker that cannot delete topics keeps them.
    let _ = admin
        .delete_topics(&[topic.as_str(), dead.as_str()], &options)
        .await;
    Ok((stats, u64::try_from(dead_letters).unwrap_or(0)))
}
