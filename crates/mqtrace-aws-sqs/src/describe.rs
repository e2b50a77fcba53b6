//! SQS operations described for the core.

use aws_sdk_sqs::error::ProvideErrorMetadata;
use mqtrace::{LastMade, MessageDescription, MessagingSystem, OperationType, Text};
use opentelemetry::KeyValue;

/// `aws.sqs.queue.url`.
pub const QUEUE_URL: &str = "aws.sqs.queue.url";
/// `mqtrace.aws_sqs.message_group_id`: a FIFO message's group. The conventions
/// have no name for it.
pub const MESSAGE_GROUP_ID: &str = "mqtrace.aws_sqs.message_group_id";
/// `mqtrace.aws_sqs.sequence_number`: the sequence number SQS gave a FIFO message.
pub const SEQUENCE_NUMBER: &str = "mqtrace.aws_sqs.sequence_number";
/// `mqtrace.aws_sqs.receive_count`: SQS's `ApproximateReceiveCount`.
pub const RECEIVE_COUNT: &str = "mqtrace.aws_sqs.receive_count";

/// The queue's name: the last path segment of its URL.
pub fn queue_name(queue_url: &str) -> &str {
    queue_url
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(queue_url)
}

/// Host and port of a queue URL (443 for https, 80 for http, unless given).
fn server(queue_url: &str) -> Option<(Text, u16)> {
    let (scheme, rest) = queue_url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let default = if scheme == "http" { 80 } else { 443 };
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host.into(), port.parse().ok()?)),
        None => Some((authority.into(), default)),
    }
}

/// A queue's texts: its URL, name and server.
#[derive(Clone)]
struct Queue {
    url: Text,
    name: Text,
    server: Option<(Text, u16)>,
}

thread_local! {
    /// The queue this thread described last: a loop's messages share it.
    static LAST_QUEUE: LastMade<Queue> = const { LastMade::new() };
}

/// An operation on the queue at `queue_url`.
pub(crate) fn describe(operation: OperationType, queue_url: &str) -> MessageDescription {
    let queue = LAST_QUEUE.with(|last| {
        last.get(queue_url, |url| Queue {
            url: url.clone(),
            name: queue_name(url).into(),
            server: server(url),
        })
    });
    let mut d = MessageDescription::new(MessagingSystem::AwsSqs, operation).destination(queue.name);
    if let Some((host, port)) = queue.server {
        d = d.server(host, Some(port));
    }
    d.extra.push(KeyValue::new(QUEUE_URL, queue.url));
    d
}

/// `error.type` for an SDK failure: the service's error code
/// (`AWS.SimpleQueueService.NonExistentQueue`), else the kind of failure.
pub fn error_type<E: ProvideErrorMetadata, R>(
    error: &aws_sdk_sqs::error::SdkError<E, R>,
) -> String {
    use aws_sdk_sqs::error::SdkError;
    if let Some(code) = error.code() {
        return code.to_owned();
    }
    match error {
        SdkError::TimeoutError(_) => "timeout",
        SdkError::DispatchFailure(_) => "dispatch_failure",
        SdkError::ConstructionFailure(_) => "construction_failure",
        SdkError::ResponseError(_) => "response_error",
        _ => "_OTHER",
    }
    .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_urls() {
        let url = "https://sqs.us-east-1.amazonaws.com/123456789012/orders.fifo";
        assert_eq!(queue_name(url), "orders.fifo");
        assert_eq!(
            server(url),
            Some(("sqs.us-east-1.amazonaws.com".into(), 443))
        );
        assert_eq!(
            server("http://127.0.0.1:39324/123/q"),
            Some(("127.0.0.1".into(), 39324))
        );
    }
}
