//! Delivery guarantees of the Lambda wrapper, on the SQS emulator: a small event
//! source mapping receives from a real queue, hands the records to the wrapper as
//! Lambda's SQS event JSON, and deletes what the partial batch response does not
//! list, as Lambda does. Each run is checked with `mqtrace_testing::delivery`.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName, QueueAttributeName};
use lambda_runtime::LambdaEvent;
use mqtrace::{HandlerError, HandlerResult, Instrumenter, RetryPolicy};
use mqtrace_aws_lambda::TracedSqsHandler;
use mqtrace_telemetry::TelemetryBuilder;
use mqtrace_testing::delivery::{Contract, Ledger, Settled};
use tokio::sync::Notify;

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

    /// Receives until `n` messages are in hand (the emulator may return fewer
    /// per call), each kept invisible for `visibility` seconds.
    async fn receive_n(&self, n: usize, visibility: i32) -> Vec<Message> {
        let mut messages = Vec::new();
        while messages.len() < n {
            let got = self.receive(visibility, 2).await;
            assert!(
                !got.is_empty(),
                "the emulator returned {} of {n}",
                messages.len()
            );
            messages.extend(got);
        }
        messages
    }

    /// What Lambda does with a response: deletes the records it does not list.
    /// The listed ones are made visible again at once, where Lambda lets their
    /// visibility timeout run out: the same for SQS, but moto, when a FIFO
    /// group's messages time out together, clears them from its in-flight set
    /// one at a time as it scans and hands out the group's last message first.
    /// Returns the bodies it deleted.
    async fn settle(&self, messages: &[Message], response: &SqsBatchResponse) -> Vec<String> {
        let mut deleted = Vec::new();
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
                deleted.push(m.body().unwrap_or_default().to_owned());
            }
        }
        deleted
    }

    /// Every body left on the queue (received, then deleted).
    async fn drain(&self) -> Vec<String> {
        self.drain_waiting(1).await
    }

    /// [`Mapping::drain`], each receive long-polling `wait` seconds (0: what is
    /// there now, for a queue whose messages were all sent before).
    async fn drain_waiting(&self, wait: i32) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let got = self.receive(30, wait).await;
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

/// The bodies of the records `response` lists as failed, in the batch's order.
fn failed_bodies(messages: &[Message], response: &SqsBatchResponse) -> Vec<String> {
    let failed: BTreeSet<&str> = response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect();
    messages
        .iter()
        .filter(|m| failed.contains(m.message_id().unwrap_or_default()))
        .map(|m| m.body().unwrap_or_default().to_owned())
        .collect()
}

/// Records the mapping's deletes in the ledger: a record whose copy the test
/// found in the dead-letter queue was settled as a forward, any other as done
/// (so a record deleted before its handler succeeded is settled early).
fn record_deletes(ledger: &Ledger, deleted: &[String], dead_letters: &[String]) {
    for body in deleted {
        let how = if dead_letters.contains(body) {
            Settled::Forwarded
        } else {
            Settled::Done
        };
        ledger.settled(body, how);
    }
}

/// The records of the mixed batch: `perm` fails permanently every time, `boom`
/// panics on its first receive and succeeds on the next, the others succeed.
const MIXED: [&str; 4] = ["ok-1", "perm", "boom", "ok-2"];

/// What a run of [`mixed_batch`] saw.
struct MixedRun {
    ledger: Ledger,
    /// The bodies each invocation's response listed as failed.
    reported: Vec<Vec<String>>,
    /// Every copy found in the dead-letter queue.
    dead_letters: Vec<String>,
    /// The bodies found still on the queue at the end.
    waiting: Vec<String>,
}

