#!/usr/bin/env bash
# The collector-fault throughput figures of docs/reliability.md (not part of CI):
# for each broker, rounds of four phases (OTLP collector healthy, unreachable,
# hanging, back), messages sent as fast as the broker takes them; prints each
# phase's throughput against its round's healthy phase and the send-to-handler
# latency. The collector runs in a process of its own. Starts the brokers
# (scripts/brokers.sh) and stops them.
#
#   scripts/collector-faults.sh [rabbitmq|kafka|sqs ...]     default: all three
#
# Rounds and messages per phase: RabbitMQ 10 × 3,000, Kafka 6 × 2,000, SQS 6 × 1,000
# (the emulator answers a send in about 10 ms). Set MQTRACE_CF_ROUNDS and
# MQTRACE_CF_PER_PHASE to override them for every broker. Output is appended to
# target/collector-faults.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BROKERS=("$@")
[ ${#BROKERS[@]} -eq 0 ] && BROKERS=(rabbitmq kafka sqs)
unset OTEL_EXPORTER_OTLP_ENDPOINT OTEL_EXPORTER_OTLP_TRACES_ENDPOINT OTEL_SDK_DISABLED

cargo build --release -p mqtrace-perf --bin soak
scripts/brokers.sh start
trap 'scripts/brokers.sh stop' EXIT
# shellcheck disable=SC1091
source .mqtrace-test/env
OUT=${CARGO_TARGET_DIR:-target}/collector-faults.md
for broker in "${BROKERS[@]}"; do
  case "$broker" in
    rabbitmq) rounds=10 per=3000 ;;
    kafka) rounds=6 per=2000 ;;
    sqs) rounds=6 per=1000 ;;
    *) echo "collector-faults.sh: unknown broker $broker" >&2; exit 2 ;;
  esac
  rounds=${MQTRACE_CF_ROUNDS:-$rounds}
  per=${MQTRACE_CF_PER_PHASE:-$per}
  echo "== collector faults: $broker, $rounds rounds of $per messages per phase"
  cargo run --release -q -p mqtrace-perf --bin soak -- "$broker" --collector-faults \
    --rounds "$rounds" --per-phase "$per" | tee -a "$OUT"
done
echo "output: $OUT"
