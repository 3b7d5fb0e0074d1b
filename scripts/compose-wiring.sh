#!/usr/bin/env bash
# The docker-compose wiring, run natively (no Docker engine here): starts the native stack for a
# compose profile, then the `migrate` step, the topic init and both services with exactly the
# environment docker-compose.yml gives them (read from the file with compose-check), the compose
# host names pointed at loopback, and runs the end-to-end flow against them:
# purchases over WebSocket with walletctl, exact totals over gRPC, SIGTERM exits 0. A replicated
# service (deploy.replicas) runs as many processes, each on a port of its own.
# The Docker secrets (/run/secrets/NAME) become files under the run's folder, with the same
# names and the native stack's addresses (its PostgreSQL trusts loopback and its Redis has no
# requirepass, so those two credentials are accepted but not checked here); the services read them
# through the same *_FILE settings, and authentication is on as in compose (AUTH_MODE=jwt).
#
#   scripts/compose-wiring.sh kraft        # the default profile: Kafka 4, KRaft
#   scripts/compose-wiring.sh zookeeper    # Kafka 3.9 with ZooKeeper
#   scripts/compose-wiring.sh cluster      # three brokers, a Redis Cluster, 2 websocket and 3
#                                          # grpc_kafka replicas (the native stack's, scripts/stack.sh
#                                          # cluster and redis-cluster; the Kafka cluster is stopped
#                                          # afterwards unless it was running before)
#
# Expects the release binaries in target/release (scripts/test.sh builds them first).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE="${1:?usage: compose-wiring.sh kraft|zookeeper|cluster}"
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

[ -x "$CHECK" ] || die "$CHECK is missing: run scripts/static-checks.sh first"
mkdir -p "$RUN"

# The compose services of the mode, and the native Kafka and Redis standing in for the profile's.
websocket=websocket grpc_kafka=grpc_kafka kafka_init=kafka-init started_cluster=no
case "$MODE" in
  kraft) scripts/stack.sh deps >&2; brokers="127.0.0.1:${STACK_KAFKA_PORT:-59092}"; libs="$STACK/kafka/libs" ;;
  zookeeper)
    scripts/stack.sh deps >&2; scripts/stack.sh deps-zookeeper >&2
    brokers="127.0.0.1:${STACK_ZK_KAFKA_PORT:-59192}"; libs="$STACK/kafka-zookeeper/libs" ;;
  cluster)
    websocket=websocket-replicas grpc_kafka=grpc_kafka-replicas kafka_init=kafka-init-cluster
    scripts/stack.sh deps >&2
    kill -0 "$(cat "$STACK/kafka-cluster/1/kafka.pid" 2>/dev/null)" 2>/dev/null || started_cluster=yes
    brokers="$(scripts/stack.sh cluster up | tail -n1)"; libs="$STACK/kafka/libs"
    scripts/stack.sh redis-cluster up | tail -n1 > "$RUN/redis-cluster-url" ;;
  *) die "unknown mode $MODE" ;;
esac

