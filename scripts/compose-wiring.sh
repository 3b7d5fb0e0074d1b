#!/usr/bin/env bash
# The docker-compose wiring, run natively (no Docker engine here): starts the native stack for a
# compose profile, then the `migrate` step, the topic init and both services with exactly the
# environment docker-compose.yml gives them (read from the file with compose-check), the compose
# host names pointed at loopback, and runs the end-to-end flow against them:
# purchases over WebSocket with walletctl, exact totals over gRPC, SIGTERM exits 0.
# The Docker secrets (/run/secrets/NAME) become files under the run's folder, with the same
# names and the native stack's addresses (its PostgreSQL trusts loopback and its Redis has no
# requirepass, so those two credentials are accepted but not checked here); the services read them
# through the same *_FILE settings, and authentication is on as in compose (AUTH_MODE=jwt).
#
#   scripts/compose-wiring.sh kraft        # the default profile: Kafka 4, KRaft
#   scripts/compose-wiring.sh zookeeper    # Kafka 3.9 with ZooKeeper
#
# Expects the release binaries in target/release (scripts/test.sh builds them first).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE="${1:?usage: compose-wiring.sh kraft|zookeeper}"
BIN="${WALLET_BIN_DIR:-$ROOT/target/release}"
STACK="${STACK_DIR:-$ROOT/.stack}"
CHECK="$STACK/tools/compose-check"
RUN="$STACK/compose-wiring-$MODE"
# The stack's ports (scripts/stack.sh reads the same variables with the same defaults).
PG_PORT="${STACK_PG_PORT:-55432}"
REDIS_PORT="${STACK_REDIS_PORT:-56379}"
WS_PORT="${STACK_WIRING_WS_PORT:-18080}"
GRPC_PORT="${STACK_WIRING_GRPC_PORT:-60051}"
METRICS_PORT="${STACK_WIRING_METRICS_PORT:-19465}"
log() { printf '[wiring %s] %s\n' "$MODE" "$*" >&2; }
die() { printf '[wiring %s] error: %s\n' "$MODE" "$*" >&2; exit 1; }

case "$MODE" in
  kraft) scripts/stack.sh deps >&2; kafka_port="${STACK_KAFKA_PORT:-59092}" ;;
  zookeeper) scripts/stack.sh deps >&2; scripts/stack.sh deps-zookeeper >&2; kafka_port="${STACK_ZK_KAFKA_PORT:-59192}" ;;
  *) die "unknown mode $MODE" ;;
esac
[ -x "$CHECK" ] || die "$CHECK is missing: run scripts/static-checks.sh first"
mkdir -p "$RUN"

# Compose service names and ports -> the native stack on loopback. Bind addresses keep their port
# shifted by 10000 so a running `scripts/stack.sh up` does not collide.
rewrite() {
  sed -e "s#@postgres:5432/#@127.0.0.1:$PG_PORT/#" \
      -e "s#^KAFKA_BROKERS=kafka:9092\$#KAFKA_BROKERS=127.0.0.1:$kafka_port#" \
      -e "s#redis://redis:6379/#redis://127.0.0.1:$REDIS_PORT/#" \
      -e "s#^WEBSOCKET_ADDR=0.0.0.0:8080\$#WEBSOCKET_ADDR=127.0.0.1:$WS_PORT#" \
      -e "s#^GRPC_ADDR=0.0.0.0:50051\$#GRPC_ADDR=127.0.0.1:$GRPC_PORT#" \
      -e "s#^METRICS_ADDR=0.0.0.0:9464\$#METRICS_ADDR=127.0.0.1:$METRICS_PORT#" \
      -e "s#^CONSOLE_TOTALS_URL=http://localhost:50051\$#CONSOLE_TOTALS_URL=http://127.0.0.1:$GRPC_PORT#" \
      -e "s#^GRPC_WEB_ALLOWED_ORIGINS=.*#GRPC_WEB_ALLOWED_ORIGINS=http://127.0.0.1:$WS_PORT#" \
      -e "s#=/run/secrets/#=$RUN/secrets/#"
}
mkdir -p "$RUN/secrets" && chmod 700 "$RUN/secrets"
printf 'postgres://postgres:native-stack-trusts-loopback@127.0.0.1:%s/wallet\n' "$PG_PORT" > "$RUN/secrets/database_url"
printf 'redis://127.0.0.1:%s/0\n' "$REDIS_PORT" > "$RUN/secrets/redis_url"
[ -s "$RUN/secrets/jwt_hs256_key" ] || head -c 48 /dev/urandom | base64 -w0 > "$RUN/secrets/jwt_hs256_key"
export JWT_HS256_SECRET_FILE="$RUN/secrets/jwt_hs256_key" # walletctl mints its tokens with it
service_env() { "$CHECK" -profile "$MODE" -env "$1" docker-compose.yml | rewrite; }
for service in migrate websocket grpc_kafka; do
  service_env "$service" > "$RUN/$service.env"
  if grep -E '(postgres|kafka|redis):[0-9]' "$RUN/$service.env"; then
    die "$service has a compose host name the rewrite does not cover"
  fi
  for file in $(sed -n 's/^[A-Z_]*_FILE=//p' "$RUN/$service.env"); do
    [ -s "$file" ] || die "$service reads $file, which the wiring run does not provide"
  done
done

