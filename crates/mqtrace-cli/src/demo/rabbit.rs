//! `mqtrace demo --broker amqp://…`: the order pipeline on a real RabbitMQ.

use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeleteOptions,
};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use mqtrace::embedded::ConsumerStats;
use mqtrace_lapin::{QueueSpec, Server, TracedConsumer, TracedPublisher};

use super::services::{order_body, DemoArgs, DemoError, Services};

const ANSWER: Duration = Duration::from_secs(10);

async fn answer<T>(f: impl std::future::Future<Output = lapin::Result<T>>) -> Result<T, DemoError> {
    Ok(tokio::time::timeout(ANSWER, f)
        .await
        .map_err(|_| DemoError::RabbitTimeout(ANSWER))??)
}

/// Publishes the orders, consumes them until each is settled or dead-lettered,
/// counts the dead letters, and removes the run's queues.
pub(crate) async fn run(
    args: &DemoArgs,
    services: &Services,
) -> Result<(ConsumerStats, u64), DemoError> {
    let url = args.broker.as_str();
    let run = format!("{:08x}", fastrand::u32(..));
    let (queue, dlx, dlq) = (
        format!("mqtrace-demo.orders.{run}"),
        format!("mqtrace-demo.orders.dlx.{run}"),
        format!("mqtrace-demo.orders.dead.{run}"),
    );
    let connection = answer(Connection::connect(url, ConnectionProperties::default())).await?;
    let channel = answer(connection.create_channel()).await?;
    answer(channel.confirm_select(ConfirmSelectOptions::default())).await?;
    let spec = QueueSpec::new(&queue).dead_letter(&dlx, &dlq);
    answer(spec.declare(&channel)).await?;

    let bar = services.bar();
    bar.set_message("publishing");
    let publisher =
        TracedPublisher::new(channel.clone(), services.producer()).server(Server::from_uri(url));
    for order_id in 1..=args.messages {
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(order_id.to_string().into());
        answer(publisher.publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &order_body(order_id),
            properties,
        ))
        .await?;
        bar.inc(1);
    }

    bar.set_position(0);
    bar.set_message("processing");
    let worker = services.worker();
    let budget = worker.retry_policy().max_attempts();
    let orders = services.finishing(args, budget);
    let all_done = orders.all_done(args.messages);
    let on_message = move |message: mqtrace_lapin::Message| {
        orders.call(message.body().to_vec(), message.attempt())
    };
    let all = args.messages;
    let deadline = Duration::from_secs(60 + all / 10);
    let stats = tokio::time::timeout(
        deadline,
        TracedConsumer::new(url, spec, worker)
            .prefetch(1)
            .run_until(on_message, all_done),
    )
    .await
    .map_err(|_| DemoError::RabbitTimeout(deadline))??;

    let mut dead = 0;
    while answer(channel.basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true }))
        .await?
        .is_some()
    {
        dead += 1;
    }
    for q in [&queue, &dlq] {
        answer(channel.queue_delete(q.as_str().into(), QueueDeleteOptions::default())).await?;
    }
    answer(channel.exchange_delete(dlx.as_str().into(), ExchangeDeleteOptions::default())).await?;
    let _ = connection.close(200, "demo done".into()).await;
    Ok((stats, dead))
}