# Compose service names and ports -> the native stack on loopback. Bind addresses keep their port
# shifted by 10000 so a running `scripts/stack.sh up` does not collide; replica N (1, 2, ...) of a
# service listens on its port + N - 1.
rewrite() {
  sed -e "s#@postgres:5432/#@127.0.0.1:$PG_PORT/#" \
      -e "s#^KAFKA_BROKERS=kafka:9092\$#KAFKA_BROKERS=$brokers#" \
      -e "s#^KAFKA_BROKERS=kafka-1:9092,kafka-2:9092,kafka-3:9092\$#KAFKA_BROKERS=$brokers#" \
      -e "s#^WEBSOCKET_ADDR=0.0.0.0:8080\$#WEBSOCKET_ADDR=127.0.0.1:$WS_PORT#" \
      -e "s#^GRPC_ADDR=0.0.0.0:50051\$#GRPC_ADDR=127.0.0.1:$GRPC_PORT#" \
      -e "s#^METRICS_ADDR=0.0.0.0:9464\$#METRICS_ADDR=127.0.0.1:$METRICS_PORT#" \
      -e "s#^CONSOLE_TOTALS_URL=http://localhost:50051\$#CONSOLE_TOTALS_URL=http://127.0.0.1:$GRPC_PORT#" \
      -e "s#^GRPC_WEB_ALLOWED_ORIGINS=.*#GRPC_WEB_ALLOWED_ORIGINS=http://127.0.0.1:$WS_PORT#" \
      -e "s#=/run/secrets/#=$RUN/secrets/#"
}
# The settings of replica N past its service's: its own listening ports.
replica_env() { # n
  echo "WEBSOCKET_ADDR=127.0.0.1:$((WS_PORT + $1 - 1)) GRPC_ADDR=127.0.0.1:$((GRPC_PORT + $1 - 1))"
  echo "METRICS_ADDR=127.0.0.1:$((METRICS_PORT + $1 - 1))"
}
mkdir -p "$RUN/secrets" && chmod 700 "$RUN/secrets"
printf 'postgres://postgres:native-stack-trusts-loopback@127.0.0.1:%s/wallet\n' "$PG_PORT" > "$RUN/secrets/database_url"
printf 'redis://127.0.0.1:%s/0\n' "$REDIS_PORT" > "$RUN/secrets/redis_url"
[ "$MODE" != cluster ] || cp "$RUN/redis-cluster-url" "$RUN/secrets/redis_cluster_url"
[ -s "$RUN/secrets/jwt_hs256_key" ] || head -c 48 /dev/urandom | base64 -w0 > "$RUN/secrets/jwt_hs256_key"
export JWT_HS256_SECRET_FILE="$RUN/secrets/jwt_hs256_key" # walletctl mints its tokens with it
service_env() { "$CHECK" -profile "$MODE" -env "$1" docker-compose.yml | rewrite; }
for service in migrate "$websocket" "$grpc_kafka"; do
  service_env "$service" > "$RUN/$service.env"
  if grep -E '(postgres|kafka|redis)(-[a-z0-9]+)?:[0-9]' "$RUN/$service.env"; then
    die "$service has a compose host name the rewrite does not cover"
  fi
  for file in $(sed -n 's/^[A-Z_]*_FILE=//p' "$RUN/$service.env"); do
    [ -s "$file" ] || die "$service reads $file, which the wiring run does not provide"
  done
done

# The environment of a compose service, plus replica N's ports.
settings_of() { cat "$RUN/$1.env"; replica_env "$2"; }
# Runs a binary with only that environment.
run_as() { # service n binary args...
  local service=$1 n=$2 binary=$3; shift 3
  # shellcheck disable=SC2046
  env -i PATH="$PATH" RUST_LOG=warn $(settings_of "$service" "$n") "$BIN/$binary" "$@"
}
# Starts replica N in the background, logging to $RUN/BINARY-N.log; `exec` makes the background
# job's pid the binary's own, so signals reach it.
launch() { # service n binary
  local service=$1 n=$2 binary=$3
  # shellcheck disable=SC2046
  (exec >"$RUN/$binary-$n.log" 2>&1; exec env -i PATH="$PATH" RUST_LOG=warn $(settings_of "$service" "$n") "$BIN/$binary") &
  pid_of[$binary-$n]=$!
}

log "migrate (the compose migrate step)"
run_as migrate 1 websocket migrate

# The compose topic init's own arguments, pointed at the native brokers.
mapfile -t init_args < <("$CHECK" -profile "$MODE" -entrypoint "$kafka_init" docker-compose.yml)
[[ "${init_args[0]}" == */kafka-topics.sh ]] || die "$kafka_init does not run kafka-topics.sh"
init_args=("${init_args[@]:1}")
for i in "${!init_args[@]}"; do
  [ "${init_args[$i]}" = --bootstrap-server ] && init_args[i+1]="$brokers"
done
log "$kafka_init: kafka-topics.sh ${init_args[*]}"
topic=$(grep '^KAFKA_TOPIC=' "$RUN/$websocket.env" | cut -d= -f2)
[ "$topic" = user_purchase ] || die "unexpected topic $topic"
java -cp "$libs/*" org.apache.kafka.tools.TopicCommand "${init_args[@]}" \
  >/dev/null 2>"$RUN/kafka-init.log" || { cat "$RUN/kafka-init.log" >&2; die "$kafka_init failed"; }

