//! Each measurement binary starts and reads its arguments: a wrong one is
//! refused with a usage message and exit status 2 before anything is measured,
//! so a script's typo does not turn into a run of the wrong thing. (Building the
//! binaries for these tests is also what gives the CLI's rate test its
//! `span_rate`.)
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;

fn refuses_an_unknown_argument(exe: &str) {
    let out = Command::new(exe)
        .arg("--no-such-argument")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{exe}: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Usage:"), "{exe}: {stderr}");
}

#[test]
fn service_cost_reads_its_arguments() {
    refuses_an_unknown_argument(env!("CARGO_BIN_EXE_service_cost"));
}

#[test]
fn soak_reads_its_arguments() {
    refuses_an_unknown_argument(env!("CARGO_BIN_EXE_soak"));
}

#[test]
fn span_rate_reads_its_arguments() {
    refuses_an_unknown_argument(env!("CARGO_BIN_EXE_span_rate"));
}
