#!/usr/bin/env bash
# The soak run of docs/reliability.md (not part of CI): each broker in turn gets a
# steady rate of messages for MQTRACE_SOAK_MINUTES (10), 1% of them failing
# permanently; the run accounts for every message and reports memory and the
# process spans' overhead. Starts the brokers (scripts/brokers.sh) and stops them.
#
#   scripts/soak.sh [rabbitmq|kafka|sqs ...]     default: all three
#
# Rates: MQTRACE_SOAK_RATE_RABBITMQ (100/s), MQTRACE_SOAK_RATE_KAFKA (100/s),
# MQTRACE_SOAK_RATE_SQS (50/s: the emulator answers a send in about 10 ms and the
# soak sends one at a time). Report lines are appended to target/soak.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MINUTES=${MQTRACE_SOAK_MINUTES:-10}
BROKERS=("$@")
[ ${#BROKERS[@]} -eq 0 ] && BROKERS=(rabbitmq kafka sqs)
unset OTEL_EXPORTER_OTLP_ENDPOINT OTEL_EXPORTER_OTLP_TRACES_ENDPOINT OTEL_SDK_DISABLED

cargo build --release -p mqtrace-perf --bin soak
scripts/brokers.sh start
trap 'scripts/brokers.sh stop' EXIT
# shellcheck disable=SC1091
source .mqtrace-test/env
OUT=${CARGO_TARGET_DIR:-target}/soak.md
for broker in "${BROKERS[@]}"; do
  case "$broker" in
    rabbitmq) rate=${MQTRACE_SOAK_RATE_RABBITMQ:-100} ;;
    kafka) rate=${MQTRACE_SOAK_RATE_KAFKA:-100} ;;
    sqs) rate=${MQTRACE_SOAK_RATE_SQS:-50} ;;
    *) echo "soak.sh: unknown broker $broker" >&2; exit 2 ;;
  esac
  echo "== soak: $broker, $MINUTES min at $rate/s"
  cargo run --release -q -p mqtrace-perf --bin soak -- "$broker" \
    --minutes "$MINUTES" --rate "$rate" --out "$OUT"
done
echo "report lines: $OUT"
