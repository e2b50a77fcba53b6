//! Instrumenting a receive loop of one's own: process spans and settlement for
//! aws-sdk-sqs's own [`Message`].

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::SdkError;
use aws_sdk_sqs::operation::delete_message::DeleteMessageError;
use aws_sdk_sqs::types::{
    Message, MessageSystemAttributeName, MessageSystemAttributeNameForSends,
    MessageSystemAttributeValue,
};
use aws_sdk_sqs::Client;
use mqtrace::propagation::{WithTraceHeader, XRAY_FIELD};
use mqtrace::settle::{Forward, Routes, Settled, Settlement, Settler};
use mqtrace::{
    Attempt, ForwardKind, HandlerResult, Inbound, Instrumenter, MessageDescription, OperationType,
    Processed, Text,
};
use opentelemetry::propagation::{Extractor, Injector as _};
use opentelemetry::KeyValue;

use crate::carrier::{
    MessageAttributes, MessageAttributesExtractor, MessageAttributesInjector,
    MAX_MESSAGE_ATTRIBUTES,
};
use crate::describe::{describe, error_type, MESSAGE_GROUP_ID, RECEIVE_COUNT, SEQUENCE_NUMBER};
use crate::producer::{message_size, DEFAULT_MAX_MESSAGE_BYTES};

/// Traces messages of one queue for a receive loop of your own: runs the handler
/// inside the message's `process` span and settles it the way
/// [`crate::TracedConsumer`] does (it is built on this): deleted after success;
/// a transient failure left for the visibility timeout and the queue's redrive
/// policy; a permanent failure, or a spent budget, forwarded to the dead-letter
/// queue (when one is set) and deleted.
///
/// Receive with `message_attribute_names("All")` and the `AWSTraceHeader`,
/// `ApproximateReceiveCount` and `SentTimestamp` system attributes (or `All`), so
/// the context, the attempt and the queue time are there to read.
///
/// ```no_run
/// # async fn run(client: aws_sdk_sqs::Client, url: String) -> Result<(), aws_sdk_sqs::Error> {
/// use aws_sdk_sqs::types::MessageSystemAttributeName;
/// use mqtrace::{HandlerError, Instrumenter};
/// use mqtrace_aws_sqs::MessageTracer;
///
/// let tracer = MessageTracer::new(client.clone(), &url, &Instrumenter::default());
/// loop {
///     let out = client
///         .receive_message()
///         .queue_url(&url)
///         .wait_time_seconds(20)
///         .message_attribute_names("All")
///         .message_system_attribute_names(MessageSystemAttributeName::All)
///         .send()
///         .await?;
///     for message in out.messages() {
///         let processed = tracer
///             .process(message, |attempt| async move {
///                 let order: serde_json::Value = serde_json::from_str(message.body().unwrap_or_default())
///                     .map_err(HandlerError::permanent)?;
///                 tracing::info!(%order, attempt = attempt.number(), "billing");
///                 Ok(())
///             })
///             .await;
///         tracer.settle(processed, message).await;
///     }
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct MessageTracer {
    client: Client,
    queue_url: String,
    instrumenter: Instrumenter,
    dead_letter_queue_url: Option<String>,
    max_message_bytes: usize,
    /// The visibility timeout kept up while a handler runs, if asked.
    keep_visible: Option<Duration>,
}

// === impl MessageTracer ===

impl MessageTracer {
    /// Traces messages of the queue at `queue_url`; `client` deletes them and
    /// forwards dead letters. Extraction uses the instrumenter's formats on the
    /// message attributes, then X-Ray on `AWSTraceHeader`.
    pub fn new(client: Client, queue_url: impl Into<String>, instrumenter: &Instrumenter) -> Self {
        let propagation = instrumenter.propagation().with_xray_fallback();
        Self {
            client,
            queue_url: queue_url.into(),
            instrumenter: instrumenter.with_propagation(propagation),
            dead_letter_queue_url: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            keep_visible: None,
        }
    }

    /// Keeps a message invisible while its handler runs (default: off): from
    /// the start of [`MessageTracer::process`], every half of `visibility` a
    /// `ChangeMessageVisibility` sets its timeout to `visibility` again, so a
    /// handler that runs longer than the timeout is not handed to another
    /// consumer meanwhile. Give the visibility timeout you receive with, and call
    /// `process` promptly after the receive: the first extension comes half a
    /// timeout after `process` starts. A failed extension is logged; the message
    /// may then be received again (duplicated, never lost).
    pub fn keep_visible(mut self, visibility: Duration) -> Self {
        self.keep_visible = Some(visibility).filter(|v| !v.is_zero());
        self
    }

