//! Delivery guarantees of the Lambda wrapper, on the SQS emulator: a small event
//! source mapping receives from a real queue, hands the records to the wrapper as
//! Lambda's SQS event JSON, and deletes what the partial batch response does not
//! list, as Lambda does. Each run is checked with `mqtrace_testing::delivery`.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName, QueueAttributeName};
use lambda_runtime::LambdaEvent;
use mqtrace::{HandlerError, HandlerResult, Instrumenter, RetryPolicy};
use mqtrace_aws_lambda::TracedSqsHandler;
use mqtrace_testing::delivery::{Contract, Ledger};

use super::{setup, sqs_client, Setup};

/// A queue on the emulator and the mapping's view of it.
struct Mapping {
    client: aws_sdk_sqs::Client,
    url: String,
    name: String,
}

impl Mapping {
    async fn create(client: &aws_sdk_sqs::Client, base: &str, fifo: bool) -> Self {
        let run = format!("{:08x}", fastrand_u32());
        let name = if fifo {
            format!("{base}-{run}.fifo")
        } else {
            format!("{base}-{run}")
        };
        let mut request = client.create_queue().queue_name(&name);
        if fifo {
            request = request
                .attributes(QueueAttributeName::FifoQueue, "true")
                .attributes(QueueAttributeName::ContentBasedDeduplication, "true");
        }
        let url = request.send().await.unwrap().queue_url.unwrap();
        Self {
            client: client.clone(),
            url,
            name,
        }
    }

    async fn send(&self, body: &str, group: Option<&str>) {
        self.client
            .send_message()
            .queue_url(&self.url)
            .message_body(body)
            .set_message_group_id(group.map(str::to_owned))
            .send()
            .await
            .unwrap();
    }

    /// One receive, as the event source mapping makes it.
    async fn receive(&self, visibility: i32, wait: i32) -> Vec<Message> {
        self.client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(10)
            .visibility_timeout(visibility)
            .wait_time_seconds(wait)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .unwrap()
            .messages
            .unwrap_or_default()
    }

    /// The messages as Lambda's SQS event JSON.
    fn event(&self, messages: &[Message]) -> SqsEvent {
        let records: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| {
                let attributes: serde_json::Map<String, serde_json::Value> = m
                    .attributes()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.as_str().to_owned(), v.clone().into()))
                    .collect();
                let message_attributes: serde_json::Map<String, serde_json::Value> = m
                    .message_attributes()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            serde_json::json!({
                                "stringValue": v.string_value(),
                                "stringListValues": [],
                                "binaryListValues": [],
                                "dataType": v.data_type(),
                            }),
                        )
                    })
                    .collect();
                serde_json::json!({
                    "messageId": m.message_id(),
                    "receiptHandle": m.receipt_handle(),
                    "body": m.body(),
                    "attributes": attributes,
                    "messageAttributes": message_attributes,
                    "md5OfBody": m.md5_of_body(),
                    "eventSource": "aws:sqs",
                    "eventSourceARN": format!("arn:aws:sqs:eu-west-1:123456789012:{}", self.name),
                    "awsRegion": "eu-west-1",
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({ "Records": records })).unwrap()
    }

    /// What Lambda does with a response: deletes the records it does not list.
    /// The listed ones are made visible again at once, where Lambda lets their
    /// visibility timeout run out: the same for SQS, but moto, when a FIFO
    /// group's messages time out together, clears them from its in-flight set
    /// one at a time as it scans and hands out the group's last message first.
    async fn settle(&self, messages: &[Message], response: &SqsBatchResponse) {
        let failed: BTreeSet<&str> = response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.as_str())
            .collect();
        for m in messages {
            let handle = m.receipt_handle().unwrap();
            if failed.contains(m.message_id().unwrap()) {
                self.client
                    .change_message_visibility()
                    .queue_url(&self.url)
                    .receipt_handle(handle)
                    .visibility_timeout(0)
                    .send()
                    .await
                    .unwrap();
            } else {
                self.client
                    .delete_message()
                    .queue_url(&self.url)
                    .receipt_handle(handle)
                    .send()
                    .await
                    .unwrap();
            }
        }
    }

    /// Every body left on the queue (received, then deleted).
    async fn drain(&self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let got = self.receive(30, 1).await;
            if got.is_empty() {
                return out;
            }
            for m in &got {
                self.client
                    .delete_message()
                    .queue_url(&self.url)
                    .receipt_handle(m.receipt_handle().unwrap())
                    .send()
                    .await
                    .unwrap();
                out.push(m.body().unwrap_or_default().to_owned());
            }
        }
    }

    async fn delete(&self) {
        let _ = self.client.delete_queue().queue_url(&self.url).send().await;
    }
}

fn fastrand_u32() -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    nanos ^ std::process::id().rotate_left(16)
}

