//! Traced consuming: long polling, receive and process spans, settlement.

use std::future::Future;
use std::time::Duration;

use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::SdkError;
use aws_sdk_sqs::operation::receive_message::ReceiveMessageError;
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName, QueueAttributeName};
use aws_sdk_sqs::Client;
use mqtrace::settle::{ConsumerCounters, ConsumerStats, Settled};
use mqtrace::{Attempt, Disposition, HandlerError, HandlerResult, Instrumenter, OperationType};

use crate::carrier::MessageAttributesExtractor;
use crate::describe::{describe, error_type};
use crate::process::{
    carriers, receive_count, system_attribute, DeleteBatch, Incoming, MessageTracer,
};

/// A received message as the handler sees it.
#[derive(Debug, Clone)]
pub struct Received {
    message: Message,
    attempt: u32,
}

// === impl Received ===

impl Received {
    /// The SDK's message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// Which delivery attempt this is (1 = first): SQS's receive count.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The body.
    pub fn body(&self) -> &str {
        self.message.body().unwrap_or_default()
    }

    /// The message id.
    pub fn message_id(&self) -> Option<&str> {
        self.message.message_id()
    }

    /// A `String` message attribute.
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.message
            .message_attributes()
            .and_then(|a| MessageAttributesExtractor(a).value(name))
    }

    /// A system attribute (`ApproximateReceiveCount`, `MessageGroupId`...).
    pub fn system_attribute(&self, name: &MessageSystemAttributeName) -> Option<&str> {
        system_attribute(&self.message, name)
    }

    /// How many times SQS has handed the message out (1 on the first receive).
    pub fn receive_count(&self) -> Option<u32> {
        receive_count(&self.message)
    }

    /// The body decoded as JSON. Invalid JSON is a permanent failure
    /// (`error.type = invalid_json`).
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_str(self.body())
            .map_err(|e| HandlerError::permanent(e).with_type("invalid_json"))
    }
}

impl From<Message> for Received {
    /// A message as received; its attempt is SQS's receive count (1 when the
    /// count was not requested).
    fn from(message: Message) -> Self {
        let attempt = receive_count(&message).unwrap_or(1);
        Self { message, attempt }
    }
}

/// The producer's context in a received message, for code that keeps its own
/// receive loop: `propagation`'s formats on the message attributes first, then
/// X-Ray on `AWSTraceHeader`. Starts from an empty context; a message without a
/// usable context gives an invalid span context. Request the attributes when
/// receiving (`message_attribute_names("All")`, `AWSTraceHeader` among the system
/// attribute names).
pub fn trace_context(
    message: &Message,
    propagation: &mqtrace::Propagation,
) -> opentelemetry::Context {
    let carriers = carriers(
        message.message_attributes(),
        message
            .attributes()
            .and_then(|a| a.get(&MessageSystemAttributeName::AwsTraceHeader))
            .map(String::as_str),
    );
    propagation.with_xray_fallback().extract(&carriers)
}

type ReceiveError = SdkError<ReceiveMessageError, HttpResponse>;

/// `error.type` of a FIFO message not handed to the handler because an earlier
/// message of its group failed in the same receive.
pub const FIFO_GROUP_BLOCKED_ERROR: &str = "fifo_group_blocked";

/// Why [`TracedConsumer::run_until`] stopped before being asked to.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// SQS refused the consumer (the queue does not exist, the credentials are
    /// not accepted): trying again would not help. What was handled until then is
    /// in `stats`.
    #[error("SQS refused the consumer ({code}): {error}")]
    Refused {
        /// SQS's error code (`AWS.SimpleQueueService.NonExistentQueue`...).
        code: String,
        /// The SDK's error, unchanged.
        #[source]
        error: Box<ReceiveError>,
        /// What the consumer did before it stopped.
        stats: ConsumerStats,
    },
}

