# Starts (or stops) PostgreSQL, Redis, a Redis Cluster (three masters, three replicas) and a KRaft
# Kafka broker on loopback for the flake's e2e
# check, with data under $TMPDIR: inside the Nix build sandbox from nixpkgs, and natively in the
# test command (scripts/nix-checks.sh e2e, with Debian's PostgreSQL and Redis and Kafka's jars on
# PATH). Ports of its own (22xxx and 23xxx), so it never collides with scripts/stack.sh (55xxx) or
# the test stack of scripts/test.sh; all below Linux's ephemeral ports (32768-60999), where a
# client's source port can hold one when the server starts (PostgreSQL once could not start on
# 45432 in the test command).
#
#   e2e-services.sh start | stop | env
#
# The broker's settings are scripts/kafka/kraft-single.properties, the file scripts/stack.sh
# renders too: its path is KAFKA_PROPERTIES_TEMPLATE (nix/checks.nix passes it), or found beside
# this script in the repository.
#
# PostgreSQL refuses to run as root. When the builder is root (a Nix installation without build
# users, or the test command run as root), it runs as nobody (65534): the data folder is nobody's,
# and $TMPDIR, which such a builder gets as a 0700 folder of root's, is made traversable (o+x, no
# read) so that nobody can reach it.
set -euo pipefail
dir="${TMPDIR:-/tmp}/e2e-services"
PG_PORT=23432 REDIS_PORT=23379 KAFKA_PORT=23092 CONTROLLER_PORT=23093
# The Redis Cluster's nodes on 22001-22006 (their cluster buses 10000 above, 32001-32006).
CLUSTER_NODES="22001 22002 22003 22004 22005 22006"
cluster_hosts() { for port in $CLUSTER_NODES; do printf '127.0.0.1:%s\n' "$port"; done; }
template="${KAFKA_PROPERTIES_TEMPLATE:-$(dirname "${BASH_SOURCE[0]}")/../scripts/kafka/kraft-single.properties}"
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
    echo "export REDIS_CLUSTER_URL=redis+cluster://$(cluster_hosts | paste -sd,)"
    ;;
  start)
    mkdir -p "$dir/pg"
    if [ "$(id -u)" = 0 ]; then
      chmod o+x "${TMPDIR:-/tmp}"
      chmod 755 "$dir"
      chown 65534:65534 "$dir/pg"
    fi
    as_pg initdb -D "$dir/pg" -U postgres --auth=trust >/dev/null
    as_pg pg_ctl -D "$dir/pg" -l "$dir/pg/server.log" -w start \
      -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=$dir/pg -c max_connections=400"
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$dir" --appendonly yes \
      --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
    for port in $CLUSTER_NODES; do
      mkdir -p "$dir/redis-cluster/$port"
      redis-server --bind 127.0.0.1 --port "$port" --dir "$dir/redis-cluster/$port" \
        --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
        --appendonly yes --daemonize yes --pidfile "$dir/redis-cluster/$port/redis.pid" \
        --logfile "$dir/redis-cluster/$port/redis.log"
    done
    for port in $CLUSTER_NODES; do
      for _ in $(seq 1 100); do redis-cli -p "$port" PING >/dev/null 2>&1 && break; sleep 0.1; done
    done
    # shellcheck disable=SC2046
    redis-cli --cluster create $(cluster_hosts) \
      --cluster-replicas 1 --cluster-yes >"$dir/redis-cluster/create.log"
    for _ in $(seq 1 300); do
      redis-cli -p 22001 CLUSTER INFO | grep -q '^cluster_state:ok' && break
      sleep 0.2
    done
    redis-cli -p 22001 CLUSTER INFO | grep -q '^cluster_state:ok' \
      || { echo "the Redis Cluster is not ok" >&2; cat "$dir/redis-cluster/create.log" >&2; exit 1; }
    sed -e "s|@KAFKA_PORT@|$KAFKA_PORT|g" -e "s|@CONTROLLER_PORT@|$CONTROLLER_PORT|g" \
      -e "s|@LOG_DIRS@|$dir/kafka|g" "$template" > "$dir/kafka.properties"
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
    for port in $CLUSTER_NODES; do
      kill "$(cat "$dir/redis-cluster/$port/redis.pid")" 2>/dev/null || true
    done
    as_pg pg_ctl -D "$dir/pg" -m fast -w stop || true
    ;;
esac