    /// Runs `work` while keeping `message` invisible, every half of
    /// `visibility`.
    async fn heartbeat<T>(
        &self,
        message: &Message,
        visibility: Duration,
        work: impl Future<Output = T>,
    ) -> T {
        let Some(handle) = message.receipt_handle() else {
            return work.await;
        };
        let seconds = visibility_seconds(visibility);
        let beat = async {
            loop {
                tokio::time::sleep(visibility / 2).await;
                let result = self
                    .client
                    .change_message_visibility()
                    .queue_url(&self.queue_url)
                    .receipt_handle(handle)
                    .visibility_timeout(seconds)
                    .send()
                    .await;
                if let Err(e) = result {
                    tracing::warn!(target: "mqtrace", error = %e, queue = %self.queue_url, "extending a message's visibility failed; it may be received again");
                }
            }
        };
        let work = std::pin::pin!(work);
        let beat = std::pin::pin!(beat);
        match futures_util::future::select(work, beat).await {
            futures_util::future::Either::Left((out, _)) => out,
            // The heartbeat never ends by itself.
            futures_util::future::Either::Right(((), work)) => work.await,
        }
    }

    /// Sets the visibility timeout of the messages with `handles` to
    /// `visibility` from now (`ChangeMessageVisibilityBatch`, ten a call);
    /// returns which changes SQS accepted.
    pub(crate) async fn set_visibility(
        &self,
        handles: &[String],
        visibility: Duration,
    ) -> Vec<bool> {
        let seconds = visibility_seconds(visibility);
        let mut accepted = vec![false; handles.len()];
        for (start, chunk) in (0..handles.len())
            .step_by(10)
            .map(|i| (i, &handles[i..(i + 10).min(handles.len())]))
        {
            let entries: Vec<_> = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, handle)| {
                    aws_sdk_sqs::types::ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id((start + i).to_string())
                        .receipt_handle(handle)
                        .visibility_timeout(seconds)
                        .build()
                        .ok()
                })
                .collect();
            let result = self
                .client
                .change_message_visibility_batch()
                .queue_url(&self.queue_url)
                .set_entries(Some(entries))
                .send()
                .await;
            match result {
                Ok(out) => {
                    for ok in out.successful() {
                        if let Some(slot) = ok
                            .id()
                            .parse::<usize>()
                            .ok()
                            .and_then(|i| accepted.get_mut(i))
                        {
                            *slot = true;
                        }
                    }
                    if !out.failed().is_empty() {
                        tracing::warn!(target: "mqtrace", messages = out.failed().len(), queue = %self.queue_url, "SQS did not change these messages' visibility");
                    }
                }
                Err(e) => {
                    tracing::warn!(target: "mqtrace", error = %e, queue = %self.queue_url, "changing the messages' visibility failed");
                }
            }
        }
        accepted
    }

    /// Permanent failures and spent retry budgets go to this queue.
    pub fn dead_letter_queue(mut self, queue_url: impl Into<String>) -> Self {
        self.dead_letter_queue_url = Some(queue_url.into());
        self
    }

    /// The size limit of the dead-letter queue (default
    /// [`DEFAULT_MAX_MESSAGE_BYTES`]): failure metadata and trace context are added
    /// to a dead-letter copy only as far as they fit within it.
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// A `delete` span (CLIENT) per deletion, child of the process span (default:
    /// the instrumenter's setting).
    pub fn settle_spans(mut self, on: bool) -> Self {
        self.instrumenter = self.instrumenter.with_settle_spans(on);
        self
    }

    /// The instrumenter (with X-Ray as the last format read).
    pub fn instrumenter(&self) -> &Instrumenter {
        &self.instrumenter
    }

    /// The queue's URL.
    pub fn queue_url(&self) -> &str {
        &self.queue_url
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Publishes a copy of `message` for a forward of the core's lifecycle (a
    /// dead letter): the original body with the user's attributes, then as much
    /// of mqtrace's metadata and the trace context as the 10 attributes and the
    /// size limit allow (trace context whole or not at all), and `AWSTraceHeader`;
    /// a FIFO message keeps its group. True once SQS accepted it. What a
    /// [`Settler`] of another SQS-fed consumer (the Lambda adapter's) calls.
    pub fn forward_copy<'f>(
        &self,
        message: &Message,
        mut forward: Forward<'f>,
    ) -> impl Future<Output = bool> + Send + 'f {
        let body = message.body().unwrap_or_default();
        let mut attributes = MessageAttributes::new();
        if let Some(original) = message.message_attributes() {
            for (k, v) in original {
                if !forward.replaces(k) {
                    attributes.insert(k.clone(), v.clone());
                }
            }
        }
        let mut staged = std::mem::take(&mut forward.headers);
        let trace_header = staged
            .remove(XRAY_FIELD)
            .or_else(|| staged.remove("X-Amzn-Trace-Id"));
        let (trace, mut metadata): (Vec<_>, Vec<_>) = staged
            .into_iter()
            .partition(|(k, _)| forward.is_trace_context(k));
        let mut room = MAX_MESSAGE_ATTRIBUTES.saturating_sub(attributes.len());
        // Metadata and context go only while the copy stays within the size limit
        // (if the message itself is within it): a copy too big to send would
        // leave the message cycling instead of dead-lettered.
        let mut size = message_size(body, &attributes);
        let limit = if size <= self.max_message_bytes {
            self.max_message_bytes
        } else {
            usize::MAX
        };
        // A string attribute's share of the size.
        let cost = |k: &str, v: &str| k.len() + "String".len() + v.len();
        let mut injector = MessageAttributesInjector(&mut attributes);
        metadata.sort_by_key(|(k, _)| metadata_rank(k));
        for (k, v) in metadata {
            if room == 0 {
                break;
            }
            if size + cost(&k, &v) > limit {
                continue;
            }
            size += cost(&k, &v);
            injector.set(&k, v);
            room -= 1;
        }
        let trace_cost: usize = trace.iter().map(|(k, v)| cost(k, v)).sum();
        if trace.len() <= room && size + trace_cost <= limit {
            for (k, v) in trace {
                injector.set(&k, v);
            }
        }
        let mut request = self
            .client
            .send_message()
            .queue_url(forward.target)
            .message_body(body)
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
        if let Some(group) = system_attribute(message, &MessageSystemAttributeName::MessageGroupId)
        {
            request = request
                .message_group_id(group)
                .message_deduplication_id(message.message_id().unwrap_or_default());
        }
        let span = forward.span;
        async move {
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
                Err(e) => span.record_failure(&error_type(e), e),
            }
            result.is_ok()
        }
    }

    pub(crate) fn incoming<'a>(&'a self, message: &'a Message) -> Incoming<'a> {
        Incoming {
            message,
            queue_url: &self.queue_url,
            received: false,
        }
    }

    /// [`MessageTracer::process`] for a message received under a receive span
    /// of the consumer's, which counted it as consumed.
    pub(crate) async fn process_received<F, Fut>(&self, message: &Message, handler: F) -> Processed
    where
        F: FnOnce(Attempt) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        let incoming = Incoming {
            received: true,
            ..self.incoming(message)
        };
        self.instrumenter.process_with(&incoming, handler).await
    }

    /// Runs `handler` inside the message's `process` span (CONSUMER; message id,
    /// receive count, queue time from `SentTimestamp`, the attempt, the error
    /// status). The handler is told the [`Attempt`]. The span stays open in the
    /// [`Processed`] until [`MessageTracer::settle`]. With
    /// [`MessageTracer::keep_visible`], the message's visibility is extended
    /// while the handler runs.
    pub async fn process<F, Fut>(&self, message: &Message, handler: F) -> Processed
    where
        F: FnOnce(Attempt) -> Fut,
        Fut: Future<Output = HandlerResult>,
    {
        let incoming = self.incoming(message);
        let work = self.instrumenter.process_with(&incoming, handler);
        match self.keep_visible {
            Some(visibility) => self.heartbeat(message, visibility, work).await,
            None => work.await,
        }
    }

    /// Settles a processed message (delete, leave, or forward to the dead-letter
    /// queue and delete) and ends the process span with the disposition.
    pub async fn settle(&self, processed: Processed, message: &Message) -> Settled {
        self.settle_into(processed, message, None).await
    }

    /// [`MessageTracer::settle`], with the delete (after a success, or after a
    /// forward to the dead-letter queue) joining `batch` instead of a call of its
    /// own: for an own loop that deletes a receive's messages together, with
    /// [`MessageTracer::delete_batch`] once the last of them is settled. Settle
    /// spans, when on, then cover joining the batch.
    pub async fn settle_batched(
        &self,
        processed: Processed,
        message: &Message,
        batch: &DeleteBatch,
    ) -> Settled {
        self.settle_into(processed, message, Some(batch)).await
    }

    pub(crate) async fn settle_into(
        &self,
        processed: Processed,
        message: &Message,
        deletes: Option<&DeleteBatch>,
    ) -> Settled {
        let settler = SqsSettler {
            tracer: self,
            message,
            deletes,
            held: false,
        };
        self.instrumenter.settle(processed, settler).await
    }

    /// Ends a message that was not handed to its handler (held behind a failure
    /// of its FIFO group): it is left for SQS to hand out again, never
    /// dead-lettered, whatever its receive count.
    pub(crate) async fn leave_held(&self, processed: Processed, message: &Message) -> Settled {
        let settler = SqsSettler {
            tracer: self,
            message,
            deletes: None,
            held: true,
        };
        self.instrumenter.settle(processed, settler).await
    }

    /// Deletes the messages of `batch` with `DeleteMessageBatch`, ten at a time.
    /// Returns how many could not be deleted: they are visible again after their
    /// timeout and received again (duplicated, never lost); failures are logged.
    pub async fn delete_batch(&self, batch: DeleteBatch) -> u64 {
        self.delete_pending(&batch).await
    }

    /// [`MessageTracer::delete_batch`] for what is in `batch` now; the batch
    /// takes more messages afterwards. For a loop of your own that deletes by age
    /// ([`DeleteBatch::oldest_age`]) while other messages of the receive are
    /// still being handled.
    pub async fn delete_pending(&self, batch: &DeleteBatch) -> u64 {
        let handles = batch.take();
        let mut failed = 0;
        for chunk in handles.chunks(10) {
            let entries: Vec<_> = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, handle)| {
                    aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(handle)
                        .build()
                        .ok()
                })
                .collect();
            let unbuilt = (chunk.len() - entries.len()) as u64;
            batch
                .requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let result = self
                .client
                .delete_message_batch()
                .queue_url(&self.queue_url)
                .set_entries(Some(entries))
                .send()
                .await;
            let lost = match result {
                Ok(out) => out.failed().len() as u64,
                Err(e) => {
                    tracing::warn!(target: "mqtrace", error = %e, queue = %self.queue_url, "SQS batch delete failed; the messages are received again");
                    chunk.len() as u64
                }
            };
            if lost > 0 {
                tracing::warn!(target: "mqtrace", messages = lost, queue = %self.queue_url, "SQS did not delete these messages; they are received again");
            }
            failed += lost + unbuilt;
        }
        failed
    }
}

