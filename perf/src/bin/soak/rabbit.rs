//! The soak on RabbitMQ: a queue with a dead-letter exchange, a traced publisher,
//! a traced consumer.

use std::collections::BTreeSet;
use std::sync::Arc;

use lapin::options::{BasicGetOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use mqtrace::Instrumenter;
use mqtrace_lapin::{QueueSpec, TracedConsumer, TracedPublisher};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::{env, id_of, Seen};

pub(crate) struct Soak {
    _connection: Connection,
    channel: Channel,
    queue: QueueSpec,
    dead: String,
    publisher: TracedPublisher,
    consumer: Option<JoinHandle<String>>,
}

impl Soak {
    pub(crate) async fn start(
        run: &str,
        instrumenter: &Instrumenter,
        seen: &Arc<Seen>,
        stop: &Arc<Notify>,
    ) -> Result<Self, String> {
        let url = env("MQTRACE_TEST_RABBITMQ_URL")?;
        let connection = Connection::connect(&url, ConnectionProperties::default())
            .await
            .map_err(|e| e.to_string())?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        // Publisher confirms: a send counts once the broker has the message.
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        let dead = format!("soak-dead-{run}");
        let queue =
            QueueSpec::new(format!("soak-{run}")).dead_letter(format!("soak-dlx-{run}"), &dead);
        queue.declare(&channel).await.map_err(|e| e.to_string())?;
        let publisher = TracedPublisher::new(channel.clone(), instrumenter.clone());
        let consumer = TracedConsumer::new(&url, queue.clone(), instrumenter.clone()).prefetch(20);
        let (seen, stop) = (Arc::clone(seen), Arc::clone(stop));
        let consumer = tokio::spawn(async move {
            let result = consumer
                .run_until(
                    move |m| {
                        // Inside the future: the process span is current there.
                        let seen = Arc::clone(&seen);
                        async move { seen.handle(m.json()) }
                    },
                    async move { stop.notified().await },
                )
                .await;
            match result {
                Ok(s) => format!(
                    "settled {}, dead-lettered {}, retried {}",
                    s.settled, s.dead_lettered, s.retried
                ),
                Err(e) => format!("consumer failed: {e}"),
            }
        });
        Ok(Self {
            _connection: connection,
            channel,
            queue,
            dead,
            publisher,
            consumer: Some(consumer),
        })
    }

    pub(crate) async fn send(&self, id: usize) -> Result<(), String> {
        let c = self
            .publisher
            .publish_json("", self.queue.name(), &id, BasicProperties::default())
            .await
            .map_err(|e| e.to_string())?;
        if c.is_ack() {
            Ok(())
        } else {
            Err("not confirmed".into())
        }
    }

    pub(crate) async fn finish(&mut self) -> Result<String, String> {
        match self.consumer.take() {
            Some(c) => c.await.map_err(|e| e.to_string()),
            None => Ok(String::new()),
        }
    }

    pub(crate) async fn dead_letters(&self) -> Result<BTreeSet<usize>, String> {
        let mut ids = BTreeSet::new();
        while let Some(m) = self
            .channel
            .basic_get(self.dead.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .map_err(|e| e.to_string())?
        {
            ids.extend(id_of(&m.delivery.data));
        }
        Ok(ids)
    }
}
