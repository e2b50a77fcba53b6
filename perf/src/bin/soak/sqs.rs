//! The soak on SQS: a queue and a dead-letter queue, a traced producer, a traced
//! consumer.

use std::collections::BTreeSet;
use std::sync::Arc;

use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::Client;
use mqtrace::Instrumenter;
use mqtrace_aws_sqs::{TracedConsumer, TracedSqs};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::{env, id_of, Seen};

pub(crate) struct Soak {
    client: Client,
    queue: String,
    dead: String,
    producer: TracedSqs,
    consumer: Option<JoinHandle<String>>,
}

impl Soak {
    pub(crate) async fn start(
        run: &str,
        instrumenter: &Instrumenter,
        seen: &Arc<Seen>,
        stop: &Arc<Notify>,
    ) -> Result<Self, String> {
        let endpoint = env("MQTRACE_TEST_SQS_ENDPOINT")?;
        let config = aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(endpoint)
            .credentials_provider(Credentials::new("test", "test", None, None, "mqtrace-soak"))
            .build();
        let client = Client::from_conf(config);
        let create = |name: String| client.create_queue().queue_name(name).send();
        let queue = create(format!("soak-{run}"))
            .await
            .map_err(|e| e.to_string())?
            .queue_url
            .unwrap_or_default();
        let dead = create(format!("soak-dead-{run}"))
            .await
            .map_err(|e| e.to_string())?
            .queue_url
            .unwrap_or_default();
        let consumer = TracedConsumer::new(client.clone(), &queue, instrumenter)
            .dead_letter_queue(&dead)
            .wait_time_seconds(1);
        let (seen, stop) = (Arc::clone(seen), Arc::clone(stop));
        let consumer = tokio::spawn(async move {
            let s = consumer
                .run_until(
                    move |m| {
                        // Inside the future: the process span is current there.
                        let seen = Arc::clone(&seen);
                        async move { seen.handle(m.json()) }
                    },
                    async move { stop.notified().await },
                )
                .await;
            match s {
                Ok(s) => format!(
                    "settled {}, dead-lettered {}, delete failures {}",
                    s.settled, s.dead_lettered, s.settle_failures
                ),
                Err(e) => format!("the consumer stopped: {e}"),
            }
        });
        Ok(Self {
            producer: TracedSqs::new(client.clone(), instrumenter.clone()),
            client,
            queue,
            dead,
            consumer: Some(consumer),
        })
    }

    pub(crate) async fn send(&self, id: usize) -> Result<(), String> {
        self.producer
            .send(
                self.client
                    .send_message()
                    .queue_url(&self.queue)
                    .message_body(id.to_string()),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    pub(crate) async fn finish(&mut self) -> Result<String, String> {
        match self.consumer.take() {
            Some(c) => c.await.map_err(|e| e.to_string()),
            None => Ok(String::new()),
        }
    }

    pub(crate) async fn dead_letters(&self) -> Result<BTreeSet<usize>, String> {
        let mut ids = BTreeSet::new();
        loop {
            let got = self
                .client
                .receive_message()
                .queue_url(&self.dead)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .send()
                .await
                .map_err(|e| e.to_string())?
                .messages
                .unwrap_or_default();
            if got.is_empty() {
                return Ok(ids);
            }
            for m in got {
                ids.extend(m.body().and_then(|b| id_of(b.as_bytes())));
                if let Some(handle) = m.receipt_handle() {
                    self.client
                        .delete_message()
                        .queue_url(&self.dead)
                        .receipt_handle(handle)
                        .send()
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
        }
    }
}
