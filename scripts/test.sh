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
  # A fresh clone builds once: incremental state would only fill the disk.
  export CARGO_INCREMENTAL=0
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
echo "== cargo fuzz (bounded runs over the committed corpus)"
FUZZ_SECONDS=${MQTRACE_FUZZ_SECONDS:-15}
if [ ! -x "$CACHE/tools/bin/cargo-fuzz" ]; then
  echo "test.sh: building cargo-fuzz 0.13.2 once (about a minute; cached in $CACHE/tools)"
  cargo install cargo-fuzz --version 0.13.2 --locked --root "$CACHE/tools" --quiet
fi
for target in underscore lapin_field_table kafka_headers sqs_attributes lambda_event; do
  found=$(mktemp -d)
  # cargo fuzz needs nightly-only compiler flags; this machine has one stable
  # toolchain, which accepts them under RUSTC_BOOTSTRAP, for these builds only.
  # New inputs go to a scratch directory; the committed corpus only seeds.
  if ! (cd fuzz && RUSTC_BOOTSTRAP=1 PATH="$CACHE/tools/bin:$PATH" cargo fuzz run "$target" \
    "$found" "corpus/$target" -- -max_total_time="$FUZZ_SECONDS" -print_final_stats=1) \
    >"$found.log" 2>&1; then
    tail -n 60 "$found.log" >&2
    echo "test.sh: fuzz target $target failed (a crash is kept in fuzz/artifacts/$target)" >&2
    exit 1
  fi
  echo "$target: $(grep -E '^(Done|INFO: seed corpus)' "$found.log" | tr '\n' ' ')"
  rm -rf "$found" "$found.log"
done
echo "== cargo test"
# --show-output: the fault tests print their accounting (sent, processed, lost).
cargo test --workspace --all-features -- --show-output
echo "== the collector-fault measurement, one short round (the figures: scripts/collector-faults.sh)"
cargo build --quiet -p mqtrace-perf --bin soak
"${CARGO_TARGET_DIR:-target}/debug/soak" rabbitmq --collector-faults --rounds 1 --per-phase 200
