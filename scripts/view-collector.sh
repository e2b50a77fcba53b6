# Sourced by the measurement scripts: starts `mqtrace view --summary-only` (the
# release build in $TARGET) on free loopback ports as the collector in another
# process, and sets VIEW (its pid) and ENDPOINT (its gRPC endpoint). $OUT is the
# caller's scratch directory; the caller's EXIT trap kills $VIEW.
"$TARGET/release/mqtrace" view --summary-only --max-traces 100 --grpc 127.0.0.1:0 --http 127.0.0.1:0 >"$OUT/view.log" 2>&1 &
VIEW=$!
for _ in $(seq 50); do grep -q "listening for OTLP" "$OUT/view.log" && break; sleep 0.1; done
ENDPOINT=$(grep -o 'gRPC http://[0-9.:]*' "$OUT/view.log" | cut -d' ' -f2)
[ -n "$ENDPOINT" ] || { cat "$OUT/view.log" >&2; exit 1; }