static NO_ATTRIBUTES: std::sync::LazyLock<MessageAttributes> =
    std::sync::LazyLock::new(MessageAttributes::new);

/// A message's trace carriers: its message attributes, and its `AWSTraceHeader`
/// under the X-Ray format's key.
pub(crate) fn carriers<'a>(
    attributes: Option<&'a MessageAttributes>,
    trace_header: Option<&'a str>,
) -> WithTraceHeader<'a, MessageAttributesExtractor<'a>> {
    WithTraceHeader {
        inner: MessageAttributesExtractor(attributes.unwrap_or(&NO_ATTRIBUTES)),
        trace_header,
    }
}

/// A visibility timeout in SQS's whole seconds, rounded up, within its limit
/// of 12 hours.
pub(crate) fn visibility_seconds(visibility: Duration) -> i32 {
    let seconds = visibility.as_secs() + u64::from(visibility.subsec_nanos() > 0);
    i32::try_from(seconds.min(43_200)).unwrap_or(43_200)
}

pub(crate) fn system_attribute<'a>(
    message: &'a Message,
    name: &MessageSystemAttributeName,
) -> Option<&'a str> {
    message.attributes()?.get(name).map(String::as_str)
}

pub(crate) fn receive_count(message: &Message) -> Option<u32> {
    system_attribute(
        message,
        &MessageSystemAttributeName::ApproximateReceiveCount,
    )?
    .parse()
    .ok()
}

