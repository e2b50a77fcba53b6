//! `mqtrace demo`: the order pipeline on the embedded broker, or on RabbitMQ,
//! Kafka or SQS. This module picks the broker and runs the embedded one; the
//! services (telemetry, handler, report) are in [`services`], the other
//! brokers' runners in their own modules, which use `services` only.

mod kafka;
mod rabbit;
pub(crate) mod services;
mod sqs;

use mqtrace::embedded::{
    Broker, ConsumerStats, Message, QueueOptions, StoredMessage, TracedConsumer, TracedProducer,
};
use mqtrace::Disposition;

pub(crate) use services::DemoArgs;
use services::{order_body, DemoError, Services, DEAD_LETTERS, QUEUE};

pub(crate) async fn run(args: DemoArgs) -> Result<(), DemoError> {
    if !(0.0..=1.0).contains(&args.fail_rate) {
        return Err(DemoError::FailRate(args.fail_rate));
    }
    let services = Services::start(args.messages, args.save.as_deref()).await?;
    let (stats, dead) = if args.broker == "embedded" || args.broker.starts_with("embedded:") {
        run_embedded(&args, &services).await?
    } else if args.broker.starts_with("amqp://") || args.broker.starts_with("amqps://") {
        rabbit::run(&args, &services).await?
    } else if args.broker.starts_with("kafka://") {
        kafka::run(&args, &services).await?
    } else if args.broker.starts_with("sqs://") {
        sqs::run(&args, &services).await?
    } else {
        return Err(DemoError::Broker(args.broker));
    };
    services.report(&args, &stats, dead).await
}

async fn run_embedded(
    args: &DemoArgs,
    services: &Services,
) -> Result<(ConsumerStats, u64), DemoError> {
    let broker = Broker::new();
    broker.declare_queue(QUEUE, QueueOptions::default().dead_letter(DEAD_LETTERS));
    broker.declare_queue(DEAD_LETTERS, QueueOptions::default());
    let bar = services.bar();

    // The producer service.
    bar.set_message("publishing");
    let producer = TracedProducer::new(broker.clone(), services.producer());
    for order_id in 1..=args.messages {
        producer
            .send(QUEUE, Message::new(order_body(order_id)))
            .await?;
        bar.inc(1);
    }

    // The worker service.
    bar.set_position(0);
    bar.set_message("processing");
    let consumer = TracedConsumer::new(broker.clone(), QUEUE, services.worker());
    let handler = services.handler(args);
    let mut stats = ConsumerStats::default();
    while broker.depth(QUEUE)?.ready > 0 {
        let disposition = consumer
            .process_next(|m: StoredMessage| handler.call(m.body.to_vec(), m.attempt))
            .await?;
        match disposition {
            Disposition::Settle => stats.settled += 1,
            Disposition::Retry => stats.retried += 1,
            Disposition::DeadLetter => stats.dead_lettered += 1,
            Disposition::Drop => stats.dropped += 1,
        }
        if disposition != Disposition::Retry {
            bar.inc(1);
        }
    }
    let dead = broker.drain(DEAD_LETTERS)?.len() as u64;
    Ok((stats, dead))
}
