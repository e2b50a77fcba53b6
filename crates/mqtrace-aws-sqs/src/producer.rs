//! Traced sending: single messages and batches.

use aws_sdk_sqs::error::SdkError;
use aws_sdk_sqs::operation::send_message::builders::SendMessageFluentBuilder;
use aws_sdk_sqs::operation::send_message::{SendMessageError, SendMessageOutput};
use aws_sdk_sqs::operation::send_message_batch::{SendMessageBatchError, SendMessageBatchOutput};
use aws_sdk_sqs::types::{
    MessageSystemAttributeNameForSends, MessageSystemAttributeValue, SendMessageBatchRequestEntry,
};
use aws_sdk_sqs::Client;
use mqtrace::{Instrumenter, MessagingSpan, OperationType, Propagation};
use opentelemetry::trace::{Status, TraceContextExt as _};
use opentelemetry::{Context, KeyValue};

use crate::carrier::{MessageAttributes, MessageAttributesInjector, MAX_MESSAGE_ATTRIBUTES};
use crate::describe::{describe, error_type, MESSAGE_GROUP_ID, SEQUENCE_NUMBER};

/// SQS takes at most this many entries per `SendMessageBatch`.
pub const MAX_BATCH_ENTRIES: usize = 10;

/// The message size [`TracedSqs`] keeps within by default: 262,144 bytes (256
/// KiB). SQS allows up to 1 MiB where a queue's `MaximumMessageSize` says so; set
/// [`TracedSqs::max_message_bytes`] to your queue's value.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 262_144;

/// `mqtrace.aws_sqs.context_omitted`: on a `send` or `create` span, why the trace
/// context was not added as message attributes (`message_size`: with them the
/// message would have gone over the size limit, without them it fits).
pub const CONTEXT_OMITTED: &str = "mqtrace.aws_sqs.context_omitted";

// === impl Sender ===

impl Sender {
    pub(crate) fn new(instrumenter: Instrumenter) -> Self {
        Self {
            instrumenter,
            propagation: SqsPropagation::default(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }

    /// Adds the span's context to a message's attributes and system attributes:
    /// message attributes only within what is left of the 10, whole formats only,
    /// and only if they do not take the message over the size limit.
    pub(crate) fn inject(
        &self,
        span: &MessagingSpan,
        body: &str,
        attributes: &mut MessageAttributes,
    ) -> Option<MessageSystemAttributeValue> {
        if self.propagation.attributes() {
            let room = MAX_MESSAGE_ATTRIBUTES.saturating_sub(attributes.len());
            let mut with_context = attributes.clone();
            self.instrumenter.inject_within(
                span,
                &mut MessageAttributesInjector(&mut with_context),
                room,
            );
            let fits = message_size(body, attributes) <= self.max_message_bytes;
            if fits && message_size(body, &with_context) > self.max_message_bytes {
                span.set_attribute(KeyValue::new(CONTEXT_OMITTED, "message_size"));
            } else {
                *attributes = with_context;
            }
        }
        if !self.propagation.trace_header() {
            return None;
        }
        let value = trace_header(span.context())?;
        MessageSystemAttributeValue::builder()
            .data_type("String")
            .string_value(value)
            .build()
            .ok()
    }

    /// Sends a message built with the SDK's fluent builder (`client.send_message()…`)
    /// inside a `send` span: the context is added to it, the span ends on SQS's
    /// response and records the message id (and for FIFO queues the group and the
    /// sequence number). The caller gets the SDK's result unchanged; the
    /// instrumentation never makes a send fail.
    pub(crate) async fn send(
        &self,
        request: SendMessageFluentBuilder,
    ) -> Result<SendMessageOutput, SdkError<SendMessageError>> {
        let queue_url = request.get_queue_url().clone().unwrap_or_default();
        let mut d = describe(OperationType::Send, &queue_url);
        let body = request.get_message_body().clone().unwrap_or_default();
        d = d.body_size(body.len());
        if let Some(group) = request.get_message_group_id() {
            d.extra.push(KeyValue::new(MESSAGE_GROUP_ID, group.clone()));
        }
        let span = self.instrumenter.start_send(&d, Some(body.as_bytes()));
        let mut attributes = request.get_message_attributes().clone().unwrap_or_default();
        let trace = self.inject(&span, &body, &mut attributes);
        // An empty map is left out of the request rather than sent.
        let mut request =
            request.set_message_attributes(Some(attributes).filter(|a| !a.is_empty()));
        if let Some(trace) = trace {
            request = request.message_system_attributes(
                MessageSystemAttributeNameForSends::AwsTraceHeader,
                trace,
            );
        }
        let result = request.send().await;
        match &result {
            Ok(out) => record_sent(&span, out.message_id(), out.sequence_number()),
            Err(e) => span.record_failure(&error_type(e), e),
        }
        span.end();
        result
    }
}

/// A message's size as SQS counts it: the body, and each message attribute's
/// name, data type and value. System attributes (`AWSTraceHeader`) do not count.
pub fn message_size(body: &str, attributes: &MessageAttributes) -> usize {
    body.len()
        + attributes
            .iter()
            .map(|(name, v)| {
                name.len()
                    + v.data_type().len()
                    + v.string_value().map_or(0, str::len)
                    + v.binary_value().map_or(0, |b| b.as_ref().len())
            })
            .sum::<usize>()
}

/// Where the producer puts the trace context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SqsPropagation {
    /// Message attributes, in the instrumenter's formats (W3C by default). They
    /// count toward SQS's 10 attributes and its billing.
    MessageAttributes,
    /// The `AWSTraceHeader` system attribute, in X-Ray format: free, and what AWS
    /// services (Lambda among them) read.
    AwsTraceHeader,
    /// Both (the default): message attributes when they fit, `AWSTraceHeader`
    /// always.
    #[default]
    Both,
}

impl SqsPropagation {
    fn attributes(self) -> bool {
        matches!(self, Self::MessageAttributes | Self::Both)
    }

