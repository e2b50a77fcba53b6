//! Traced consuming: long polling, receive and process spans, settlement.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_sqs::types::{
    Message, MessageSystemAttributeName, MessageSystemAttributeNameForSends,
    MessageSystemAttributeValue,
};
use aws_sdk_sqs::Client;
use mqtrace::propagation::{SimpleCarrier, WithTraceHeader, XRAY_FIELD};
use mqtrace::{
    Disposition, ForwardKind, HandlerError, HandlerResult, Inbound, Instrumenter,
    MessageDescription, OperationType, Processed, Retryable,
};
use opentelemetry::propagation::Extractor;
use opentelemetry::KeyValue;

use crate::carrier::{
    MessageAttributes, MessageAttributesExtractor, MessageAttributesInjector,
    MAX_MESSAGE_ATTRIBUTES,
};
use crate::describe::{describe, error_type, MESSAGE_GROUP_ID, RECEIVE_COUNT, SEQUENCE_NUMBER};
use crate::producer::{message_size, DEFAULT_MAX_MESSAGE_BYTES};

/// A received message as the handler sees it.
#[derive(Debug, Clone)]
pub struct Received(Message);

// === impl Received ===

impl Received {
    /// The SDK's message.
    pub fn message(&self) -> &Message {
        &self.0
    }

    /// The body.
    pub fn body(&self) -> &str {
        self.0.body().unwrap_or_default()
    }

    /// The message id.
    pub fn message_id(&self) -> Option<&str> {
        self.0.message_id()
    }

    /// A `String` message attribute.
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.0
            .message_attributes()
            .and_then(|a| MessageAttributesExtractor(a).value(name))
    }

    /// A system attribute (`ApproximateReceiveCount`, `MessageGroupId`...).
    pub fn system_attribute(&self, name: &MessageSystemAttributeName) -> Option<&str> {
        self.0.attributes()?.get(name).map(String::as_str)
    }

    /// How many times SQS has handed the message out (1 on the first receive).
    pub fn receive_count(&self) -> Option<u32> {
        self.system_attribute(&MessageSystemAttributeName::ApproximateReceiveCount)?
            .parse()
            .ok()
    }

    /// The body decoded as JSON. Invalid JSON is a permanent failure
    /// (`error.type = invalid_json`).
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_str(self.body())
            .map_err(|e| HandlerError::permanent(e).with_type("invalid_json"))
    }
}

impl From<Message> for Received {
    fn from(message: Message) -> Self {
        Self(message)
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

static NO_ATTRIBUTES: std::sync::LazyLock<MessageAttributes> =
    std::sync::LazyLock::new(MessageAttributes::new);

/// A message's trace carriers: its message attributes, and its `AWSTraceHeader`
/// under the X-Ray format's key.
fn carriers<'a>(
    attributes: Option<&'a MessageAttributes>,
    trace_header: Option<&'a str>,
) -> WithTraceHeader<'a, MessageAttributesExtractor<'a>> {
    WithTraceHeader {
        inner: MessageAttributesExtractor(attributes.unwrap_or(&NO_ATTRIBUTES)),
        trace_header,
    }
}

/// A message with the queue it came from, for the core.
pub(crate) struct Incoming<'a> {
    pub(crate) message: &'a Received,
    pub(crate) queue_url: &'a str,
}

impl Inbound for Incoming<'_> {
    fn description(&self) -> MessageDescription {
        let m = self.message;
        let mut d = describe(OperationType::Process, self.queue_url).body_size(m.body().len());
        d.message_id = m.message_id().map(str::to_owned);
        if let Some(count) = m.receive_count() {
            d.extra.push(KeyValue::new(RECEIVE_COUNT, i64::from(count)));
        }
        if let Some(group) = m.system_attribute(&MessageSystemAttributeName::MessageGroupId) {
            d.extra
                .push(KeyValue::new(MESSAGE_GROUP_ID, group.to_owned()));
        }
        if let Some(seq) = m.system_attribute(&MessageSystemAttributeName::SequenceNumber) {
            d.extra.push(KeyValue::new(SEQUENCE_NUMBER, seq.to_owned()));
        }
        d
    }

    fn headers(&self) -> impl Extractor + '_ {
        carriers(
            self.message.0.message_attributes(),
            self.message
                .system_attribute(&MessageSystemAttributeName::AwsTraceHeader),
        )
    }

    fn body(&self) -> &[u8] {
        self.message.body().as_bytes()
    }

    fn broker_timestamp(&self) -> Option<SystemTime> {
        let ms: u64 = self
            .message
            .system_attribute(&MessageSystemAttributeName::SentTimestamp)?
            .parse()
            .ok()?;
        UNIX_EPOCH.checked_add(Duration::from_millis(ms))
    }

    fn delivery_count(&self) -> Option<u32> {
        self.message.receive_count()
    }
}