/// [`MIXED`] on a standard queue through the mapping, with a dead-letter queue
/// that exists or was deleted beforehand: an invocation, the mapping's deletes,
/// then one more invocation of what the first left on the queue. The copies in
/// the dead-letter queue are read after each invocation, before the mapping
/// deletes anything.
async fn mixed_batch(base: &str, dead_letter_queue_exists: bool) -> MixedRun {
    let client = sqs_client();
    let queue = Mapping::create(&client, base, false).await;
    let dead = Mapping::create(&client, &format!("{base}-dead"), false).await;
    if !dead_letter_queue_exists {
        dead.delete().await;
    }
    let Setup {
        guard,
        instrumenter,
        ..
    } = setup().await;
    let traced = TracedSqsHandler::new(&instrumenter, guard.flusher())
        .dead_letter_queue(client.clone(), &dead.url);
    let ledger = Ledger::new();
    // A standard queue promises no order: each record is its own order scope.
    for body in MIXED {
        queue.send(body, None).await;
        ledger.sent(body, body);
    }
    let handler = |record: &SqsMessage| {
        let body = record.body.clone().unwrap_or_default();
        let first_receive = record
            .attributes
            .get("ApproximateReceiveCount")
            .map(String::as_str)
            == Some("1");
        let invocation = ledger.started(body.clone());
        async move {
            match body.as_str() {
                "perm" => {
                    invocation.finished(false);
                    Err(HandlerError::permanent("order rejected").with_type("rejected"))
                }
                "boom" if first_receive => {
                    invocation.finished(false);
                    panic!("the handler panicked on {body}");
                }
                _ => {
                    invocation.finished(true);
                    HandlerResult::Ok(())
                }
            }
        }
    };
    let mut reported = Vec::new();
    let mut dead_letters = Vec::new();
    let mut expected = MIXED.len();
    for round in 1..=2 {
        let messages = queue.receive_n(expected, 30).await;
        let response = traced
            .handle(
                LambdaEvent::new(
                    queue.event(&messages),
                    context_with(Duration::from_secs(20)),
                ),
                handler,
            )
            .await
            .unwrap();
        let failed = failed_bodies(&messages, &response);
        if dead_letter_queue_exists {
            dead_letters.extend(dead.drain_waiting(0).await);
        }
        let deleted = queue.settle(&messages, &response).await;
        record_deletes(&ledger, &deleted, &dead_letters);
        println!("invocation {round}: reported failed {failed:?}, deleted {deleted:?}, dead letters so far {dead_letters:?}");
        expected = failed.len();
        reported.push(failed);
    }
    let waiting = queue.drain().await;
    ledger.waiting(waiting.clone());
    ledger.dead_lettered(dead_letters.clone());
    queue.delete().await;
    dead.delete().await;
    MixedRun {
        ledger,
        reported,
        dead_letters,
        waiting,
    }
}

/// Issue 24, the Lambda cells of a permanent failure and a panicking handler,
/// through the ledger: with mqtrace's dead-letter queue, the permanent record
/// is sent there and then deleted (its copy is found in the dead-letter queue);
/// the handler that panics is a failure like any other, reported in the partial
/// batch response, so the mapping leaves it on the queue and the next
/// invocation handles it. The records around them are deleted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_is_dead_lettered_and_a_panic_is_retried() {
    let run = mixed_batch("lambda-mixed", true).await;
    let a = run.ledger.check(
        "lambda, ok / permanent / panic / ok with a dead-letter queue",
        Contract::at_least_once().duplicates(0),
    );
    assert_eq!(run.reported, [vec!["boom".to_owned()], vec![]]);
    assert_eq!(run.dead_letters, ["perm"]);
    assert!(run.waiting.is_empty(), "{:?}", run.waiting);
    assert_eq!(run.ledger.successes("boom"), 1);
    assert_eq!((a.processed, a.failed_attempts, a.dead_lettered), (3, 2, 1));
}