/// A receive's messages of one FIFO group (or one message without a group),
/// with their places in the receive.
type Group<'a> = (Option<&'a str>, Vec<(usize, &'a Received)>);

/// The messages of one receive that are not settled yet: kept invisible while
/// they wait for their turn or their handler runs.
struct InFlight {
    visibility: Duration,
    /// Per message of the receive.
    entries: std::sync::Mutex<Vec<Visibility>>,
    /// Asks for the pending deletes to go now.
    flush: tokio::sync::Notify,
}

/// One message of a receive: its receipt handle, until when it is invisible,
/// and whether it is still to be settled.
#[derive(Debug)]
struct Visibility {
    handle: Option<String>,
    until: std::time::Instant,
    open: bool,
}

// === impl InFlight ===

impl InFlight {
    fn new(messages: &[Received], received_at: std::time::Instant, visibility: Duration) -> Self {
        let until = received_at + visibility;
        Self {
            visibility,
            entries: std::sync::Mutex::new(
                messages
                    .iter()
                    .map(|m| Visibility {
                        handle: m.message().receipt_handle().map(str::to_owned),
                        until,
                        open: true,
                    })
                    .collect(),
            ),
            flush: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Visibility>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Message `i` is settled (or left): no longer kept invisible.
    fn settled(&self, i: usize) {
        if let Some(entry) = self.lock().get_mut(i) {
            entry.open = false;
        }
    }

    /// The messages still to be settled whose visibility is half gone.
    fn due(&self) -> (Vec<usize>, Vec<String>) {
        if self.visibility.is_zero() {
            return (Vec::new(), Vec::new());
        }
        let now = std::time::Instant::now();
        let half = self.visibility / 2;
        self.lock()
            .iter()
            .enumerate()
            .filter(|(_, v)| v.open && v.until.saturating_duration_since(now) <= half)
            .filter_map(|(i, v)| Some((i, v.handle.clone()?)))
            .unzip()
    }

    /// The extensions SQS accepted, made at `at`.
    fn extended(&self, indices: &[usize], accepted: &[bool], at: std::time::Instant) {
        let mut entries = self.lock();
        for (i, ok) in indices.iter().zip(accepted) {
            if let (true, Some(entry)) = (*ok, entries.get_mut(*i)) {
                entry.until = at + self.visibility;
            }
        }
    }
}

/// Whether a failed receive means SQS will not serve this consumer.
fn refuses(error: &ReceiveError) -> bool {
    use aws_sdk_sqs::error::ProvideErrorMetadata as _;
    if matches!(error.as_service_error(), Some(e) if e.is_queue_does_not_exist()) {
        return true;
    }
    matches!(
        error.code(),
        Some(
            "AWS.SimpleQueueService.NonExistentQueue"
                | "QueueDoesNotExist"
                | "InvalidClientTokenId"
                | "UnrecognizedClientException"
                | "SignatureDoesNotMatch"
                | "AccessDenied"
                | "AccessDeniedException"
                | "InvalidSecurity"
        )
    )
}

/// Polls a queue with long polling and processes each message inside a `process`
/// span (CONSUMER), settling by outcome after its handler has finished:
///
/// - success: deleted;
/// - transient failure: left on the queue, so SQS hands it out again after the
///   visibility timeout and its redrive policy, if any, moves it on after
///   `maxReceiveCount` receives. With a dead-letter queue set here, a message whose
///   retry budget is spent (by `ApproximateReceiveCount`) is forwarded there and
///   deleted;
/// - permanent failure: forwarded to the dead-letter queue with its metadata and
///   the original body, then deleted; without one, deleted and recorded as
///   `dropped`.
///
/// FIFO queues: a receive's messages of one message group are handled in
/// order, and once one of them fails, the group's later messages of that
/// receive are neither handled nor deleted: they are left for SQS to hand out
/// again after the failed one (their spans say
/// `error.type = fifo_group_blocked`; they are never dead-lettered).
///
/// Each non-empty poll gets a `receive` span (CLIENT) linking every message
/// (on by default; empty polls only when asked). A poll's messages are processed
/// concurrently, each in its own context.
#[derive(Debug, Clone)]
pub struct TracedConsumer {
    tracer: MessageTracer,
    wait_time: i32,
    max_messages: i32,
    visibility_timeout: Option<i32>,
    receive_spans: bool,
    empty_receive_spans: bool,
    queue_depth: Option<Duration>,
    /// `DeleteMessageBatch` calls made, shared by the consumer's clones.
    delete_requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    max_delete_delay: Duration,
}

/// The default of [`TracedConsumer::max_delete_delay`].
pub const DEFAULT_MAX_DELETE_DELAY: Duration = Duration::from_secs(1);

/// The visibility timeout assumed when the queue's cannot be read.
const ASSUMED_VISIBILITY: Duration = Duration::from_secs(30);

/// `mqtrace.aws_sqs.queue.messages`: SQS's approximate message counts of the
/// queue, by `mqtrace.aws_sqs.queue.state` ([`QUEUE_STATE`]), when asked for with
/// [`TracedConsumer::queue_depth_every`].
pub const QUEUE_MESSAGES: &str = "mqtrace.aws_sqs.queue.messages";
/// `mqtrace.aws_sqs.queue.state`: `visible` (`ApproximateNumberOfMessages`),
/// `in_flight` (`…NotVisible`) or `delayed` (`…Delayed`).
pub const QUEUE_STATE: &str = "mqtrace.aws_sqs.queue.state";

// === impl TracedConsumer ===

impl TracedConsumer {
    /// A consumer of the queue at `queue_url`. Extraction uses the instrumenter's
    /// formats on message attributes, then X-Ray on `AWSTraceHeader`.
    pub fn new(client: Client, queue_url: impl Into<String>, instrumenter: &Instrumenter) -> Self {
        Self {
            tracer: MessageTracer::new(client, queue_url, instrumenter),
            wait_time: 20,
            max_messages: 10,
            visibility_timeout: None,
            receive_spans: true,
            empty_receive_spans: false,
            queue_depth: None,
            delete_requests: std::sync::Arc::default(),
            max_delete_delay: DEFAULT_MAX_DELETE_DELAY,
        }
    }

    /// How long a handled message's delete may wait to join others of its
    /// receive in one `DeleteMessageBatch` (default
    /// [`DEFAULT_MAX_DELETE_DELAY`], 1 s; never more than an eighth of the
    /// visibility timeout). The pending deletes also go when ten are waiting,
    /// when a FIFO message group of the receive is done, and when the whole
    /// receive is; so a slow message never holds back the deletes of fast ones
    /// until their visibility timeout has passed.
    pub fn max_delete_delay(mut self, delay: Duration) -> Self {
        self.max_delete_delay = delay;
        self
    }

    /// `DeleteMessageBatch` calls made so far. The messages of a receive that are
    /// deleted (settled, or forwarded to the dead-letter queue) go together, by
    /// age ([`TracedConsumer::max_delete_delay`]), unless settle spans are on
    /// (each describes one `DeleteMessage`). A message whose delete fails is
    /// received again after its visibility timeout: duplicated, never lost.
    pub fn delete_requests(&self) -> u64 {
        self.delete_requests
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads the queue's approximate depth every `interval` while the consumer
    /// runs (one `GetQueueAttributes` call each, beside the receives) and records
    /// it as the [`QUEUE_MESSAGES`] gauge (default: off; off too when the
    /// instrumenter's metrics are).
    pub fn queue_depth_every(mut self, interval: Duration) -> Self {
        self.queue_depth = Some(interval.max(Duration::from_millis(100)));
        self
    }

    /// Beside the consumer loop: the queue depth every interval, until `stop`.
    async fn watch_depth(&self, stop: &tokio::sync::Notify) {
        // Off with the instrumenter's metrics: no gauge, and no calls for it.
        let Some(every) = self
            .queue_depth
            .filter(|_| self.tracer.instrumenter().metrics_on())
        else {
            return;
        };
        let gauge = self
            .tracer
            .instrumenter()
            .meter()
            .i64_gauge(QUEUE_MESSAGES)
            .with_unit("{message}")
            .with_description("SQS's approximate message counts of the queue.")
            .build();
        let mut base = Vec::new();
        let instrumenter = self.tracer.instrumenter();
        instrumenter
            .conventions()
            .system_attributes(mqtrace::MessagingSystem::AwsSqs, &mut base);
        base.push(opentelemetry::KeyValue::new(
            mqtrace::conventions::attr::MESSAGING_DESTINATION_NAME,
            crate::describe::queue_name(self.tracer.queue_url()).to_owned(),
        ));
        let sets: Vec<(QueueAttributeName, Vec<opentelemetry::KeyValue>)> = [
            (QueueAttributeName::ApproximateNumberOfMessages, "visible"),
            (
                QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
                "in_flight",
            ),
            (
                QueueAttributeName::ApproximateNumberOfMessagesDelayed,
                "delayed",
            ),
        ]
        .into_iter()
        .map(|(name, state)| {
            let mut set = base.clone();
            set.push(opentelemetry::KeyValue::new(QUEUE_STATE, state));
            (name, set)
        })
        .collect();
        loop {
            let request = self
                .tracer
                .client()
                .get_queue_attributes()
                .queue_url(self.tracer.queue_url())
                .set_attribute_names(Some(sets.iter().map(|(n, _)| n.clone()).collect()));
            tokio::select! {
                () = stop.notified() => return,
                answer = request.send() => match answer {
                    Ok(out) => {
                        let attributes = out.attributes.unwrap_or_default();
                        for (name, set) in &sets {
                            if let Some(n) = attributes.get(name).and_then(|v| v.parse::<i64>().ok()) {
                                gauge.record(n, set);
                            }
                        }
                    }
                    Err(e) => tracing::debug!(target: "mqtrace", error = %e, "reading the queue depth failed"),
                },
            }
            tokio::select! {
                () = stop.notified() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Permanent failures and spent retry budgets go to this queue.
    pub fn dead_letter_queue(mut self, queue_url: impl Into<String>) -> Self {
        self.tracer = self.tracer.dead_letter_queue(queue_url);
        self
    }

    /// Long-polling wait, 0 to 20 seconds (default 20).
    pub fn wait_time_seconds(mut self, seconds: i32) -> Self {
        self.wait_time = seconds.clamp(0, 20);
        self
    }

    /// The size limit of the dead-letter queue (default
    /// [`crate::DEFAULT_MAX_MESSAGE_BYTES`]): failure metadata and trace context are added
    /// to a dead-letter copy only as far as they fit within it.
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.tracer = self.tracer.max_message_bytes(bytes);
        self
    }

    /// Messages per receive, 1 to 10 (default 10).
    pub fn max_messages(mut self, n: i32) -> Self {
        self.max_messages = n.clamp(1, 10);
        self
    }

    /// Visibility timeout requested with each receive (default: the queue's,
    /// read once with `GetQueueAttributes`). While a receive's messages wait for
    /// their turn or their handler runs, their visibility is extended with
    /// `ChangeMessageVisibilityBatch` each time half of it has passed, so a long
    /// handler's message is not handed to another consumer meanwhile; a message
    /// that failed is no longer extended, and comes back after the timeout.
    pub fn visibility_timeout(mut self, seconds: i32) -> Self {
        self.visibility_timeout = Some(seconds);
        self
    }

    /// `receive` spans for polls that returned messages (default: on), and for
    /// empty polls too (default: off).
    pub fn receive_spans(mut self, on: bool, empty_polls: bool) -> Self {
        self.receive_spans = on;
        self.empty_receive_spans = on && empty_polls;
        self
    }

    /// A `delete` span (CLIENT) per deletion, child of the process span (default:
    /// the instrumenter's setting, off unless set).
    pub fn settle_spans(mut self, on: bool) -> Self {
        self.tracer = self.tracer.settle_spans(on);
        self
    }

    /// Polls and processes until `shutdown` completes. A poll in flight is
    /// abandoned (its messages become visible again after the visibility timeout);
    /// messages being processed are finished and settled first.
    ///
    /// Failed receives that may pass (the endpoint unreachable, throttling, a
    /// server error) are counted and tried again. It stops early with
    /// [`ConsumeError::Refused`] when SQS refuses the consumer: the queue does not
    /// exist, or the credentials are not accepted.
    pub async fn run_until<H, Fut, S>(
        &self,
        handler: H,
        shutdown: S,
    ) -> Result<ConsumerStats, ConsumeError>
    where
        H: Fn(Received) -> Fut,
        Fut: Future<Output = HandlerResult>,
        S: Future<Output = ()>,
    {
        let stop = tokio::sync::Notify::new();
        let consume = async {
            let result = self.consume(handler, shutdown).await;
            stop.notify_one();
            result
        };
        tokio::join!(consume, self.watch_depth(&stop)).0
    }

    async fn consume<H, Fut, S>(
        &self,
        handler: H,
        shutdown: S,
    ) -> Result<ConsumerStats, ConsumeError>
    where
        H: Fn(Received) -> Fut,
        Fut: Future<Output = HandlerResult>,
        S: Future<Output = ()>,
    {
        let counters = ConsumerCounters::new();
        let mut visibility = None;
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let received = tokio::select! {
                biased;
                () = shutdown.as_mut() => break,
                r = self.receive() => r,
            };
            let messages = match received {
                Ok(m) => m,
                Err(e) if refuses(&e) => {
                    counters.receive_failure();
                    tracing::error!(target: "mqtrace", error = %e, "SQS refused the consumer; stopping");
                    return Err(ConsumeError::Refused {
                        code: error_type(&e),
                        error: Box::new(e),
                        stats: counters.snapshot(),
                    });
                }
                Err(_) => {
                    counters.receive_failure();
                    tokio::select! {
                        () = shutdown.as_mut() => break,
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            let received_at = std::time::Instant::now();
            if messages.is_empty() {
                continue;
            }
            let visibility = self.visibility(&mut visibility).await;
            let in_flight = InFlight::new(&messages, received_at, visibility);
            // FIFO messages of one group are handled in order; everything else
            // at once, each message in its own context.
            let mut groups: Vec<Group<'_>> = Vec::new();
            for (i, m) in messages.iter().enumerate() {
                let group = m.system_attribute(&MessageSystemAttributeName::MessageGroupId);
                match groups
                    .iter_mut()
                    .find(|(g, _)| group.is_some() && *g == group)
                {
                    Some((_, members)) => members.push((i, m)),
                    None => groups.push((group, vec![(i, m)])),
                }
            }
            // The receive's deletes go together, unless each has a settle span.
            let deletes = (!self.tracer.instrumenter().settle_spans_on())
                .then(|| DeleteBatch::counting(std::sync::Arc::clone(&self.delete_requests)));
            let handled = std::sync::atomic::AtomicBool::new(false);
            let work = async {
                let dispositions =
                    futures_util::future::join_all(groups.into_iter().map(|(group, members)| {
                        let (handler, deletes, in_flight) =
                            (&handler, deletes.as_ref(), &in_flight);
                        async move {
                            let mut out = Vec::with_capacity(members.len());
                            // Once a message of a FIFO group fails, the group's later
                            // messages of this receive are neither handled nor deleted:
                            // SQS hands the group out again from the failed one.
                            let mut failed = false;
                            let mut held = Vec::new();
                            for (i, m) in members {
                                let settled = match group {
                                    Some(group) if failed => {
                                        held.extend(
                                            m.message().receipt_handle().map(str::to_owned),
                                        );
                                        self.hold(m, group).await
                                    }
                                    _ => self.handle(m, handler, deletes).await,
                                };
                                in_flight.settled(i);
                                failed |= settled.disposition != Disposition::Settle;
                                out.push(settled);
                            }
                            self.release(&held).await;
                            // The group may be handed out again (to another
                            // consumer too) once its deletes are made.
                            if group.is_some() {
                                in_flight.flush.notify_one();
                            }
                            out
                        }
                    }))
                    .await;
                handled.store(true, std::sync::atomic::Ordering::SeqCst);
                in_flight.flush.notify_one();
                dispositions
            };
            let keep = self.keep(&in_flight, deletes.as_ref(), &counters, &handled);
            let (dispositions, ()) = tokio::join!(work, keep);
            for settled in dispositions.into_iter().flatten() {
                counters.record(&settled);
            }
            if let Some(deletes) = deletes {
                counters.settle_failures(self.tracer.delete_batch(deletes).await);
            }
        }
        Ok(counters.snapshot())
    }

    /// The visibility timeout of this consumer's receives: its own, or the
    /// queue's (read once; [`ASSUMED_VISIBILITY`] when that read fails).
    async fn visibility(&self, known: &mut Option<Duration>) -> Duration {
        if let Some(seconds) = self.visibility_timeout {
            return Duration::from_secs(u64::try_from(seconds).unwrap_or(0));
        }
        if let Some(v) = *known {
            return v;
        }
        let request = self
            .tracer
            .client()
            .get_queue_attributes()
            .queue_url(self.tracer.queue_url())
            .attribute_names(QueueAttributeName::VisibilityTimeout)
            .send();
        let read = match tokio::time::timeout(Duration::from_secs(2), request).await {
            Ok(Ok(out)) => out.attributes.and_then(|a| {
                a.get(&QueueAttributeName::VisibilityTimeout)?
                    .parse::<u64>()
                    .ok()
            }),
            Ok(Err(e)) => {
                tracing::warn!(target: "mqtrace", error = %e, "reading the queue's visibility timeout failed; assuming 30 s");
                None
            }
            Err(_) => {
                tracing::warn!(target: "mqtrace", "reading the queue's visibility timeout took over 2 s; assuming 30 s");
                None
            }
        };
        // Read once: a failed read is not tried again before every receive.
        let v = read.map_or(ASSUMED_VISIBILITY, Duration::from_secs);
        *known = Some(v);
        v
    }

    /// Beside a receive's handlers until `handled`: deletes what waits by age,
    /// count, or when a FIFO group is done, and keeps the messages not yet
    /// settled invisible.
    async fn keep(
        &self,
        in_flight: &InFlight,
        deletes: Option<&DeleteBatch>,
        counters: &ConsumerCounters,
        handled: &std::sync::atomic::AtomicBool,
    ) {
        // A handled message is no longer kept invisible: it may have little
        // more than three eighths of the timeout left (extended at half), so its
        // delete waits at most an eighth, plus a tick of at most another.
        let delay = self.max_delete_delay.min(in_flight.visibility / 8);
        let tick = (in_flight.visibility / 8)
            .min(delay)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            let now = tokio::select! {
                () = in_flight.flush.notified() => true,
                () = tokio::time::sleep(tick) => false,
            };
            if handled.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            if let Some(deletes) = deletes {
                let due = now
                    || deletes.len() >= 10
                    || deletes.oldest_age().is_some_and(|age| age >= delay);
                if due && !deletes.is_empty() {
                    counters.settle_failures(self.tracer.delete_pending(deletes).await);
                }
            }
            let (indices, handles) = in_flight.due();
            if !handles.is_empty() {
                let extended_at = std::time::Instant::now();
                let accepted = self
                    .tracer
                    .set_visibility(&handles, in_flight.visibility)
                    .await;
                in_flight.extended(&indices, &accepted, extended_at);
            }
        }
    }

    async fn receive(&self) -> Result<Vec<Received>, ReceiveError> {
        let queue_url = self.tracer.queue_url();
        let mut request = self
            .tracer
            .client()
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(self.max_messages)
            .wait_time_seconds(self.wait_time)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All);
        if let Some(v) = self.visibility_timeout {
            request = request.visibility_timeout(v);
        }
        let mut d = describe(OperationType::Receive, queue_url);
        let started = std::time::SystemTime::now();
        let result = request.send().await;
        match result {
            Ok(out) => {
                let messages: Vec<Received> = out
                    .messages
                    .unwrap_or_default()
                    .into_iter()
                    .map(Received::from)
                    .collect();
                let want = self.receive_spans && (!messages.is_empty() || self.empty_receive_spans);
                if want {
                    d.batch_message_count = Some(messages.len() as u64);
                    let incoming: Vec<Incoming<'_>> = messages
                        .iter()
                        .map(|m| self.tracer.incoming(m.message()))
                        .collect();
                    let span = self
                        .tracer
                        .instrumenter()
                        .start_receive_at(&d, &incoming, started);
                    span.end();
                }
                Ok(messages)
            }
            Err(e) => {
                tracing::warn!(target: "mqtrace", error = %e, queue = %queue_url, "SQS receive failed");
                if self.receive_spans {
                    let span = self.tracer.instrumenter().start_receive_at(
                        &d,
                        &[] as &[Incoming<'_>],
                        started,
                    );
                    span.record_failure(&error_type(&e), &e);
                    span.end();
                }
                Err(e)
            }
        }
    }

    /// Ends a FIFO message held behind a failure of its group without handling
    /// it: its span says `error.type = fifo_group_blocked`, and it is left for
    /// SQS to hand out again (never dead-lettered: it was not handled).
    async fn hold(&self, message: &Received, group: &str) -> Settled {
        let held = |_: Attempt| {
            std::future::ready(Err(HandlerError::transient(format!(
                "not processed: an earlier message of message group {group} failed"
            ))
            .with_type(FIFO_GROUP_BLOCKED_ERROR)))
        };
        let processed = if self.receive_spans {
            self.tracer.process_received(message.message(), held).await
        } else {
            self.tracer.process(message.message(), held).await
        };
        self.tracer.leave_held(processed, message.message()).await
    }

    /// Makes held messages visible again at once: SQS hands none of their group
    /// out while its failed message is in flight, and hands the group out from
    /// that message once it is visible again (or deleted, when it was
    /// dead-lettered), so the held ones need not wait out their own timeout.
    async fn release(&self, held: &[String]) {
        if !held.is_empty() {
            self.tracer.set_visibility(held, Duration::ZERO).await;
        }
    }

    /// Processes and settles one message.
    async fn handle<H, Fut>(
        &self,
        message: &Received,
        handler: &H,
        deletes: Option<&DeleteBatch>,
    ) -> Settled
    where
        H: Fn(Received) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        let handle = |attempt: Attempt| {
            handler(Received {
                message: message.message().clone(),
                attempt: attempt.number(),
            })
        };
        // A receive span counted the message as consumed.
        let processed = if self.receive_spans {
            self.tracer
                .process_received(message.message(), handle)
                .await
        } else {
            self.tracer.process(message.message(), handle).await
        };
        self.tracer
            .settle_into(processed, message.message(), deletes)
            .await
    }
}