    fn trace_header(self) -> bool {
        matches!(self, Self::AwsTraceHeader | Self::Both)
    }
}

/// The X-Ray header value for a context (`Root=…;Parent=…;Sampled=…`).
pub(crate) fn trace_header(cx: &Context) -> Option<String> {
    let mut carrier = mqtrace::propagation::SimpleCarrier::new();
    Propagation::builder()
        .xray()
        .build()
        .inject(cx, &mut carrier);
    carrier.into_values().next()
}

/// Sends with `send` spans (PRODUCER) whose context travels with the message.
#[derive(Debug, Clone)]
pub struct TracedSqs {
    client: Client,
    sender: Sender,
}

/// What a traced send needs besides the client.
#[derive(Debug, Clone)]
pub(crate) struct Sender {
    instrumenter: Instrumenter,
    propagation: SqsPropagation,
    max_message_bytes: usize,
}

impl TracedSqs {
    /// Wraps a client. Spans and message-attribute formats come from
    /// `instrumenter`.
    pub fn new(client: Client, instrumenter: Instrumenter) -> Self {
        Self {
            client,
            sender: Sender::new(instrumenter),
        }
    }

    /// The size limit of the queues this producer sends to (default
    /// [`DEFAULT_MAX_MESSAGE_BYTES`]). When the trace-context attributes would take
    /// a message that fits over it, they are left out (the span says so with
    /// [`CONTEXT_OMITTED`]); `AWSTraceHeader`, which does not count, still goes.
    /// The instrumentation never makes a message too big to send.
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.sender.max_message_bytes = bytes;
        self
    }

    /// Where the trace context goes (default: [`SqsPropagation::Both`]).
    pub fn propagation(mut self, propagation: SqsPropagation) -> Self {
        self.sender.propagation = propagation;
        self
    }

    /// The client.
    pub fn inner(&self) -> &Client {
        &self.client
    }

    /// The instrumenter.
    pub fn instrumenter(&self) -> &Instrumenter {
        &self.sender.instrumenter
    }