/// Issue 24, the Lambda cell of a dead-letter queue missing: the same batch with
/// the dead-letter queue deleted beforehand. The copy of the permanent record
/// is refused, so the record is not dropped: it is reported in the partial
/// batch response of each invocation, and the mapping leaves it on the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_stays_on_the_queue_when_the_dead_letter_queue_is_gone() {
    let run = mixed_batch("lambda-no-dlq", false).await;
    let a = run.ledger.check(
        "lambda, ok / permanent / panic / ok with the dead-letter queue deleted",
        Contract::at_least_once().duplicates(0),
    );
    assert_eq!(
        run.reported,
        [
            vec!["perm".to_owned(), "boom".to_owned()],
            vec!["perm".to_owned()]
        ]
    );
    assert_eq!(run.waiting, ["perm"]);
    assert_eq!(run.ledger.successes("boom"), 1);
    assert_eq!((a.processed, a.failed_attempts, a.waiting), (3, 3, 1));
}

/// Issue 24, the Lambda cell of a killed consumer: Lambda stopping an
/// invocation (its timeout, or the sandbox killed) drops the `handle` future
/// with records in flight and gets no response, so it deletes nothing and the
/// batch comes back once the visibility timeout runs out. Six records, two at a
/// time, the second failing permanently (with a dead-letter queue), the
/// invocation dropped as the fifth starts: what mqtrace did before the kill is
/// only the dead letter of a record whose handler had finished; a new
/// invocation of the same six records handles them all. Records finished
/// before the kill run twice (at-least-once), the dead letter is sent twice,
/// nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invocation_killed_mid_batch_leaves_its_records_for_the_next() {
    let client = sqs_client();
    let queue = Mapping::create(&client, "lambda-killed", false).await;
    let dead = Mapping::create(&client, "lambda-killed-dead", false).await;
    let Setup {
        guard,
        instrumenter,
        ..
    } = setup().await;
    let traced = TracedSqsHandler::new(&instrumenter, guard.flusher())
        .dead_letter_queue(client.clone(), &dead.url)
        .concurrency(2);
    let ledger = Ledger::new();
    let bodies: Vec<String> = (0..6).map(|i| format!("k-{i}")).collect();
    for body in &bodies {
        queue.send(body, None).await;
        ledger.sent(body, body);
    }
    let started: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let finished: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let kill = Notify::new();
    let handler = |record: &SqsMessage| {
        let body = record.body.clone().unwrap_or_default();
        let (ledger, started, finished, kill) = (&ledger, &started, &finished, &kill);
        async move {
            let invocation = ledger.started(body.clone());
            started.lock().unwrap().push(body.clone());
            if body == "k-4" {
                kill.notify_one();
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
            let ok = body != "k-1";
            finished.lock().unwrap().push(body.clone());
            invocation.finished(ok);
            if ok {
                HandlerResult::Ok(())
            } else {
                Err(HandlerError::permanent("order rejected").with_type("rejected"))
            }
        }
    };

    // The first invocation: visibility 1 s, as Lambda's mapping would set it
    // to the function's timeout.
    let first = queue.receive_n(6, 1).await;
    let invocation = traced.handle(
        LambdaEvent::new(queue.event(&first), context_with(Duration::from_secs(20))),
        handler,
    );
    tokio::select! {
        response = invocation => panic!("the invocation ended before the kill: {response:?}"),
        () = kill.notified() => {}
    }
    // The future is dropped: no response, so the mapping deletes nothing.
    let started_before = started.lock().unwrap().clone();
    let finished_before = finished.lock().unwrap().clone();
    let in_flight: Vec<&String> = started_before
        .iter()
        .filter(|b| !finished_before.contains(b))
        .collect();
    println!("killed with {in_flight:?} in flight, {finished_before:?} finished");
    assert!(!in_flight.is_empty(), "nothing was in flight at the kill");
    let mut dead_letters = dead.drain_waiting(0).await;
    for body in &dead_letters {
        assert!(
            finished_before.contains(body),
            "{body} was dead-lettered before its handler finished"
        );
    }

    // Lambda hands the same records out again once the visibility timeout runs out.
    let second = queue.receive_n(6, 30).await;
    let ids = |messages: &[Message]| -> BTreeSet<String> {
        messages
            .iter()
            .map(|m| m.message_id().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(ids(&second), ids(&first), "not the same records");
    let response = traced
        .handle(
            LambdaEvent::new(queue.event(&second), context_with(Duration::from_secs(20))),
            handler,
        )
        .await
        .unwrap();
    assert!(
        response.batch_item_failures.is_empty(),
        "{:?}",
        response.batch_item_failures
    );
    dead_letters.extend(dead.drain_waiting(0).await);
    let deleted = queue.settle(&second, &response).await;
    record_deletes(&ledger, &deleted, &dead_letters);
    ledger.waiting(queue.drain().await);
    ledger.dead_lettered(dead_letters.clone());
    let a = ledger.check(
        "lambda, an invocation killed mid-batch and run again",
        Contract::at_least_once(),
    );
    println!("dead-letter copies {dead_letters:?}");
    // Each record whose handler succeeded before the kill ran once more.
    let succeeded_before = finished_before.iter().filter(|b| *b != "k-1").count();
    assert_eq!(a.duplicates, succeeded_before as u64);
    assert_eq!(a.processed, 5);
    assert_eq!(dead_letters, ["k-1", "k-1"]);
    queue.delete().await;
    dead.delete().await;
}

/// Issue 24, the Lambda cell of a collector down: telemetry exports to a port
/// where nothing listens. The exporter retries a refused connection with
/// backoff (100, 200, 400 ms and jitter, for the spans and again for the
/// metrics: well over a second here), longer than this invocation's 1 s. The
/// batch is handled and answered as usual, and `handle` returns before the
/// deadline: the failing export neither fails the invocation nor holds it past
/// its bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_neither_fails_nor_holds_the_batch() {
    let client = sqs_client();
    let queue = Mapping::create(&client, "lambda-no-collector", false).await;
    let port = mqtrace_testing::faults::free_port().unwrap();
    let guard = TelemetryBuilder::default()
        .service_name("orders-lambda")
        .endpoint(format!("http://127.0.0.1:{port}"))
        .install_global(false)
        .shutdown_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let instrumenter = guard.instrumenter().build();
    let traced = TracedSqsHandler::new(&instrumenter, guard.flusher());
    let ledger = Ledger::new();
    for i in 0..3 {
        let body = format!("c-{i}");
        queue.send(&body, None).await;
        ledger.sent(body.clone(), body);
    }
    let messages = queue.receive_n(3, 30).await;
    let context = context_with(Duration::from_secs(1));
    let deadline = context.deadline();
    let began = Instant::now();
    let response = traced
        .handle(
            LambdaEvent::new(queue.event(&messages), context),
            |record| {
                let invocation = ledger.started(record.body.clone().unwrap_or_default());
                async move {
                    invocation.finished(true);
                    HandlerResult::Ok(())
                }
            },
        )
        .await
        .unwrap();
    let took = began.elapsed();
    let late = SystemTime::now().duration_since(deadline).ok();
    let stats = guard.stats();
    println!(
        "handle took {took:?} with the collector unreachable; spans ended {}, exported {}, failed {}",
        stats.ended, stats.exported, stats.failed
    );
    assert!(
        late.is_none(),
        "handle returned {late:?} after the deadline"
    );
    assert!(
        response.batch_item_failures.is_empty(),
        "{:?}",
        response.batch_item_failures
    );
    assert_eq!(stats.exported, 0, "nothing listens on {port}");
    let deleted = queue.settle(&messages, &response).await;
    record_deletes(&ledger, &deleted, &[]);
    ledger.waiting(queue.drain().await);
    ledger.check(
        "lambda, the collector unreachable",
        Contract::at_least_once().duplicates(0),
    );
    queue.delete().await;
}