ws_replicas=$("$CHECK" -profile "$MODE" -replicas "$websocket" docker-compose.yml)
grpc_replicas=$("$CHECK" -profile "$MODE" -replicas "$grpc_kafka" docker-compose.yml)
declare -A pid_of
cleanup() {
  for pid in "${pid_of[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  if [ "$started_cluster" = yes ]; then scripts/stack.sh cluster down >&2 || true; fi
}
trap cleanup EXIT
log "starting $ws_replicas $websocket and $grpc_replicas $grpc_kafka with their compose environment"
for n in $(seq "$ws_replicas"); do launch "$websocket" "$n" websocket; done
for n in $(seq "$grpc_replicas"); do launch "$grpc_kafka" "$n" grpc_kafka; done
healthy() {
  local n
  for n in $(seq "$ws_replicas"); do run_as "$websocket" "$n" websocket healthcheck 2>/dev/null || return 1; done
  for n in $(seq "$grpc_replicas"); do run_as "$grpc_kafka" "$n" grpc_kafka healthcheck 2>/dev/null || return 1; done
}
all_alive() {
  local name
  for name in "${!pid_of[@]}"; do
    kill -0 "${pid_of[$name]}" 2>/dev/null || die "$name exited at start; is its port taken? (see $RUN/$name.log)"
  done
}
deadline=$((SECONDS + 90))
until healthy; do
  all_alive
  [ $SECONDS -lt $deadline ] || die "services not healthy within 90 s"
  sleep 0.3
done
# Healthy, and it is our processes that answered (not something else on those ports).
all_alive

# The flow: 200 purchases for 10 users of this run, amounts in exact cents, spread over the
# websocket replicas; each user's total read from one grpc_kafka replica, in turn.
run_id="wiring-$MODE-$(date +%s)-$$"
declare -A cents count
for n in $(seq "$ws_replicas"); do : > "$RUN/purchases-$n.jsonl"; done
for i in $(seq 1 200); do
  user="$run_id-u$((i % 10))"
  amount=$(( (i * 7919) % 100000 + 1 ))
  printf '{"user_id":"%s","amount":"%d.%02d"}\n' "$user" $((amount / 100)) $((amount % 100)) \
    >> "$RUN/purchases-$(( i % ws_replicas + 1 )).jsonl"
  cents[$user]=$(( ${cents[$user]:-0} + amount ))
  count[$user]=$(( ${count[$user]:-0} + 1 ))
done
acks=0
for n in $(seq "$ws_replicas"); do
  ws_url="ws://127.0.0.1:$((WS_PORT + n - 1))/ws"
  log "sending $(wc -l < "$RUN/purchases-$n.jsonl") purchases to $ws_url"
  "$BIN/walletctl" --ws-url "$ws_url" send-file "$RUN/purchases-$n.jsonl" > "$RUN/replies-$n.jsonl" \
    || die "not every purchase was acked (see $RUN/replies-$n.jsonl)"
  acks=$(( acks + $(grep -c '"type":"ack"' "$RUN/replies-$n.jsonl") ))
done
[ "$acks" = 200 ] || die "expected 200 acks, got $acks"

failed=0 turn=0
for user in "${!cents[@]}"; do
  grpc_url="http://127.0.0.1:$((GRPC_PORT + turn % grpc_replicas))"; turn=$((turn + 1))
  line=$("$BIN/walletctl" --grpc-url "$grpc_url" total "$user" --wait-count "${count[$user]}" --wait-secs 60 || true)
  want="$user: total $(( cents[$user] / 100 )).$(printf '%02d' $(( cents[$user] % 100 ))) (${cents[$user]} cents) over ${count[$user]} purchases"
  if [ "$line" != "$want" ]; then log "MISMATCH from $grpc_url: got '$line', want '$want'"; failed=1; fi
done
[ $failed = 0 ] || die "totals do not match"
log "totals of all 10 users are exact"

if [ "$MODE" = kraft ]; then
  log "the console page in a browser, with the compose configuration"
  CONSOLE_ADDR="127.0.0.1:$WS_PORT" WALLETCTL="$BIN/walletctl" \
    scripts/browser-test.sh --screenshot "$RUN/console.png" || die "browser test of the console failed"
fi

kill -TERM "${pid_of[@]}"
failed=""
for name in "${!pid_of[@]}"; do
  status=0; wait "${pid_of[$name]}" || status=$?
  [ "$status" = 0 ] || failed+=" $name:$status"
done
pid_of=()
[ -z "$failed" ] || die "exit status after SIGTERM:$failed"
log "passed: migrate, topic init, 200 purchases over $ws_replicas websocket, exact totals from $grpc_replicas grpc_kafka, clean SIGTERM"