/// A message with the queue it came from, for the core.
pub(crate) struct Incoming<'a> {
    message: &'a Message,
    queue_url: &'a str,
    /// Received under a receive span, which counted it as consumed.
    received: bool,
}

impl Inbound for Incoming<'_> {
    fn description(&self) -> MessageDescription {
        let m = self.message;
        let mut d = describe(OperationType::Process, self.queue_url)
            .body_size(m.body().unwrap_or_default().len());
        d.message_id = m.message_id().map(Text::from);
        if let Some(count) = receive_count(m) {
            d.extra.push(KeyValue::new(RECEIVE_COUNT, i64::from(count)));
        }
        if let Some(group) = system_attribute(m, &MessageSystemAttributeName::MessageGroupId) {
            d.extra
                .push(KeyValue::new(MESSAGE_GROUP_ID, group.to_owned()));
        }
        if let Some(seq) = system_attribute(m, &MessageSystemAttributeName::SequenceNumber) {
            d.extra.push(KeyValue::new(SEQUENCE_NUMBER, seq.to_owned()));
        }
        d
    }

    fn headers(&self) -> impl Extractor + '_ {
        carriers(
            self.message.message_attributes(),
            system_attribute(self.message, &MessageSystemAttributeName::AwsTraceHeader),
        )
    }

    fn body(&self) -> &[u8] {
        self.message.body().unwrap_or_default().as_bytes()
    }

    fn broker_timestamp(&self) -> Option<SystemTime> {
        let ms: u64 = system_attribute(self.message, &MessageSystemAttributeName::SentTimestamp)?
            .parse()
            .ok()?;
        UNIX_EPOCH.checked_add(Duration::from_millis(ms))
    }

    fn delivery_count(&self) -> Option<u32> {
        receive_count(self.message)
    }

    fn counted_at_receive(&self) -> bool {
        self.received
    }
}

