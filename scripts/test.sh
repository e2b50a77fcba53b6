#!/usr/bin/env bash
# Every check of the project, from a fresh machine: installs and starts the brokers
# (scripts/brokers.sh), checks formatting, licences and sources (cargo deny, built
# once and cached), lints, builds, runs every test of the workspace, and stops what
# it started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "test.sh: cargo is needed (https://rustup.rs)" >&2
  exit 1
fi
# A fresh clone in CI reuses the build of earlier runs on the same machine.
if [ "${CI:-}" = true ]; then
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/mqtrace/target}
fi
# Spans of the suite go to the in-process collector only.
unset OTEL_EXPORTER_OTLP_ENDPOINT OTEL_EXPORTER_OTLP_TRACES_ENDPOINT OTEL_SDK_DISABLED

scripts/brokers.sh start
trap 'scripts/brokers.sh stop' EXIT
# shellcheck disable=SC1091
source .mqtrace-test/env

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo deny (licences, bans, sources)"
CACHE=${MQTRACE_CACHE:-$HOME/.cache/mqtrace}
DENY=$CACHE/tools/bin/cargo-deny
if [ ! -x "$DENY" ]; then
  echo "test.sh: building cargo-deny 0.20.2 once (about 4 minutes; cached in $CACHE/tools)"
  cargo install cargo-deny --version 0.20.2 --locked --root "$CACHE/tools" --quiet
fi
"$DENY" check licenses bans sources
echo "== cargo clippy"
cargo clippy --workspace --all-targets --all-features --quiet -- -D warnings
echo "== cargo test"
# --show-output: the fault tests print their accounting (sent, processed, lost).
cargo test --workspace --all-features -- --show-output