/// A context whose deadline is `left` from now.
fn context_with(left: Duration) -> lambda_runtime::Context {
    let mut context = lambda_runtime::Context::default();
    context.request_id = "req-deadline".into();
    context.deadline = u64::try_from(
        (SystemTime::now() + left)
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    context
}

/// Issue 24 item 6. A FIFO group whose first record always fails, with mqtrace's
/// dead-letter queue and a budget of 3 attempts: each invocation holds back the
/// group's later records, whose receive counts rise with the failed one's. When
/// the failed record is dead-lettered on its third receive, the held records
/// must be left for redelivery and handled on the next one, in order.
///
/// Failed before the fix: the held records reached the budget together with the
/// failed one and were dead-lettered on their third receive without ever being
/// handed to the handler ("dead-lettered without ever being handled:
/// ["g-1", "g-2"]").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_records_held_behind_a_failure_are_never_dead_lettered() {
    let client = sqs_client();
    let queue = Mapping::create(&client, "lambda-orders", true).await;
    let dead = Mapping::create(&client, "lambda-orders-dead", true).await;
    let Setup {
        guard, provider, ..
    } = setup().await;
    let instrumenter = Instrumenter::builder()
        .tracer_provider(&provider)
        .retry_policy(RetryPolicy::attempts(3))
        .build();
    let traced = TracedSqsHandler::new(&instrumenter, guard.flusher())
        .dead_letter_queue(client.clone(), &dead.url);
    let ledger = Ledger::new();
    for body in ["g-0", "g-1", "g-2"] {
        queue.send(body, Some("g")).await;
        ledger.sent(body, "g");
    }
    let mut rounds = 0;
    loop {
        let messages = queue.receive(30, 2).await;
        if messages.is_empty() {
            break;
        }
        rounds += 1;
        assert!(rounds < 10, "the group never drained");
        let seen: Vec<String> = messages
            .iter()
            .map(|m| {
                let count = m
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .map_or("?", String::as_str);
                format!("{} (receive {count})", m.body().unwrap_or_default())
            })
            .collect();
        println!("round {rounds}: {seen:?}");
        let event = queue.event(&messages);
        let response = traced
            .handle(
                LambdaEvent::new(event, lambda_runtime::Context::default()),
                |record| {
                    let body = record.body.clone().unwrap_or_default();
                    let invocation = ledger.started(body.clone());
                    async move {
                        let ok = body != "g-0";
                        invocation.finished(ok);
                        if ok {
                            HandlerResult::Ok(())
                        } else {
                            Err(HandlerError::transient("inventory down"))
                        }
                    }
                },
            )
            .await
            .unwrap();
        queue.settle(&messages, &response).await;
    }
    let dead_letters = dead.drain().await;
    ledger.dead_lettered(dead_letters.clone());
    ledger.waiting(queue.drain().await);
    // The ledger also finds a dead letter the handler never saw.
    ledger.check(
        "lambda fifo, a group held behind a failure with a dead-letter queue",
        Contract::ordered(),
    );
    assert_eq!(dead_letters, ["g-0"]);
    assert_eq!((ledger.successes("g-1"), ledger.successes("g-2")), (1, 1));
    queue.delete().await;
    dead.delete().await;
}

/// Issue 24 item 10. Six records of 400 ms each in an invocation with 2 s left:
/// records stop being started at the deadline less the margin (a quarter of the
/// time left here, 500 ms), the unstarted ones are reported as failures and stay
/// on the queue, and `handle` returns before the deadline. A second invocation
/// whose flush hangs (a collector that does not answer) returns before its
/// deadline too.
///
/// Failed before the fix: every record was started whatever the time, and
/// `handle` returned about 2.4 s after it was called, past the 2 s deadline
/// (Lambda would have stopped the invocation, failed the whole batch and lost
/// its spans); the hanging flush held the return for its whole 4 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_stop_before_the_invocation_deadline() {
    let client = sqs_client();
    let queue = Mapping::create(&client, "lambda-deadline", false).await;
    let Setup {
        collector,
        guard,
        instrumenter,
        ..
    } = setup().await;
    let traced = TracedSqsHandler::new(&instrumenter, guard.flusher());
    let ledger = Ledger::new();
    for i in 0..6 {
        let body = format!("m-{i}");
        queue.send(&body, None).await;
        ledger.sent(body, "");
    }
    let mut messages = Vec::new();
    while messages.len() < 6 {
        let got = queue.receive(30, 1).await;
        assert!(
            !got.is_empty(),
            "the emulator returned {} of 6",
            messages.len()
        );
        messages.extend(got);
    }
    let left = Duration::from_secs(2);
    let context = context_with(left);
    let deadline = context.deadline();
    let handler = |record: &aws_lambda_events::event::sqs::SqsMessage| {
        let invocation = ledger.started(record.body.clone().unwrap_or_default());
        async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            invocation.finished(true);
            HandlerResult::Ok(())
        }
    };
    let response = traced
        .handle(LambdaEvent::new(queue.event(&messages), context), handler)
        .await
        .unwrap();
    let returned = SystemTime::now();
    let late = returned.duration_since(deadline).ok();
    assert!(
        late.is_none(),
        "handle returned {late:?} after the deadline"
    );
    let failed = response.batch_item_failures.len();
    assert!((1..6).contains(&failed), "{failed} of 6 reported failed");
    queue.settle(&messages, &response).await;
    // The spans of the started and unstarted records were exported before the
    // return: invocation, batch and six records.
    let spans = collector.spans();
    assert_eq!(spans.len(), 8, "{spans:#?}");
    let unstarted = spans
        .iter()
        .filter(|s| {
            s.name.starts_with("process ")
                && s.attr("error.type").and_then(|v| v.as_str()) == Some("deadline_near")
        })
        .count();
    assert_eq!(unstarted, failed);

    // A flush that hangs is not waited for past the deadline.
    let hanging = TracedSqsHandler::new(&instrumenter, || {
        std::thread::sleep(Duration::from_secs(4));
    });
    let messages = queue.receive(30, 2).await;
    assert_eq!(messages.len(), failed);
    let context = context_with(Duration::from_secs(2));
    let deadline = context.deadline();
    let response = hanging
        .handle(LambdaEvent::new(queue.event(&messages), context), handler)
        .await
        .unwrap();
    let late = SystemTime::now().duration_since(deadline).ok();
    assert!(
        late.is_none(),
        "handle returned {late:?} after the deadline"
    );
    assert!(response.batch_item_failures.is_empty());
    queue.settle(&messages, &response).await;
    ledger.waiting(queue.drain().await);
    ledger.check(
        "lambda, records near the invocation deadline",
        Contract::at_least_once().duplicates(0),
    );
    queue.delete().await;
}