/// What a consumer did, counted over its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConsumerStats {
    /// Handled successfully and deleted.
    pub settled: u64,
    /// Left on the queue after a transient failure: SQS hands them out again
    /// after the visibility timeout (or moves them by its redrive policy).
    pub retried: u64,
    /// Sent to the dead-letter queue with failure metadata, then deleted.
    pub dead_lettered: u64,
    /// Permanent failures deleted without a copy (no dead-letter queue set).
    pub dropped: u64,
    /// Deletes that failed (the message comes back; it is never lost).
    pub delete_failures: u64,
    /// Receive requests that failed (retried after a pause).
    pub receive_failures: u64,
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
/// Each non-empty poll gets a `receive` span (CLIENT) linking every message
/// (on by default; empty polls only when asked). A poll's messages are processed
/// concurrently, each in its own context.
#[derive(Debug, Clone)]
pub struct TracedConsumer {
    client: Client,
    queue_url: String,
    instrumenter: Instrumenter,
    dead_letter_queue_url: Option<String>,
    wait_time: i32,
    max_messages: i32,
    max_message_bytes: usize,
    visibility_timeout: Option<i32>,
    receive_spans: bool,
    empty_receive_spans: bool,
    settle_spans: bool,
}

// === impl TracedConsumer ===

impl TracedConsumer {
    /// A consumer of the queue at `queue_url`. Extraction uses the instrumenter's
    /// formats on message attributes, then X-Ray on `AWSTraceHeader`.
    pub fn new(client: Client, queue_url: impl Into<String>, instrumenter: &Instrumenter) -> Self {
        let propagation = instrumenter.propagation().with_xray_fallback();
        Self {
            client,
            queue_url: queue_url.into(),
            instrumenter: instrumenter.with_propagation(propagation),
            dead_letter_queue_url: None,
            wait_time: 20,
            max_messages: 10,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            visibility_timeout: None,
            receive_spans: true,
            empty_receive_spans: false,
            settle_spans: false,
        }
    }

    /// Permanent failures and spent retry budgets go to this queue.
    pub fn dead_letter_queue(mut self, queue_url: impl Into<String>) -> Self {
        self.dead_letter_queue_url = Some(queue_url.into());
        self
    }

    /// Long-polling wait, 0 to 20 seconds (default 20).
    pub fn wait_time_seconds(mut self, seconds: i32) -> Self {
        self.wait_time = seconds.clamp(0, 20);
        self
    }

    /// The size limit of the dead-letter queue (default
    /// [`DEFAULT_MAX_MESSAGE_BYTES`]): failure metadata and trace context are added
    /// to a dead-letter copy only as far as they fit within it.
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// Messages per receive, 1 to 10 (default 10).
    pub fn max_messages(mut self, n: i32) -> Self {
        self.max_messages = n.clamp(1, 10);
        self
    }

    /// Visibility timeout requested with each receive (default: the queue's).
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
    /// off).
    pub fn settle_spans(mut self, on: bool) -> Self {
        self.settle_spans = on;
        self
    }

