#!/usr/bin/env bash
# What a traced service pays, measured as services run: each run is its own
# process (perf/src/bin/service_cost.rs: one broker, one role, one
# variant), the collector is another (`mqtrace view`), and each run reports its
# own CPU (user + system) and wall time per message. Variants run side by side in
# interleaved rounds (raw, unsampled, exported, raw, ...; the Kafka producer also
# by-hand: its spans written with the OpenTelemetry API), per broker and role; the
# tables give the median of the rounds and replace the part of docs/benchmarks.md
# between the service-cost markers.
#
#   scripts/service-cost.sh              ROUNDS=5 MESSAGES=10000 SQS_MESSAGES=500 by default
#
# Starts the brokers when they are not running (scripts/brokers.sh). Not in CI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS=${ROUNDS:-5}
MESSAGES=${MESSAGES:-10000}
# The SQS emulator answers in milliseconds, not microseconds: fewer messages.
SQS_MESSAGES=${SQS_MESSAGES:-500}
TARGET=${CARGO_TARGET_DIR:-target}
if [ -z "${MQTRACE_TEST_KAFKA_BOOTSTRAP:-}" ] || [ -z "${MQTRACE_TEST_RABBITMQ_URL:-}" ] || [ -z "${MQTRACE_TEST_SQS_ENDPOINT:-}" ]; then
  scripts/brokers.sh start
  # shellcheck disable=SC1091
  source .mqtrace-test/env
fi
cargo build --release --quiet -p mqtrace-cli --bin mqtrace -p mqtrace-perf --bin service_cost
OUT=$(mktemp -d)
trap 'kill "$VIEW" 2>/dev/null || true; rm -rf "$OUT"' EXIT
# shellcheck source=scripts/view-collector.sh
source scripts/view-collector.sh
for broker in kafka rabbitmq sqs; do
  for role in produce consume worker; do
    n=$MESSAGES
    [ "$broker" = sqs ] && n=$SQS_MESSAGES
    [ "$role" = worker ] && n=$((n / 2))
    for round in $(seq "$ROUNDS"); do
      variants="raw unsampled exported"
      # The Kafka producer also runs its spans written by hand (the floor).
      [ "$broker$role" = kafkaproduce ] && variants="$variants by-hand"
      for variant in $variants; do
        echo "service-cost: $broker $role $variant, round $round/$ROUNDS" >&2
        "$TARGET/release/service_cost" "$broker" "$role" "$variant" \
          --messages "$n" --endpoint "$ENDPOINT" >>"$OUT/results.jsonl"
      done
    done
  done
done
python3 - "$OUT/results.jsonl" "$ROUNDS" "$MESSAGES" "$SQS_MESSAGES" <<'PY'
import json, re, statistics, sys, datetime
path, rounds, messages, sqs_messages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
runs = [json.loads(l) for l in open(path) if l.strip()]
def med(broker, role, variant, key):
    xs = []
    for r in runs:
        if (r["broker"], r["role"], r["variant"]) == (broker, role, variant):
            per = {"cpu": r["cpu_s"], "sys": r["sys_s"], "wall": r["wall_s"]}[key]
            xs.append(per / r["messages"] * 1e6)
    return statistics.median(xs)
ROLES = {"produce": "producer at full speed (500 in flight)",
         "consume": "consumer at full speed (empty handler)",
         "worker": "worker (50 µs handler)"}
out = [f"<!-- service-cost:begin (scripts/service-cost.sh, {datetime.date.today()}, {rounds} rounds of {messages} messages, {messages // 2} for the worker; SQS {sqs_messages} and {sqs_messages // 2}) -->", ""]
TITLES = {"kafka": "Kafka (rdkafka, tansu)", "rabbitmq": "RabbitMQ (lapin)",
          "sqs": "SQS (aws-sdk-sqs, the moto emulator)"}
for broker in ("kafka", "rabbitmq", "sqs"):
    out += [f"**{TITLES[broker]}**, per message, medians of the rounds:", "",
            "| role | CPU raw | CPU unsampled (added) | CPU exported (added) | of it system, raw → exported | wall raw | wall unsampled | wall exported | throughput exported/raw |",
            "|---|---|---|---|---|---|---|---|---|"]
    for role in ("produce", "consume", "worker"):
        c = {v: med(broker, role, v, "cpu") for v in ("raw", "unsampled", "exported")}
        s = {v: med(broker, role, v, "sys") for v in ("raw", "exported")}
        w = {v: med(broker, role, v, "wall") for v in ("raw", "unsampled", "exported")}
        out.append(f"| {ROLES[role]} | {c['raw']:.1f} µs | {c['unsampled']:.1f} µs ({c['unsampled'] - c['raw']:+.1f}) | "
                   f"{c['exported']:.1f} µs ({c['exported'] - c['raw']:+.1f}) | {s['raw']:.1f} → {s['exported']:.1f} µs | "
                   f"{w['raw']:.1f} µs | {w['unsampled']:.1f} µs | {w['exported']:.1f} µs | {w['raw'] / w['exported']:.2f} |")
    if broker == "kafka":
        c = {v: med("kafka", "produce", v, "cpu") for v in ("raw", "exported", "byhand")}
        w = {v: med("kafka", "produce", v, "wall") for v in ("raw", "exported", "byhand")}
        out += ["", "The Kafka producer against the same send spans written by hand with the OpenTelemetry API (same SDK, export and collector):", "",
                "| producer at full speed | CPU per send | added to raw | wall per send | throughput of raw |", "|---|---|---|---|---|"]
        for v, label in (("raw", "raw rdkafka"), ("byhand", "spans by hand, OpenTelemetry API"), ("exported", "mqtrace")):
            added = "—" if v == "raw" else f"{c[v] - c['raw']:+.1f} µs"
            out.append(f"| {label} | {c[v]:.1f} µs | {added} | {w[v]:.1f} µs | {w['raw'] / w[v]:.2f} |")
    out.append("")
out.append("<!-- service-cost:end -->")
table = "\n".join(out)
doc = open("docs/benchmarks.md").read()
new, count = re.subn(r"<!-- service-cost:begin.*?<!-- service-cost:end -->", lambda _: table, doc, flags=re.S)
if count != 1:
    sys.exit("docs/benchmarks.md has no service-cost markers")
open("docs/benchmarks.md", "w").write(new)
print(table)
PY