# Runs a binary with only the environment of its compose service. In the background, `exec`
# makes the background job's pid the binary's own, so signals reach it.
run_as() { # service binary args...
  local service=$1 binary=$2; shift 2
  # shellcheck disable=SC2046
  env -i PATH="$PATH" RUST_LOG=warn $(cat "$RUN/$service.env") "$BIN/$binary" "$@"
}
exec_as() { # service binary
  # shellcheck disable=SC2046
  exec env -i PATH="$PATH" RUST_LOG=warn $(cat "$RUN/$1.env") "$BIN/$2"
}

log "migrate (the compose migrate step)"
run_as migrate websocket migrate

log "kafka-init: topic user_purchase with 4 partitions"
topic=$(grep '^KAFKA_TOPIC=' "$RUN/websocket.env" | cut -d= -f2)
[ "$topic" = user_purchase ] || die "unexpected topic $topic"
libs=$([ "$MODE" = kraft ] && echo "$STACK/kafka/libs" || echo "$STACK/kafka-zookeeper/libs")
java -cp "$libs/*" org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$kafka_port" \
  --create --if-not-exists --topic "$topic" --partitions 4 --replication-factor 1 \
  --config retention.ms=-1 >/dev/null 2>"$RUN/kafka-init.log" || { cat "$RUN/kafka-init.log" >&2; die "kafka-init failed"; }

pids=()
cleanup() { for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT
log "starting websocket and grpc_kafka with their compose environment"
exec_as websocket websocket >"$RUN/websocket.log" 2>&1 & ws_pid=$!; pids+=("$ws_pid")
exec_as grpc_kafka grpc_kafka >"$RUN/grpc_kafka.log" 2>&1 & grpc_pid=$!; pids+=("$grpc_pid")
deadline=$((SECONDS + 90))
until run_as websocket websocket healthcheck 2>/dev/null && run_as grpc_kafka grpc_kafka healthcheck 2>/dev/null; do
  kill -0 "$ws_pid" 2>/dev/null || die "websocket exited (see $RUN/websocket.log)"
  kill -0 "$grpc_pid" 2>/dev/null || die "grpc_kafka exited (see $RUN/grpc_kafka.log)"
  [ $SECONDS -lt $deadline ] || die "services not healthy within 90 s"
  sleep 0.3
done
# Healthy, and it is our processes that answered (not something else on those ports).
kill -0 "$ws_pid" 2>/dev/null && kill -0 "$grpc_pid" 2>/dev/null \
  || die "a service exited at start; are ports $WS_PORT/$GRPC_PORT taken? (see $RUN/*.log)"

# The flow: 200 purchases for 10 users of this run, amounts in exact cents.
run_id="wiring-$MODE-$(date +%s)-$$"
declare -A cents count
: > "$RUN/purchases.jsonl"
for i in $(seq 1 200); do
  user="$run_id-u$((i % 10))"
  amount=$(( (i * 7919) % 100000 + 1 ))
  printf '{"user_id":"%s","amount":"%d.%02d"}\n' "$user" $((amount / 100)) $((amount % 100)) >> "$RUN/purchases.jsonl"
  cents[$user]=$(( ${cents[$user]:-0} + amount ))
  count[$user]=$(( ${count[$user]:-0} + 1 ))
done
ws_url="ws://$(grep '^WEBSOCKET_ADDR=' "$RUN/websocket.env" | cut -d= -f2)/ws"
grpc_url="http://$(grep '^GRPC_ADDR=' "$RUN/grpc_kafka.env" | cut -d= -f2)"
log "sending 200 purchases to $ws_url"
"$BIN/walletctl" --ws-url "$ws_url" send-file "$RUN/purchases.jsonl" > "$RUN/replies.jsonl" \
  || die "not every purchase was acked (see $RUN/replies.jsonl)"
[ "$(grep -c '"type":"ack"' "$RUN/replies.jsonl")" = 200 ] || die "expected 200 acks"

failed=0
for user in "${!cents[@]}"; do
  line=$("$BIN/walletctl" --grpc-url "$grpc_url" total "$user" --wait-count "${count[$user]}" --wait-secs 60 || true)
  want="$user: total $(( cents[$user] / 100 )).$(printf '%02d' $(( cents[$user] % 100 ))) (${cents[$user]} cents) over ${count[$user]} purchases"
  if [ "$line" != "$want" ]; then log "MISMATCH: got '$line', want '$want'"; failed=1; fi
done
[ $failed = 0 ] || die "totals do not match"
log "totals of all 10 users are exact"

if [ "$MODE" = kraft ]; then
  log "the console page in a browser, with the compose configuration"
  CONSOLE_ADDR="127.0.0.1:$WS_PORT" WALLETCTL="$BIN/walletctl" \
    scripts/browser-test.sh --screenshot "$RUN/console.png" || die "browser test of the console failed"
fi

kill -TERM "$ws_pid" "$grpc_pid"
ws_status=0; wait "$ws_pid" || ws_status=$?
grpc_status=0; wait "$grpc_pid" || grpc_status=$?
pids=()
[ "$ws_status" = 0 ] && [ "$grpc_status" = 0 ] || die "exit status after SIGTERM: websocket $ws_status, grpc_kafka $grpc_status"
log "passed: migrate, topic init, 200 purchases, exact totals, clean SIGTERM"
