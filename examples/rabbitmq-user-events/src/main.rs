//! User events on a RabbitMQ topic exchange, traced end to end.
//!
//! An accounts service publishes `user.created` and `user.deleted` events to the
//! `users` topic exchange. Two services consume them:
//! - `welcome-email`, bound to `user.created`, sends a welcome mail;
//! - `audit`, bound to `user.*`, records every event. It rejects events without an
//!   email address as permanent failures, which land in its dead-letter queue.
//!
//! Each publish and each processing shows up in one trace per event. Run it with a
//! RabbitMQ and an OTLP collector (Jaeger, the OpenTelemetry Collector...):
//!
//! ```text
//! AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 \
//!   cargo run -p rabbitmq-user-events
//! ```
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use mqtrace::{HandlerError, HandlerResult};
use mqtrace_lapin::{declare_exchange, QueueSpec, Server, TracedConsumer, TracedPublisher};
use mqtrace_telemetry::TelemetryBuilder;
use serde::{Deserialize, Serialize};
use tracing_subscriber::layer::SubscriberExt as _;

#[derive(Debug, Serialize, Deserialize)]
struct UserEvent {
    user_id: u64,
    email: Option<String>,
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Failure> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    // One telemetry set-up per service; here three services share a process.
    let accounts = TelemetryBuilder::default()
        .service_name("accounts")
        .install_global(false)
        .build()?;
    let mailer = TelemetryBuilder::default()
        .service_name("welcome-email")
        .quiet_targets(mqtrace_lapin::CLIENT_TARGETS)
        .install_global(false)
        .build()?;
    let auditor = TelemetryBuilder::default()
        .service_name("audit")
        .install_global(false)
        .build()?;
    // The mail service's `tracing` spans nest under its process spans.
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(mailer.tracing_layer()),
    )?;
    let instrumenter = |guard: &mqtrace_telemetry::TelemetryGuard| guard.instrumenter().build();

    // Topology: the exchange and both services' queues.
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .map_err(|e| {
            format!("cannot connect to RabbitMQ ({e}); set AMQP_URL to its amqp:// URL")
        })?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    declare_exchange(&channel, "users", ExchangeKind::Topic).await?;
    let welcome = QueueSpec::new("welcome-email").bind("users", "user.created");
    let audit = QueueSpec::new("audit")
        .bind("users", "user.*")
        .dead_letter("audit.dlx", "audit.rejected");
    welcome.declare(&channel).await?;
    audit.declare(&channel).await?;

    // The accounts service publishes three events; the last has no email.
    let publisher = TracedPublisher::new(channel.clone(), instrumenter(&accounts))
        .server(Server::from_uri(&url));
    let events = [
        (
            "user.created",
            UserEvent {
                user_id: 1,
                email: Some("ada@example.com".into()),
            },
        ),
        (
            "user.created",
            UserEvent {
                user_id: 2,
                email: Some("alan@example.com".into()),
            },
        ),
        (
            "user.deleted",
            UserEvent {
                user_id: 1,
                email: None,
            },
        ),
    ];
    for (routing_key, event) in &events {
        let confirmation = publisher
            .publish_json("users", routing_key, event, BasicProperties::default())
            .await?;
        println!(
            "published {routing_key} for user {} (acked: {})",
            event.user_id,
            confirmation.is_ack()
        );
    }

    // Both consumers run until they have seen their share of the events.
    let welcomed = Arc::new(AtomicUsize::new(0));
    let audited = Arc::new(AtomicUsize::new(0));
    let welcome_consumer = TracedConsumer::new(&url, welcome, instrumenter(&mailer));
    let audit_consumer = TracedConsumer::new(&url, audit, instrumenter(&auditor));
    let (welcome_stats, audit_stats) = tokio::try_join!(
        welcome_consumer.run_until(
            {
                let welcomed = Arc::clone(&welcomed);
                move |message| {
                    let welcomed = Arc::clone(&welcomed);
                    async move {
                        let event: UserEvent = message.json()?;
                        send_welcome_mail(&event).await?;
                        welcomed.fetch_add(1, Ordering::SeqCst);
                        HandlerResult::Ok(())
                    }
                }
            },
            until(Arc::clone(&welcomed), 2),
        ),
        audit_consumer.run_until(
            {
                let audited = Arc::clone(&audited);
                move |message| {
                    let audited = Arc::clone(&audited);
                    async move {
                        audited.fetch_add(1, Ordering::SeqCst);
                        let event: UserEvent = message.json()?;
                        match event.email {
                            Some(_) => {
                                tracing::info!(
                                    user_id = event.user_id,
                                    kind = message.routing_key(),
                                    "audited"
                                );
                                Ok(())
                            }
                            None => Err(HandlerError::permanent("event without an email address")
                                .with_type("missing_email")),
                        }
                    }
                }
            },
            until(Arc::clone(&audited), 3),
        ),
    )?;
    println!("welcome-email: {welcome_stats:?}");
    println!("audit: {audit_stats:?}");
    let _ = connection.close(200, "example done".into()).await;

    // Flush before exit: blocking calls, off the async threads.
    tokio::task::spawn_blocking(move || {
        accounts.shutdown();
        mailer.shutdown();
        auditor.shutdown();
    })
    .await?;
    Ok(())
}

#[tracing::instrument(name = "send welcome mail", skip_all, fields(user_id = event.user_id))]
async fn send_welcome_mail(event: &UserEvent) -> Result<(), HandlerError> {
    tokio::time::sleep(Duration::from_millis(5)).await;
    match &event.email {
        Some(_) => Ok(()),
        None => Err(HandlerError::permanent("no address to write to").with_type("missing_email")),
    }
}

async fn until(counter: Arc<AtomicUsize>, n: usize) {
    while counter.load(Ordering::SeqCst) < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
