#!/usr/bin/env bash
# Instruction counts per stage of one traced send and one traced process, export
# included: the service (crates/mqtrace-telemetry/examples/export_cost.rs) under
# callgrind, exporting over OTLP/gRPC to `mqtrace view` in another process. Each
# function's own instructions (callgrind's exclusive counts, all threads) are put in
# a stage by the path of its symbol; a stage's count per message is its count at
# 2N messages minus its count at N, divided by N, so start-up and shutdown cancel.
# Counts do not move with the machine's load; most stages repeat to a few
# instructions, the allocation stage by up to about 400 a message (glibc's state
# depends on when the exporter's thread runs): judge a change by them, comparing
# runs of one sitting. A second table per path gives the export path's steps with
# everything they call (inclusive counts): the allocations the OTLP conversion
# makes are in the first table's allocation stage, not in its conversion stage.
#
#   scripts/callgrind-breakdown.sh [N]     (default N = 5000; prints a Markdown table)
#
# VARIANT=sdk-exporter counts the same through the SDK's OTLP exporter instead of
# mqtrace's direct encoding (TelemetryBuilder::direct_encoding(false)).
# VARIANT=unsampled counts the same with every span unsampled, VARIANT=raw the
# embedded broker alone (no mqtrace): what the other two are compared with.
# VARIANT=by-hand counts the same spans written by hand with the OpenTelemetry
# API over the same SDK and export: what they cost without mqtrace;
# VARIANT=by-hand-unsampled those with every span unsampled.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N=${1:-5000}
TARGET=${CARGO_TARGET_DIR:-target}
command -v valgrind >/dev/null || { echo "callgrind-breakdown: valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
cargo build --release --quiet -p mqtrace-telemetry --example export_cost
cargo build --release --quiet -p mqtrace-cli --bin mqtrace
OUT=$(mktemp -d)
trap 'kill "$VIEW" 2>/dev/null || true; rm -rf "$OUT"' EXIT
# shellcheck source=scripts/view-collector.sh
source scripts/view-collector.sh
for mode in send process; do
  for n in "$N" "$((2 * N))"; do
    ENDPOINT=$ENDPOINT VARIANT=${VARIANT:-exported} valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.$mode.$n" \
      "$TARGET/release/examples/export_cost" "$mode" "$n" 2>"$OUT/valgrind.$mode.$n.log" \
      || { tail -20 "$OUT/valgrind.$mode.$n.log" >&2; exit 1; }
    callgrind_annotate --threshold=100 "$OUT/cg.$mode.$n" >"$OUT/annotate.$mode.$n" 2>/dev/null
    callgrind_annotate --inclusive=yes --threshold=100 "$OUT/cg.$mode.$n" >"$OUT/inclusive.$mode.$n" 2>/dev/null
  done
done
python3 - "$OUT" "$N" <<'PY'
import re, sys
out, n = sys.argv[1], int(sys.argv[2])
# First match wins: (stage, symbol patterns).
STAGES = [
    ("carrier (inject, extract, headers)", r"mqtrace::(propagation|w3c)|mqtrace::embedded::Header|opentelemetry::propagation|percent_encoding"),
    ("embedded broker (the example's queue)", r"mqtrace::embedded"),
    ("mqtrace's OTLP encoding (mqtrace_telemetry::direct)", r"mqtrace_telemetry::direct"),
    ("mqtrace recipe (description, names, attributes, lifecycle)", r"mqtrace(_telemetry)?::"),
    ("SDK span start and end (ids, sampler, attributes)", r"opentelemetry_sdk::trace::(span::|tracer|sampler|id_generator|provider)|opentelemetry::|rand::|rand_core"),
    ("SDK batch queue", r"opentelemetry_sdk::trace::span_processor|std::sync::mpmc|std::sync::mpsc|crossbeam"),
    ("OTLP conversion (span data to protobuf structs)", r"opentelemetry_proto::"),
    ("protobuf encoding", r"prost::"),
    ("gRPC transport (tonic, h2, hyper, sockets)", r"tonic::|h2::|hyper(_util)?::|tower::|http::|http_body|bytes::|tokio::(io|net)|mio::|indexmap"),
    ("async runtime and threads", r"tokio::|futures_|std::thread|parking_lot"),
    ("string formatting (core::fmt)", r"core::fmt|alloc::fmt|as core::fmt::|pad_integral"),
    ("hashing (SipHash, hash maps)", r"core::hash|sip::Hasher|hashbrown"),
    ("generic std code (iterators, collecting, clones, drops)", r"core::iter|alloc::vec|core::ptr::drop_in_place|alloc::raw_vec|core::slice|alloc::string|alloc::sync|core::ops::function|alloc::borrow|core::option|core::result|std::collections"),
    ("memory allocation", r"malloc|free|realloc|calloc|__rust_alloc|__rust_dealloc|__rdl_|alloc::alloc|tcache|arena_"),
    ("memory copies", r"mem(cpy|move|set|cmp)|__memcpy|__memmove|__memset|strlen"),
]
line = re.compile(r"^\s*([\d,]+)(?: \([^)]*\))?\s+(.*)$")
# Entry points of the export path, for the inclusive table: (step, symbol pattern).
EXPORT_STEPS = [
    ("span end into the batch queue (the processor's on_end)", r"CountingProcessor<.*SpanProcessor>::on_end"),
    ("the batch thread's export (encoding, the exporter's call)", r"BatchSpanProcessor::export_batch_sync"),
    ("mqtrace's direct encoding of the request", r"mqtrace_telemetry::direct::encode_request"),
    ("SDK exporter: OTLP conversion, its allocations and formatting included", r"group_spans_by_resource_and_scope"),
    ("SDK exporter: dropping the converted request", r"drop_in_place<opentelemetry_proto::proto::tonic::trace::v1::ResourceSpans>"),
    ("SDK exporter: protobuf encoding of the request (tonic's body)", r"ProstEncoder<.*Encoder>::encode"),
]
def inclusive(path):
    totals = {name: 0 for name, _ in EXPORT_STEPS}
    for text in open(path, encoding="utf-8", errors="replace"):
        m = line.match(text)
        if not m:
            continue
        count, symbol = int(m.group(1).replace(",", "")), m.group(2)
        for name, pattern in EXPORT_STEPS:
            if re.search(pattern, symbol):
                # One line per function; recursion shows as name'2, counted once.
                if "'" not in symbol.split(" [")[0]:
                    totals[name] = max(totals[name], count)
                break
    return totals
def stages(path):
    totals = {name: 0 for name, _ in STAGES}
    totals["other"] = 0
    seen = False
    for text in open(path, encoding="utf-8", errors="replace"):
        if "file:function" in text:
            seen = True
            continue
        if not seen:
            continue
        m = line.match(text)
        if not m:
            continue
        count, symbol = int(m.group(1).replace(",", "")), m.group(2)
        fn = symbol.split(":", 1)[1] if re.match(r"^[^ :]*:", symbol) else symbol
        for name, pattern in STAGES:
            if re.search(pattern, fn):
                totals[name] += count
                break
        else:
            totals["other"] += count
    return totals
for mode, what in (("send", "traced send (send span, inject, export)"),
                   ("process", "traced process (extract, process span, empty handler, settle, export)")):
    small, large = stages(f"{out}/annotate.{mode}.{n}"), stages(f"{out}/annotate.{mode}.{2 * n}")
    per = {k: (large[k] - small[k]) / n for k in small}
    total = sum(per.values())
    print(f"\n{what}: {total:,.0f} instructions per message\n")
    print("| stage | instructions per message | share |")
    print("|---|---|---|")
    for k, v in sorted(per.items(), key=lambda kv: -kv[1]):
        if abs(v) >= 1:
            print(f"| {k} | {v:,.0f} | {100 * v / total:.0f}% |")
    # The stages above count each function's own instructions, so the
    # allocations, formatting and copies the OTLP conversion causes land in
    # those stages, not in the conversion's. Inclusive counts of the export
    # path's entry points say what each step costs with everything it calls.
    small, large = inclusive(f"{out}/inclusive.{mode}.{n}"), inclusive(f"{out}/inclusive.{mode}.{2 * n}")
    print(f"\n{what}, export path, inclusive (each step with all it calls)\n")
    print("| step | instructions per message | share of the message |")
    print("|---|---|---|")
    for name, _ in EXPORT_STEPS:
        v = (large[name] - small[name]) / n
        print(f"| {name} | {v:,.0f} | {100 * v / total:.0f}% |")
PY