/// The receipt handles of one receive's settled messages, deleted together after
/// the last of them is handled ([`MessageTracer::settle_batched`], then
/// [`MessageTracer::delete_batch`]): one `DeleteMessageBatch` call for up to ten
/// messages instead of a `DeleteMessage` each.
#[derive(Debug, Default)]
pub struct DeleteBatch {
    handles: std::sync::Mutex<Pending>,
    /// `DeleteMessageBatch` calls made, shared by the consumer's batches.
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl DeleteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Messages waiting in the batch to be deleted.
    pub fn len(&self) -> usize {
        self.pending().handles.len()
    }

    /// How long the oldest message in the batch has waited to be deleted. A
    /// loop of your own should delete the batch well before this reaches the
    /// visibility timeout: a message whose delete comes after it is received
    /// again, and on a FIFO queue the late delete fails.
    pub fn oldest_age(&self) -> Option<Duration> {
        self.pending().since.map(|t| t.elapsed())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.handles
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether no message waits in the batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn counting(requests: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
        Self {
            handles: std::sync::Mutex::default(),
            requests,
        }
    }

    fn push(&self, handle: &str) {
        let mut pending = self.pending();
        pending.since.get_or_insert_with(std::time::Instant::now);
        pending.handles.push(handle.to_owned());
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.pending()).handles
    }
}

/// The receipt handles of a [`DeleteBatch`], and when the oldest joined.
#[derive(Debug, Default)]
struct Pending {
    handles: Vec<String>,
    since: Option<std::time::Instant>,
}

/// SQS's operations on one message, for the core's lifecycle.
struct SqsSettler<'a> {
    tracer: &'a MessageTracer,
    message: &'a Message,
    /// The consumer's batched deletes; `None` deletes the message at once.
    deletes: Option<&'a DeleteBatch>,
    /// Not handled: only ever left to SQS.
    held: bool,
}

impl Settler for SqsSettler<'_> {
    type Error = SdkError<DeleteMessageError, HttpResponse>;

    fn routes(&self) -> Routes<'_> {
        // SQS redelivers after the visibility timeout; its redrive policy moves a
        // message on after `maxReceiveCount` receives.
        let dead_letter = self
            .tracer
            .dead_letter_queue_url
            .as_deref()
            .filter(|_| !self.held);
        Routes::broker_retries().dead_letter(dead_letter)
    }

    fn describe_forward(&self, _: ForwardKind, target: &str) -> MessageDescription {
        describe(OperationType::Send, target)
            .body_size(self.message.body().unwrap_or_default().len())
    }

    fn forward(&self, forward: Forward<'_>) -> impl Future<Output = bool> + Send {
        self.tracer.forward_copy(self.message, forward)
    }

    fn settle_name(&self, settlement: Settlement) -> Option<&'static str> {
        match settlement {
            Settlement::Ack | Settlement::Reject => Some("delete"),
            Settlement::Redeliver | Settlement::Leave => None,
        }
    }

    fn settle(
        self,
        settlement: Settlement,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let delete = matches!(settlement, Settlement::Ack | Settlement::Reject);
        // Joined to the receive's batch: no call of its own.
        let batched = match (delete, self.deletes, self.message.receipt_handle()) {
            (true, Some(batch), Some(handle)) => {
                batch.push(handle);
                true
            }
            _ => false,
        };
        let request = (delete && !batched).then(|| {
            self.tracer
                .client
                .delete_message()
                .queue_url(&self.tracer.queue_url)
                .set_receipt_handle(self.message.receipt_handle().map(str::to_owned))
        });
        async move {
            match request {
                Some(request) => request.send().await.map(drop),
                // Left visible again after its timeout, for another try.
                None => Ok(()),
            }
        }
    }

    fn error_type(error: &Self::Error) -> String {
        error_type(error)
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
