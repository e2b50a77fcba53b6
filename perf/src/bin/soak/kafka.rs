//! The soak on Kafka: a topic and its dead-letter topic, a traced producer, a
//! traced consumer.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use mqtrace::Instrumenter;
use mqtrace_rdkafka::{TracedConsumer, TracedProducer};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, Message};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::{env, id_of, Seen};

pub(crate) struct Soak {
    bootstrap: String,
    topic: String,
    dead: String,
    producer: TracedProducer,
    consumer: Option<JoinHandle<String>>,
}

fn config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("client.id", "mqtrace-soak");
    c
}

impl Soak {
    pub(crate) async fn start(
        run: &str,
        instrumenter: &Instrumenter,
        seen: &Arc<Seen>,
        stop: &Arc<Notify>,
    ) -> Result<Self, String> {
        let bootstrap = env("MQTRACE_TEST_KAFKA_BOOTSTRAP")?;
        let (topic, dead) = (format!("soak-{run}"), format!("soak-dead-{run}"));
        let admin: AdminClient<DefaultClientContext> =
            config(&bootstrap).create().map_err(|e| e.to_string())?;
        let new = [
            NewTopic::new(&topic, 1, TopicReplication::Fixed(1)),
            NewTopic::new(&dead, 1, TopicReplication::Fixed(1)),
        ];
        for r in admin
            .create_topics(&new, &AdminOptions::new())
            .await
            .map_err(|e| e.to_string())?
        {
            r.map_err(|(t, e)| format!("topic {t}: {e}"))?;
        }
        let producer = TracedProducer::from_config(&config(&bootstrap), instrumenter.clone())
            .map_err(|e| e.to_string())?;
        let mut consumer_config = config(&bootstrap);
        consumer_config
            .set("group.id", format!("soak-{run}"))
            .set("auto.offset.reset", "earliest");
        let consumer = TracedConsumer::from_config(
            &consumer_config,
            &[&topic],
            TracedProducer::from_config(&config(&bootstrap), instrumenter.clone())
                .map_err(|e| e.to_string())?,
            instrumenter.clone(),
        )
        .map_err(|e| e.to_string())?
        .dead_letter_topic(&dead);
        let (seen, stop) = (Arc::clone(seen), Arc::clone(stop));
        let consumer = tokio::spawn(async move {
            let s = consumer
                .run_until(
                    move |r| {
                        // Inside the future: the process span is current there.
                        let seen = Arc::clone(&seen);
                        async move { seen.handle(r.json()) }
                    },
                    async move { stop.notified().await },
                )
                .await;
            match s {
                Ok(s) => format!(
                    "settled {}, dead-lettered {}, commit failures {}",
                    s.settled, s.dead_lettered, s.settle_failures
                ),
                Err(e) => format!("the consumer stopped: {e}"),
            }
        });
        Ok(Self {
            bootstrap,
            topic,
            dead,
            producer,
            consumer: Some(consumer),
        })
    }

    pub(crate) async fn send(&self, id: usize) -> Result<(), String> {
        let payload = id.to_string();
        self.producer
            .send(
                FutureRecord::<str, str>::to(&self.topic).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| e.to_string())
    }

    pub(crate) async fn finish(&mut self) -> Result<String, String> {
        match self.consumer.take() {
            Some(c) => c.await.map_err(|e| e.to_string()),
            None => Ok(String::new()),
        }
    }

    /// Reads the dead-letter topic from the start until it has been quiet for
    /// five seconds.
    pub(crate) async fn dead_letters(&self) -> Result<BTreeSet<usize>, String> {
        let mut c = config(&self.bootstrap);
        c.set("group.id", format!("{}-reader", self.dead))
            .set("auto.offset.reset", "earliest");
        let reader: StreamConsumer = c.create().map_err(|e| e.to_string())?;
        reader.subscribe(&[&self.dead]).map_err(|e| e.to_string())?;
        let mut ids = BTreeSet::new();
        while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(5), reader.recv()).await {
            ids.extend(m.payload().and_then(id_of));
        }
        Ok(ids)
    }
}
