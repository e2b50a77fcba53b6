#!/usr/bin/env bash
# The real brokers of the test suite, on loopback only: RabbitMQ (Debian's package),
# a Kafka-protocol broker (tansu, built once with cargo and cached) and an SQS
# emulator (moto, in a cached virtualenv). Installs what is missing, reuses what is
# there, and writes the endpoints to .mqtrace-test/env for the tests.
#
#   scripts/brokers.sh start   install if needed, start, wait until each answers
#   scripts/brokers.sh stop    stop what start started
#
# An endpoint already set in the environment (MQTRACE_TEST_RABBITMQ_URL,
# MQTRACE_TEST_KAFKA_BOOTSTRAP, MQTRACE_TEST_SQS_ENDPOINT) is used as it is and that
# broker is not started. For the RabbitMQ it starts, the script also writes
# .mqtrace-test/rabbitmqctl (MQTRACE_TEST_RABBITMQCTL), which the restart tests use;
# the Kafka restart tests get the tansu binary (MQTRACE_TEST_TANSU) and, when moto is
# started here, its S3 endpoint (MQTRACE_TEST_S3_ENDPOINT) with a bucket for tansu.
# The Lambda example's test gets cargo-lambda (MQTRACE_TEST_CARGO_LAMBDA, from PyPI,
# cached), whose runtime API emulator it starts on loopback. The conventions check
# (scripts/semconv-check.mjs, run by the own-loop examples' tests) gets the
# semantic-conventions registry as the npm package @opentelemetry/semantic-conventions
# (MQTRACE_TEST_SEMCONV, cached). The web page test of `mqtrace view` gets headless
# Chromium (Debian's chromium package, MQTRACE_TEST_CHROMIUM).
# Fixed ports, all on 127.0.0.1, overridable:
#   MQTRACE_RABBITMQ_PORT (31672; Erlang distribution on +20000), MQTRACE_KAFKA_PORT
#   (39092), MQTRACE_SQS_PORT (39324), MQTRACE_EPMD_PORT (34369).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${MQTRACE_TEST_STATE:-$ROOT/.mqtrace-test}
CACHE=${MQTRACE_CACHE:-$HOME/.cache/mqtrace}
RABBITMQ_PORT=${MQTRACE_RABBITMQ_PORT:-31672}
KAFKA_PORT=${MQTRACE_KAFKA_PORT:-39092}
SQS_PORT=${MQTRACE_SQS_PORT:-39324}
EPMD_PORT=${MQTRACE_EPMD_PORT:-34369}
TANSU_VERSION=0.6.0
RABBITMQ_BIN=/usr/lib/rabbitmq/bin
TANSU=$CACHE/tools/bin/tansu
MOTO=$CACHE/moto-venv/bin/moto_server
CARGO_LAMBDA_VERSION=1.9.2
CARGO_LAMBDA=$CACHE/cargo-lambda-venv/bin/cargo-lambda
SEMCONV_VERSION=1.45.0
SEMCONV=$CACHE/semconv-$SEMCONV_VERSION/node_modules/@opentelemetry/semantic-conventions

