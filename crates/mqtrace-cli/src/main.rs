//! The `mqtrace` command.
//!
//! `mqtrace demo` runs an order pipeline (a producer service, a worker service whose
//! handler makes child spans, transient failures that are retried, bad orders that
//! end in the dead-letter queue) on the embedded broker or a real RabbitMQ, Kafka or SQS, collects the spans over real
//! OTLP in-process, and prints them as trees with a summary.
//!
//! `mqtrace view` receives OTLP from any service and prints traces as they
//! complete and the message journeys through them (sends, attempts, retry and
//! dead-letter forwards, across traces), with `--save`/`--load` of OTLP JSON lines
//! and a `--web` page. `mqtrace doctor` reads a capture (or listens for a while)
//! and reports broken propagation with its likely cause and fix; it exits 1 when
//! it finds any.
#![forbid(unsafe_code)]
// A command-line tool reports its errors on stderr.
#![allow(clippy::print_stderr)]

mod demo;
mod doctor;
mod journey;
mod receive;
mod view;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// OpenTelemetry traces across message queues.
#[derive(Debug, Parser)]
#[command(name = "mqtrace", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the order pipeline and print its traces.
    Demo(demo::DemoArgs),
    /// Receive OTLP from any service and show traces and message journeys.
    View(view::ViewArgs),
    /// Find broken propagation in a capture, or in what arrives for a while.
    Doctor(doctor::DoctorArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mqtrace: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Demo(args) => runtime.block_on(demo::run(args)).map_err(|e| e.to_string()),
        Command::View(args) => runtime.block_on(view::run(args)).map_err(|e| e.to_string()),
        Command::Doctor(args) => match runtime.block_on(doctor::run(args)) {
            Ok(0) => Ok(()),
            // Findings: reported on stdout already.
            Ok(_) => return ExitCode::FAILURE,
            Err(e) => Err(e.to_string()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mqtrace: {e}");
            ExitCode::from(2)
        }
    }
}
