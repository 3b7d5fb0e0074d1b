# Starts (or stops) PostgreSQL, Redis and a KRaft Kafka broker from nixpkgs on loopback inside the
# Nix build sandbox, with data under $TMPDIR, for the e2e check. Same ports as scripts/stack.sh.
set -euo pipefail
dir="${TMPDIR:-/tmp}/e2e-services"
case "$1" in
  start)
    mkdir -p "$dir"
    initdb -D "$dir/pg" -U postgres --auth=trust >/dev/null
    pg_ctl -D "$dir/pg" -l "$dir/pg.log" -w start \
      -o "-c listen_addresses=127.0.0.1 -p 55432 -c unix_socket_directories=$dir -c max_connections=400"
    redis-server --bind 127.0.0.1 --port 56379 --dir "$dir" --appendonly yes \
      --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
    cat > "$dir/kafka.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:59093
listeners=PLAINTEXT://127.0.0.1:59092,CONTROLLER://127.0.0.1:59093
advertised.listeners=PLAINTEXT://127.0.0.1:59092
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
    kill "$(cat "$dir/kafka.pid")" "$(cat "$dir/redis.pid")" || true
    pg_ctl -D "$dir/pg" -m fast -w stop || true
    ;;
esac