log() { printf 'brokers: %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # name port seconds
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    port_open "$2" && return 0
    sleep 0.1
  done
  log "$1 did not open port $2 within $3 s; its log is in $STATE"
  return 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_rabbitmq() {
  [ -x "$RABBITMQ_BIN/rabbitmq-server" ] && return
  log "installing rabbitmq-server (Debian package)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq rabbitmq-server >/dev/null
}

install_tansu() {
  [ -x "$TANSU" ] && return
  log "building tansu $TANSU_VERSION once (about 10 minutes on 2 cores; cached in $CACHE/tools)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore \
    --root "$CACHE/tools" --quiet
}

install_moto() {
  [ -x "$MOTO" ] && return
  log "installing moto[server] into $CACHE/moto-venv"
  python3 -m venv "$CACHE/moto-venv"
  "$CACHE/moto-venv/bin/pip" install --quiet "moto[server]>=5.1,<5.3"
}

install_cargo_lambda() {
  [ -x "$CARGO_LAMBDA" ] && return
  log "installing cargo-lambda $CARGO_LAMBDA_VERSION (PyPI) into $CACHE/cargo-lambda-venv"
  python3 -m venv "$CACHE/cargo-lambda-venv"
  "$CACHE/cargo-lambda-venv/bin/pip" install --quiet "cargo-lambda==$CARGO_LAMBDA_VERSION"
}

install_chromium() {
  command -v chromium >/dev/null && return
  log "installing chromium (Debian package) for the web page test of mqtrace view"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium >/dev/null
}

install_semconv() {
  [ -f "$SEMCONV/package.json" ] && return
  command -v npm >/dev/null || { log "npm is needed for the conventions check (Node.js)"; exit 1; }
  log "installing @opentelemetry/semantic-conventions $SEMCONV_VERSION (npm) into $CACHE/semconv-$SEMCONV_VERSION"
  mkdir -p "$CACHE/semconv-$SEMCONV_VERSION"
  npm install --silent --no-audit --no-fund --prefix "$CACHE/semconv-$SEMCONV_VERSION" \
    "@opentelemetry/semantic-conventions@$SEMCONV_VERSION" >&2
}

rabbitmq_env() {
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=$RABBITMQ_PORT
  export ERL_EPMD_ADDRESS=127.0.0.1 ERL_EPMD_PORT=$EPMD_PORT
  export RABBITMQ_NODENAME=mqtrace@localhost HOME=$STATE/rabbitmq
  export RABBITMQ_MNESIA_BASE=$STATE/rabbitmq/mnesia RABBITMQ_LOG_BASE=$STATE/rabbitmq/log
  export RABBITMQ_ENABLED_PLUGINS_FILE=$STATE/rabbitmq/enabled_plugins
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

start_rabbitmq() {
  install_rabbitmq
  # A fresh node each run: queues of earlier runs would pile up.
  rm -rf "$STATE/rabbitmq"
  mkdir -p "$STATE/rabbitmq"
  echo '[].' >"$STATE/rabbitmq/enabled_plugins"
  (
    rabbitmq_env
    nohup "$RABBITMQ_BIN/rabbitmq-server" >"$STATE/rabbitmq/server.log" 2>&1 &
    echo $! >"$STATE/rabbitmq.pid"
    sleep 2
    timeout 120 "$RABBITMQ_BIN/rabbitmqctl" -n mqtrace@localhost -q await_startup >/dev/null
  ) || { log "RabbitMQ did not start; see $STATE/rabbitmq"; return 1; }
  echo "export MQTRACE_TEST_RABBITMQ_URL=amqp://guest:guest@127.0.0.1:$RABBITMQ_PORT/%2f" >>"$STATE/env"
  # The broker-restart tests stop and start the node's application through this.
  cat >"$STATE/rabbitmqctl" <<CTL
#!/usr/bin/env bash
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=$RABBITMQ_PORT
export ERL_EPMD_ADDRESS=127.0.0.1 ERL_EPMD_PORT=$EPMD_PORT HOME=$STATE/rabbitmq
exec "$RABBITMQ_BIN/rabbitmqctl" -n mqtrace@localhost -q "\$@"
CTL
  chmod +x "$STATE/rabbitmqctl"
  echo "export MQTRACE_TEST_RABBITMQCTL=$STATE/rabbitmqctl" >>"$STATE/env"
}

start_kafka() {
  install_tansu
  env -u OTEL_EXPORTER_OTLP_ENDPOINT nohup "$TANSU" broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine memory://tansu/ >"$STATE/tansu.log" 2>&1 &
  echo $! >"$STATE/tansu.pid"
  wait_port tansu "$KAFKA_PORT" 60
  echo "export MQTRACE_TEST_KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT" >>"$STATE/env"
}

start_sqs() {
  install_moto
  nohup "$MOTO" -H 127.0.0.1 -p "$SQS_PORT" >"$STATE/moto.log" 2>&1 &
  echo $! >"$STATE/moto.pid"
  wait_port moto "$SQS_PORT" 60
  echo "export MQTRACE_TEST_SQS_ENDPOINT=http://127.0.0.1:$SQS_PORT" >>"$STATE/env"
  # moto speaks S3 too: the Kafka broker-restart tests run brokers of their own that
  # keep their log in this bucket, so that a killed broker loses nothing.
  "$CACHE/moto-venv/bin/python" - "$SQS_PORT" <<'PY'
import sys, urllib.request
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/mqtrace-kafka", method="PUT")
urllib.request.urlopen(req, timeout=10).read()
PY
  echo "export MQTRACE_TEST_S3_ENDPOINT=http://127.0.0.1:$SQS_PORT" >>"$STATE/env"
}

start() {
  stop 2>/dev/null || true
  mkdir -p "$STATE"
  : >"$STATE/env"
  local p
  for p in "$RABBITMQ_PORT" "$KAFKA_PORT" "$SQS_PORT"; do
    if port_open "$p"; then
      log "port $p on 127.0.0.1 is taken by something this script did not start; set MQTRACE_*_PORT"
      return 1
    fi
  done
  if [ -n "${MQTRACE_TEST_RABBITMQ_URL:-}" ]; then
    echo "export MQTRACE_TEST_RABBITMQ_URL=$MQTRACE_TEST_RABBITMQ_URL" >>"$STATE/env"
  else start_rabbitmq; fi
  if [ -n "${MQTRACE_TEST_KAFKA_BOOTSTRAP:-}" ]; then
    echo "export MQTRACE_TEST_KAFKA_BOOTSTRAP=$MQTRACE_TEST_KAFKA_BOOTSTRAP" >>"$STATE/env"
  else start_kafka; fi
  # The broker-restart tests start tansu brokers of their own.
  install_tansu
  echo "export MQTRACE_TEST_TANSU=$TANSU" >>"$STATE/env"
  if [ -n "${MQTRACE_TEST_SQS_ENDPOINT:-}" ]; then
    echo "export MQTRACE_TEST_SQS_ENDPOINT=$MQTRACE_TEST_SQS_ENDPOINT" >>"$STATE/env"
  else start_sqs; fi
  # The Lambda example's test runs the function under cargo-lambda's runtime API
  # emulator, which it starts itself on a port of its own.
  install_cargo_lambda
  echo "export MQTRACE_TEST_CARGO_LAMBDA=$CARGO_LAMBDA" >>"$STATE/env"
  install_semconv
  echo "export MQTRACE_TEST_SEMCONV=$SEMCONV" >>"$STATE/env"
  install_chromium
  echo "export MQTRACE_TEST_CHROMIUM=$(command -v chromium)" >>"$STATE/env"
  log "ready: source $STATE/env"
  cat "$STATE/env" >&2
}

stop() {
  if [ -f "$STATE/rabbitmq.pid" ]; then
    ( rabbitmq_env; timeout 30 "$RABBITMQ_BIN/rabbitmqctl" -n mqtrace@localhost -q stop >/dev/null 2>&1 ) || true
  fi
  local name pid
  for name in rabbitmq tansu moto; do
    if [ -f "$STATE/$name.pid" ]; then
      pid=$(cat "$STATE/$name.pid")
      kill "$pid" 2>/dev/null || true
      # Gone before stop returns, so a start right after finds its port free.
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      rm -f "$STATE/$name.pid"
    fi
  done
  # The Erlang port mapper started for our node, on our port only.
  if command -v epmd >/dev/null 2>&1; then ERL_EPMD_PORT=$EPMD_PORT epmd -kill >/dev/null 2>&1 || true; fi
  # Should rabbitmqctl have failed: the node's Erlang VM, by its unique node name.
  pkill -f -- "beam.*mqtrace@localhost" 2>/dev/null || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