    /// Polls and processes until `shutdown` completes. A poll in flight is
    /// abandoned (its messages become visible again after the visibility timeout);
    /// messages being processed are finished and settled first.
    pub async fn run_until<H, Fut, S>(&self, handler: H, shutdown: S) -> ConsumerStats
    where
        H: Fn(Received) -> Fut,
        Fut: Future<Output = HandlerResult>,
        S: Future<Output = ()>,
    {
        let mut stats = ConsumerStats::default();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let received = tokio::select! {
                biased;
                () = shutdown.as_mut() => break,
                r = self.receive() => r,
            };
            let messages = match received {
                Ok(m) => m,
                Err(()) => {
                    stats.receive_failures += 1;
                    tokio::select! {
                        () = shutdown.as_mut() => break,
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            // FIFO messages of one group are handled in order; everything else
            // at once, each message in its own context.
            let mut groups: Vec<(Option<&str>, Vec<&Received>)> = Vec::new();
            for m in &messages {
                let group = m.system_attribute(&MessageSystemAttributeName::MessageGroupId);
                match groups
                    .iter_mut()
                    .find(|(g, _)| group.is_some() && *g == group)
                {
                    Some((_, members)) => members.push(m),
                    None => groups.push((group, vec![m])),
                }
            }
            let dispositions =
                futures_util::future::join_all(groups.into_iter().map(|(_, members)| {
                    let handler = &handler;
                    async move {
                        let mut out = Vec::with_capacity(members.len());
                        for m in members {
                            out.push(self.handle(m, handler).await);
                        }
                        out
                    }
                }))
                .await;
            for (disposition, deleted) in dispositions.into_iter().flatten() {
                match disposition {
                    Disposition::Settle => stats.settled += 1,
                    Disposition::Retry => stats.retried += 1,
                    Disposition::DeadLetter => stats.dead_lettered += 1,
                    Disposition::Drop => stats.dropped += 1,
                }
                if deleted == Some(false) {
                    stats.delete_failures += 1;
                }
            }
        }
        stats
    }

    async fn receive(&self) -> Result<Vec<Received>, ()> {
        let mut request = self
            .client
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(self.max_messages)
            .wait_time_seconds(self.wait_time)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All);
        if let Some(v) = self.visibility_timeout {
            request = request.visibility_timeout(v);
        }
        let mut d = describe(OperationType::Receive, &self.queue_url);
        let started = std::time::SystemTime::now();
        let result = request.send().await;
        match result {
            Ok(out) => {
                let messages: Vec<Received> = out
                    .messages
                    .unwrap_or_default()
                    .into_iter()
                    .map(Received)
                    .collect();
                let want = self.receive_spans && (!messages.is_empty() || self.empty_receive_spans);
                if want {
                    d.batch_message_count = Some(messages.len() as u64);
                    let incoming: Vec<Incoming<'_>> = messages
                        .iter()
                        .map(|message| Incoming {
                            message,
                            queue_url: &self.queue_url,
                        })
                        .collect();
                    let span = self.instrumenter.start_receive_at(&d, &incoming, started);
                    span.end();
                }
                Ok(messages)
            }
            Err(e) => {
                tracing::warn!(target: "mqtrace", error = %e, queue = %self.queue_url, "SQS receive failed");
                if self.receive_spans {
                    let span =
                        self.instrumenter
                            .start_receive_at(&d, &[] as &[Incoming<'_>], started);
                    span.record_failure(&error_type(&e), &e);
                    span.end();
                }
                Err(())
            }
        }
    }

    /// Processes and settles one message; returns the disposition and whether a
    /// delete was attempted and succeeded.
    async fn handle<H, Fut>(&self, message: &Received, handler: &H) -> (Disposition, Option<bool>)
    where
        H: Fn(Received) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        let incoming = Incoming {
            message,
            queue_url: &self.queue_url,
        };
        let instrumenter = &self.instrumenter;
        let processed = instrumenter
            .process(&incoming, handler(message.clone()))
            .await;
        let has_dead_letter = self.dead_letter_queue_url.is_some();
        let permanent =
            matches!(processed.outcome(), Err(e) if e.retryable() == Retryable::Permanent);
        let mut disposition = processed.disposition(instrumenter.retry_policy(), has_dead_letter);
        // Without a dead-letter queue here, a transient failure is never deleted:
        // the queue's redrive policy decides.
        if disposition == Disposition::Drop && !permanent {
            disposition = Disposition::Retry;
        }
        let delete = match disposition {
            Disposition::Settle | Disposition::Drop => true,
            Disposition::Retry => false,
            Disposition::DeadLetter => {
                let forwarded = match &self.dead_letter_queue_url {
                    Some(dlq) => self.forward(&processed, message, dlq).await,
                    None => false,
                };
                if !forwarded {
                    // Not copied: keep it for another receive rather than lose it.
                    disposition = Disposition::Retry;
                }
                forwarded
            }
        };
        let deleted = if delete {
            Some(self.delete(message, &incoming, &processed).await)
        } else {
            None
        };
        let _ = processed.finish(disposition);
        (disposition, deleted)
    }

    async fn delete(
        &self,
        message: &Received,
        incoming: &Incoming<'_>,
        processed: &Processed,
    ) -> bool {
        let span = self.settle_spans.then(|| {
            let d = incoming
                .description()
                .for_operation(OperationType::Settle, Some("delete"));
            self.instrumenter.start_settle(&d, processed.span())
        });
        let result = self
            .client
            .delete_message()
            .queue_url(&self.queue_url)
            .set_receipt_handle(message.0.receipt_handle().map(str::to_owned))
            .send()
            .await;
        if let Err(e) = &result {
            tracing::warn!(target: "mqtrace", error = %e, "SQS delete failed; the message will be received again");
            if let Some(span) = &span {
                span.record_failure(&error_type(e), e);
            }
        }
        if let Some(span) = span {
            span.end();
        }
        result.is_ok()
    }

    /// Sends the original body to the dead-letter queue with the user's
    /// attributes, then as much of mqtrace's metadata and the trace context as the
    /// 10 attributes allow (trace context whole or not at all), and
    /// `AWSTraceHeader`. True once SQS accepted it.
    async fn forward(&self, processed: &Processed, message: &Received, dlq: &str) -> bool {
        let mut attributes = MessageAttributes::new();
        if let Some(original) = message.0.message_attributes() {
            for (k, v) in original {
                if !self.instrumenter.is_managed_header(k) {
                    attributes.insert(k.clone(), v.clone());
                }
            }
        }
        let d = describe(OperationType::Send, dlq).body_size(message.body().len());
        let mut staged = SimpleCarrier::new();
        let span =
            self.instrumenter
                .start_forward(processed, ForwardKind::DeadLetter, &d, &mut staged);
        let trace_header = staged
            .remove(XRAY_FIELD)
            .or_else(|| staged.remove("X-Amzn-Trace-Id"));
        let fields = self.instrumenter.propagation().header_fields();
        let (trace, metadata): (Vec<_>, Vec<_>) = staged
            .into_iter()
            .partition(|(k, _)| fields.iter().any(|f| f.eq_ignore_ascii_case(k)));
        let mut room = MAX_MESSAGE_ATTRIBUTES.saturating_sub(attributes.len());
        // Metadata and context go only while the copy stays within the size limit
        // (if the message itself is within it): a copy too big to send would
        // leave the message cycling instead of dead-lettered.
        let mut size = message_size(message.body(), &attributes);
        let limit = if size <= self.max_message_bytes {
            self.max_message_bytes
        } else {
            usize::MAX
        };
        // A string attribute's share of the size.
        let cost = |k: &str, v: &str| k.len() + "String".len() + v.len();
        let mut injector = MessageAttributesInjector(&mut attributes);
        let mut metadata = metadata;
        metadata.sort_by_key(|(k, _)| metadata_rank(k));
        for (k, v) in metadata {
            if room == 0 {
                break;
            }
            if size + cost(&k, &v) > limit {
                continue;
            }
            size += cost(&k, &v);
            opentelemetry::propagation::Injector::set(&mut injector, &k, v);
            room -= 1;
        }
        let trace_cost: usize = trace.iter().map(|(k, v)| cost(k, v)).sum();
        if trace.len() <= room && size + trace_cost <= limit {
            for (k, v) in trace {
                opentelemetry::propagation::Injector::set(&mut injector, &k, v);
            }
        }
        let mut request = self
            .client
            .send_message()
            .queue_url(dlq)
            .message_body(message.body())
            .set_message_attributes(Some(attributes).filter(|a| !a.is_empty()));
        if let Some(value) = trace_header {
            if let Ok(v) = MessageSystemAttributeValue::builder()
                .data_type("String")
                .string_value(value)
                .build()
            {
                request = request.message_system_attributes(
                    MessageSystemAttributeNameForSends::AwsTraceHeader,
                    v,
                );
            }
        }
        if let Some(group) = message.system_attribute(&MessageSystemAttributeName::MessageGroupId) {
            request = request
                .message_group_id(group)
                .message_deduplication_id(message.message_id().unwrap_or_default());
        }
        let result = request.send().await;
        match &result {
            Ok(out) => {
                if let Some(id) = out.message_id() {
                    span.set_attribute(KeyValue::new(
                        mqtrace::conventions::attr::MESSAGING_MESSAGE_ID,
                        id.to_owned(),
                    ));
                }
            }
            Err(e) => {
                tracing::warn!(target: "mqtrace", error = %e, "forward to the dead-letter queue failed");
                span.record_failure(&error_type(e), e);
            }
        }
        span.end();
        result.is_ok()
    }
}

/// Which metadata to keep first when attributes run short.
fn metadata_rank(key: &str) -> usize {
    use mqtrace::forward::{
        ATTEMPT_HEADER, ERROR_MESSAGE_HEADER, ERROR_TYPE_HEADER, FAILED_AT_HEADER,
        ORIGINAL_TRACEPARENT_HEADER,
    };
    [
        ERROR_TYPE_HEADER,
        ATTEMPT_HEADER,
        ERROR_MESSAGE_HEADER,
        FAILED_AT_HEADER,
        ORIGINAL_TRACEPARENT_HEADER,
    ]
    .iter()
    .position(|h| h.eq_ignore_ascii_case(key))
    .unwrap_or(usize::MAX)
}
