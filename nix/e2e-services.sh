# Starts (or stops) PostgreSQL, Redis and a KRaft Kafka broker from nixpkgs on loopback inside the
# Nix build sandbox, with data under $TMPDIR, for the e2e check. Ports of its own (45xxx), so a
# builder without a sandbox never collides with scripts/stack.sh (55xxx) or scripts/test.sh.
#
#   e2e-services.sh start | stop | env
#
# PostgreSQL refuses to run as root; when the builder is root (no sandbox), it runs as nobody.
set -euo pipefail
dir="${TMPDIR:-/tmp}/e2e-services"
PG_PORT=45432 REDIS_PORT=46379 KAFKA_PORT=49092 CONTROLLER_PORT=49093
as_pg() {
  if [ "$(id -u)" = 0 ]; then
    setpriv --reuid=65534 --regid=65534 --clear-groups -- "$@"
  else
    "$@"
  fi
}
case "$1" in
  env)
    echo "export TEST_DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres"
    echo "export KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT"
    echo "export REDIS_URL=redis://127.0.0.1:$REDIS_PORT/"
    ;;
  start)
    mkdir -p "$dir/pg"
    if [ "$(id -u)" = 0 ]; then chown 65534:65534 "$dir/pg"; chmod 755 "$dir"; fi
    as_pg initdb -D "$dir/pg" -U postgres --auth=trust >/dev/null
    as_pg pg_ctl -D "$dir/pg" -l "$dir/pg/server.log" -w start \
      -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=$dir/pg -c max_connections=400"
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$dir" --appendonly yes \
      --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
    cat > "$dir/kafka.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/kafka
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
PROPS
    kafka-storage.sh format -t "$(kafka-storage.sh random-uuid)" -c "$dir/kafka.properties" >/dev/null
    kafka-server-start.sh "$dir/kafka.properties" >"$dir/kafka.log" 2>&1 &
    echo $! >"$dir/kafka.pid"
    for _ in $(seq 1 300); do
      grep -q "Kafka Server started" "$dir/kafka.log" && exit 0
      kill -0 "$(cat "$dir/kafka.pid")" || { cat "$dir/kafka.log"; exit 1; }
      sleep 0.2
    done
    echo "kafka did not start" >&2
    exit 1
    ;;
  stop)
    kill "$(cat "$dir/kafka.pid")" "$(cat "$dir/redis.pid")" 2>/dev/null || true
    as_pg pg_ctl -D "$dir/pg" -m fast -w stop || true
    ;;
esac