    /// Sends a message built with the SDK's fluent builder (`client.send_message()…`)
    /// inside a `send` span: the context is added to it, the span ends on SQS's
    /// response and records the message id (and for FIFO queues the group and the
    /// sequence number). The caller gets the SDK's result unchanged; the
    /// instrumentation never makes a send fail.
    pub async fn send(
        &self,
        request: SendMessageFluentBuilder,
    ) -> Result<SendMessageOutput, SdkError<SendMessageError>> {
        self.sender.send(request).await
    }

    /// Sends a batch with the conventions' batch shape: a `create` span (PRODUCER)
    /// per entry, whose context goes into that entry, and a `send` span (CLIENT) per
    /// request linking them. Above 10 entries the batch is split into requests of
    /// 10; one result per request, in order. Entries SQS refuses are marked as
    /// errors on their `create` spans.
    pub async fn send_batch(
        &self,
        queue_url: &str,
        entries: Vec<SendMessageBatchRequestEntry>,
    ) -> Vec<Result<SendMessageBatchOutput, SdkError<SendMessageBatchError>>> {
        let mut results = Vec::with_capacity(entries.len().div_ceil(MAX_BATCH_ENTRIES));
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            let chunk: Vec<_> = entries.by_ref().take(MAX_BATCH_ENTRIES).collect();
            results.push(self.send_chunk(queue_url, chunk).await);
        }
        results
    }

    async fn send_chunk(
        &self,
        queue_url: &str,
        chunk: Vec<SendMessageBatchRequestEntry>,
    ) -> Result<SendMessageBatchOutput, SdkError<SendMessageBatchError>> {
        let mut created = Vec::with_capacity(chunk.len());
        let mut prepared = Vec::with_capacity(chunk.len());
        for entry in chunk {
            let mut d =
                describe(OperationType::Create, queue_url).body_size(entry.message_body().len());
            if let Some(group) = entry.message_group_id() {
                d.extra
                    .push(KeyValue::new(MESSAGE_GROUP_ID, group.to_owned()));
            }
            let span = self
                .sender
                .instrumenter
                .start_create(&d, Some(entry.message_body().as_bytes()));
            let mut attributes = entry.message_attributes().cloned().unwrap_or_default();
            let trace = self
                .sender
                .inject(&span, entry.message_body(), &mut attributes);
            let mut system = entry
                .message_system_attributes()
                .cloned()
                .unwrap_or_default();
            if let Some(trace) = trace {
                system.insert(MessageSystemAttributeNameForSends::AwsTraceHeader, trace);
            }
            let rebuilt = SendMessageBatchRequestEntry::builder()
                .id(entry.id())
                .message_body(entry.message_body())
                .set_delay_seconds(entry.delay_seconds())
                .set_message_attributes(Some(attributes).filter(|a| !a.is_empty()))
                .set_message_system_attributes(Some(system).filter(|s| !s.is_empty()))
                .set_message_deduplication_id(entry.message_deduplication_id().map(str::to_owned))
                .set_message_group_id(entry.message_group_id().map(str::to_owned))
                .build();
            // The builder only fails without id or body, which the entry had.
            prepared.push(rebuilt.unwrap_or(entry));
            created.push(span);
        }
        let mut d = describe(OperationType::Send, queue_url);
        d.batch_message_count = Some(prepared.len() as u64);
        let contexts: Vec<_> = created.iter().map(MessagingSpan::span_context).collect();
        let batch = self.sender.instrumenter.start_batch_send(&d, &contexts);
        let ids: Vec<String> = prepared.iter().map(|e| e.id().to_owned()).collect();
        let result = self
            .client
            .send_message_batch()
            .queue_url(queue_url)
            .set_entries(Some(prepared))
            .send()
            .await;
        match &result {
            Ok(out) => {
                for ok in out.successful() {
                    if let Some(i) = ids.iter().position(|id| id == ok.id()) {
                        record_sent(&created[i], Some(ok.message_id()), ok.sequence_number());
                    }
                }
                for failed in out.failed() {
                    if let Some(i) = ids.iter().position(|id| id == failed.id()) {
                        created[i].record_failure(
                            failed.code(),
                            &EntryRefused(failed.message().unwrap_or(failed.code()).to_owned()),
                        );
                    }
                }
                if !out.failed().is_empty() {
                    batch.context().span().set_status(Status::error(format!(
                        "{} of {} entries refused",
                        out.failed().len(),
                        ids.len()
                    )));
                }
            }
            Err(e) => {
                batch.record_failure(&error_type(e), e);
                for span in &created {
                    span.record_failure(&error_type(e), e);
                }
            }
        }
        for span in created {
            span.end();
        }
        batch.end();
        result
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct EntryRefused(String);

fn record_sent(span: &MessagingSpan, message_id: Option<&str>, sequence: Option<&str>) {
    if let Some(id) = message_id {
        span.set_attribute(KeyValue::new(
            mqtrace::conventions::attr::MESSAGING_MESSAGE_ID,
            id.to_owned(),
        ));
    }
    if let Some(seq) = sequence {
        span.set_attribute(KeyValue::new(SEQUENCE_NUMBER, seq.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};

    #[test]
    fn sent_messages_record_id_and_sequence_number() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let instrumenter = Instrumenter::builder().tracer_provider(&provider).build();
        let d = describe(
            OperationType::Send,
            "https://sqs.eu-west-1.amazonaws.com/1/q.fifo",
        );
        let span = instrumenter.start_send(&d, None);
        record_sent(&span, Some("m-1"), Some("18849496460467696128"));
        span.end();
        let spans = exporter.get_finished_spans().unwrap_or_default();
        let attrs: Vec<(String, String)> = spans[0]
            .attributes
            .iter()
            .map(|kv| (kv.key.to_string(), kv.value.to_string()))
            .collect();
        assert!(attrs.contains(&("messaging.message.id".into(), "m-1".into())));
        assert!(attrs.contains(&(SEQUENCE_NUMBER.into(), "18849496460467696128".into())));
        assert!(attrs.contains(&("messaging.destination.name".into(), "q.fifo".into())));
    }

    #[test]
    fn trace_header_is_xray_format() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap_or(TraceId::INVALID),
            SpanId::from_hex("00f067aa0ba902b7").unwrap_or(SpanId::INVALID),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let cx = Context::new().with_remote_span_context(sc);
        assert_eq!(
            trace_header(&cx).as_deref(),
            Some("Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7;Sampled=1")
        );
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for aws_sdk_sqs::operation::send_message::builders::SendMessageFluentBuilder {}
}

/// Sends through the plain aws-sdk-sqs client inside a `send` span (PRODUCER), as
/// [`TracedSqs::send`] does, with its defaults: the context in message attributes
/// and in `AWSTraceHeader` ([`SqsPropagation::Both`]), never taking the message
/// over [`DEFAULT_MAX_MESSAGE_BYTES`].
///
/// ```no_run
/// # async fn run(client: aws_sdk_sqs::Client, url: String) {
/// use mqtrace::Instrumenter;
/// use mqtrace_aws_sqs::SendMessageExt as _;
///
/// let instrumenter = Instrumenter::default();
/// let sent = client
///     .send_message()
///     .queue_url(&url)
///     .message_body(r#"{"order":7}"#)
///     .send_traced(&instrumenter)
///     .await;
/// # let _ = sent;
/// # }
/// ```
pub trait SendMessageExt: sealed::Sealed {
    /// `send` inside a `send` span; the SDK's result comes back unchanged.
    fn send_traced(
        self,
        instrumenter: &Instrumenter,
    ) -> impl std::future::Future<Output = Result<SendMessageOutput, SdkError<SendMessageError>>> + Send;
}

impl SendMessageExt for SendMessageFluentBuilder {
    fn send_traced(
        self,
        instrumenter: &Instrumenter,
    ) -> impl std::future::Future<Output = Result<SendMessageOutput, SdkError<SendMessageError>>> + Send
    {
        let sender = Sender::new(instrumenter.clone());
        async move { sender.send(self).await }
    }
}
