#!/usr/bin/env bash
# The native stack: PostgreSQL, Redis and a real Apache Kafka broker (KRaft, single node) on
# loopback, plus the two services, with every byte of data under .stack/ (git-ignored).
#
#   scripts/stack.sh up       install what is missing, start everything, send a few purchases, print totals
#   scripts/stack.sh deps     install what is missing and start PostgreSQL, Redis and Kafka only
#   scripts/stack.sh services build and (re)start websocket and grpc_kafka against running deps
#   scripts/stack.sh stop-services     stop websocket and grpc_kafka, leave the dependencies running
#   scripts/stack.sh status   what runs, by pid
#   scripts/stack.sh down     stop everything this script started, by pid
#   scripts/stack.sh env      print the environment the services and tests use
#   scripts/stack.sh deps-zookeeper   start ZooKeeper and a Kafka 3.9 broker in ZooKeeper mode
#                                     (ports 52181 and 59192) for the compose-wiring run
#   scripts/stack.sh cluster up|down   a three-broker KRaft cluster (each node broker and controller;
#                                     ports 59291-59293, controllers 59391-59393) for the
#                                     replicated-topic fault scenario; up also prints its brokers
#   scripts/stack.sh cluster kill9|start N   one node of that cluster (N = 1, 2 or 3)
#   scripts/stack.sh redis-cluster up|down   a Redis Cluster of three masters and three replicas
#                                     (Debian's redis-server, cluster-enabled, created by
#                                     redis-cli --cluster create; ports 47001-47006, buses 57001-57006); up also
#                                     prints its seed URL (redis+cluster://host:port,host:port,...)
#   scripts/stack.sh redis-cluster kill9|start N   one node of it (N = 1 to 6)
#   scripts/stack.sh replicas up|down|endpoints   the cluster stack: PostgreSQL, the three-broker
#                                     Kafka, the Redis Cluster, two websocket and three grpc_kafka
#                                     processes (websocket N on port 8180+N, grpc_kafka N on
#                                     15050+N, its metrics on 9560+N), with a database,
#                                     topic, stream and group of their own; up also prints the
#                                     endpoints; down stops the five and the three brokers
#   scripts/stack.sh pg-bindir | kafka-libs   print PostgreSQL's server binaries folder, or the
#                             Kafka jars' folder (resolved with Maven first): for scripts/nix-checks.sh
#   scripts/stack.sh kill9|stop|start postgres|redis|kafka
#                             one dependency: kill -9 by pid, stop (PostgreSQL: fast shutdown),
#                             or start again with its data (for the fault-injection tests)
#
# Processes are tracked by pid files under .stack/ and stopped by pid, never by name.
# STACK_DIR and the STACK_*_PORT variables move the whole stack elsewhere: scripts/test.sh runs a
# stack of its own that way (.stack-test/, other ports), so it never touches this one. STACK_HOST
# (default 127.0.0.1) is the address everything listens on and is reached at: the fault suite's
# hosts scenarios start each dependency in a network namespace of its own, on its own address.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="${STACK_DIR:-$ROOT/.stack}"
HOST="${STACK_HOST:-127.0.0.1}"
# Off the loopback, Redis answers the hosts of its subnet too: without a password it would refuse
# them in its protected mode.
REDIS_REACH=()
[ "$HOST" = 127.0.0.1 ] || REDIS_REACH=(--protected-mode no)
PG_PORT="${STACK_PG_PORT:-55432}"
REDIS_PORT="${STACK_REDIS_PORT:-56379}"
KAFKA_PORT="${STACK_KAFKA_PORT:-59092}"
KAFKA_CONTROLLER_PORT="${STACK_KAFKA_CONTROLLER_PORT:-59093}"
ZK_PORT="${STACK_ZK_PORT:-52181}"
ZK_KAFKA_PORT="${STACK_ZK_KAFKA_PORT:-59192}"
WS_PORT="${STACK_WS_PORT:-8080}"
GRPC_PORT="${STACK_GRPC_PORT:-50051}"
METRICS_PORT="${STACK_METRICS_PORT:-9464}"
# The three-broker cluster: node N listens on CLUSTER_PORT+N, its controller on CLUSTER_CONTROLLER_PORT+N.
CLUSTER_PORT="${STACK_CLUSTER_PORT:-59290}"
CLUSTER_CONTROLLER_PORT="${STACK_CLUSTER_CONTROLLER_PORT:-59390}"
# The Redis Cluster: node N (1 to 6) listens on REDIS_CLUSTER_PORT+N, its cluster bus 10000 above.
REDIS_CLUSTER_PORT="${STACK_REDIS_CLUSTER_PORT:-47000}"
PG_USER=postgres
PG_DB=wallet

log() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] error: %s\n' "$*" >&2; exit 1; }

# The development signing key of the stack's tokens (AUTH_MODE=jwt): made once, random, under the
# stack's folder (git-ignored), readable by its owner only. walletctl mints tokens with it.
dev_key() {
  local key="$STACK/secrets/jwt-hs256.key"
  if [ ! -s "$key" ]; then
    mkdir -p "$STACK/secrets" && chmod 700 "$STACK/secrets"
    (umask 077; head -c 48 /dev/urandom | base64 -w0 > "$key")
  fi
  echo "$key"
}

print_env() {
  local key
  key="$(dev_key)"
  cat <<EOF
export DATABASE_URL=postgres://$PG_USER@$HOST:$PG_PORT/$PG_DB
export KAFKA_BROKERS=$HOST:$KAFKA_PORT
export REDIS_URL=redis://$HOST:$REDIS_PORT/
export WEBSOCKET_ADDR=$HOST:$WS_PORT
export GRPC_ADDR=$HOST:$GRPC_PORT
export METRICS_ADDR=$HOST:$METRICS_PORT
export CONSOLE_TOTALS_URL=http://$HOST:$GRPC_PORT
export GRPC_WEB_ALLOWED_ORIGINS=http://$HOST:$WS_PORT,http://localhost:$WS_PORT
export KAFKA_TOPIC=user_purchase
export AUTH_MODE=jwt
export JWT_HS256_SECRET_FILE=$key
EOF
}

# ---------------------------------------------------------------- installation
# shellcheck source=scripts/prereqs.sh
. "$ROOT/scripts/prereqs.sh"

pg_bindir() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$dir/initdb" ] && { echo "$dir"; return; }
  done
}

ensure_installed() {
  # First what no script installs (the Rust toolchain) and the C compiler, with a clear message.
  prereqs_build
  local missing=()
  [ -n "$(pg_bindir)" ] || missing+=(postgresql)
  command -v psql >/dev/null || missing+=(postgresql-client)
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v java >/dev/null || missing+=(default-jre-headless)
  command -v mvn >/dev/null || missing+=(maven)
  # Build-time needs of the services: protoc for the gRPC code, cmake and a curl header for librdkafka.
  command -v protoc >/dev/null || missing+=(protobuf-compiler)
  command -v cmake >/dev/null || missing+=(cmake)
  [ -f /usr/include/curl/curl.h ] || ls /usr/include/*/curl/curl.h >/dev/null 2>&1 || missing+=(libcurl4-openssl-dev)
  if [ ${#missing[@]} -gt 0 ]; then prereq_apt "${missing[@]}"; fi
}

# ---------------------------------------------------------------- helpers
pid_alive() { [ -f "$1" ] && kill -0 "$(head -n1 "$1")" 2>/dev/null; }

wait_port() { # name port seconds
  local deadline=$((SECONDS + $3))
  until (exec 3<>"/dev/tcp/$HOST/$2") 2>/dev/null; do
    [ $SECONDS -lt "$deadline" ] || die "$1 did not open port $2 within $3 s (see $STACK/*/*.log)"
    sleep 0.2
  done
}

stop_pidfile() { # name pidfile
  local pidfile=$2 pid
  pid_alive "$pidfile" || { rm -f "$pidfile"; return 0; }
  pid=$(head -n1 "$pidfile")
  log "stopping $1 (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then log "$1 still running; killing"; kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$pidfile"
}

# kill -9 by pid file, returning once the process is gone.
kill9_pidfile() { # name pidfile
  local pid
  pid_alive "$2" || die "$1 is not running"
  pid=$(head -n1 "$2")
  log "kill -9 $1 (pid $pid)"
  kill -KILL "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  rm -f "$2"
}

# ---------------------------------------------------------------- PostgreSQL
pg_run() { # run a PostgreSQL binary as the postgres user when we are root (initdb refuses root)
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_postgres() {
  local bindir data="$STACK/postgres/data"
  bindir="$(pg_bindir)"
  mkdir -p "$STACK/postgres"
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir "$STACK/postgres" postgres
    chown postgres "$STACK/postgres"
  fi
  if [ ! -f "$data/PG_VERSION" ]; then
    log "initialising PostgreSQL in $data"
    pg_run "$bindir/initdb" -D "$data" -U "$PG_USER" --auth=trust --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    # On an address of its own (STACK_HOST), the hosts of its subnet connect too.
    [ "$HOST" = 127.0.0.1 ] || echo "host all all samenet trust" >> "$data/pg_hba.conf"
  fi
  if pg_run "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    log "PostgreSQL already running"
  else
    log "starting PostgreSQL on $HOST:$PG_PORT"
    # Past the defaults (128 MB of buffers, a checkpoint every 1 GB of WAL): with those, a table
    # of tens of millions of purchases had its indexes' pages evicted and written by the
    # committing backends themselves and a checkpoint every 90 s, and commits stalled for
    # seconds (BENCHMARKS.md, the soak). No JIT: it compiled the backlog count of /metrics (an
    # index range, milliseconds) for 8 ms on every scrape; no statement here runs long enough to
    # gain from it.
    pg_run "$bindir/pg_ctl" -D "$data" -l "$STACK/postgres/postgres.log" -w -t 60 start \
      -o "-c listen_addresses=$HOST -p $PG_PORT -c unix_socket_directories='' -c max_connections=400 -c fsync=on \
          -c shared_buffers=1GB -c max_wal_size=8GB -c checkpoint_timeout=15min -c jit=off" >/dev/null
  fi
  wait_port PostgreSQL "$PG_PORT" 30
  if ! psql -h $HOST -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$PG_DB'" | grep -q 1; then
    psql -h $HOST -p "$PG_PORT" -U "$PG_USER" -d postgres -qc "CREATE DATABASE $PG_DB" >/dev/null
  fi
}

stop_postgres() {
  local bindir data="$STACK/postgres/data"
  bindir="$(pg_bindir)"
  if [ -n "$bindir" ] && [ -f "$data/postmaster.pid" ]; then
    log "stopping PostgreSQL (pid $(head -n1 "$data/postmaster.pid"))"
    pg_run "$bindir/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
  fi
}

# ---------------------------------------------------------------- Redis
start_redis() {
  mkdir -p "$STACK/redis"
  if pid_alive "$STACK/redis/redis.pid"; then log "Redis already running"; return; fi
  log "starting Redis on $HOST:$REDIS_PORT (AOF, fsync every second)"
  redis-server --bind $HOST "${REDIS_REACH[@]}" --port "$REDIS_PORT" --dir "$STACK/redis" \
    --appendonly yes --appendfsync everysec --save '' --maxmemory-policy noeviction \
    --daemonize yes --pidfile "$STACK/redis/redis.pid" --logfile "$STACK/redis/redis.log"
  wait_port Redis "$REDIS_PORT" 30
}

# ---------------------------------------------------------------- Kafka
kafka_jars() { # pom-folder target-folder
  local libs="$2"
  if [ ! -f "$libs/.complete" ] || [ "$ROOT/scripts/$1/pom.xml" -nt "$libs/.complete" ]; then
    log "resolving jars of scripts/$1/pom.xml with Maven"
    rm -rf "$libs" && mkdir -p "$libs"
    # Maven's own colour codes are stripped: some versions print them even in batch mode.
    mvn -q -B -Dstyle.color=never -f "$ROOT/scripts/$1/pom.xml" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$libs" 2>&1 | sed -u 's/\x1b\[[0-9;]*m//g; s/\[0m//g' >&2
    touch "$libs/.complete"
  fi
  echo "$libs"
}

wait_log() { # name logfile pattern pidfile seconds
  local deadline=$((SECONDS + $5))
  until grep -q "$3" "$2" 2>/dev/null; do
    pid_alive "$4" || die "$1 exited (see $2)"
    [ $SECONDS -lt "$deadline" ] || die "$1 did not report started within $5 s (see $2)"
    sleep 0.2
  done
}

start_kafka() {
  local dir="$STACK/kafka" libs
  mkdir -p "$dir"
  if pid_alive "$dir/kafka.pid"; then log "Kafka already running"; return; fi
  libs="$(kafka_jars kafka "$dir/libs")"
  sed -e "s|@KAFKA_PORT@|$KAFKA_PORT|g" -e "s|@CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" \
    -e "s|@LOG_DIRS@|$dir/data|g" -e "s|127\.0\.0\.1|$HOST|g" \
    "$ROOT/scripts/kafka/kraft-single.properties" > "$dir/server.properties"
  local java=(java -Xms256m -Xmx768m -XX:+UseG1GC -Dlog4j2.configurationFile="$ROOT/scripts/kafka/log4j2.properties" -cp "$libs/*")
  if [ ! -f "$dir/data/meta.properties" ]; then
    log "formatting Kafka storage (KRaft)"
    local cluster_id
    cluster_id="$("${java[@]}" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1)"
    "${java[@]}" kafka.tools.StorageTool format -t "$cluster_id" -c "$dir/server.properties" >"$dir/format.log" 2>&1 \
      || die "cannot format Kafka storage (see $dir/format.log)"
  fi
  log "starting Kafka (KRaft) on $HOST:$KAFKA_PORT"
  nohup "${java[@]}" kafka.Kafka "$dir/server.properties" >"$dir/broker.log" 2>&1 </dev/null &
  echo $! > "$dir/kafka.pid"
  wait_port Kafka "$KAFKA_PORT" 90
  wait_log Kafka "$dir/broker.log" "Kafka Server started" "$dir/kafka.pid" 90
}

# ZooKeeper mode: Kafka 3.9 (the last line with ZooKeeper) and a ZooKeeper server, for the
# compose file's `zookeeper` profile run natively.
start_zookeeper_mode() {
  local dir="$STACK/kafka-zookeeper" libs
  mkdir -p "$dir"
  libs="$(kafka_jars kafka-zookeeper "$dir/libs")"
  local java=(java -Xms128m -Xmx512m -Dlog4j.configuration="file:$ROOT/scripts/kafka-zookeeper/log4j.properties" -cp "$libs/*")
  if pid_alive "$dir/zookeeper.pid"; then log "ZooKeeper already running"; else
    cat > "$dir/zoo.cfg" <<EOF
dataDir=$dir/zookeeper-data
clientPort=$ZK_PORT
clientPortAddress=$HOST
tickTime=2000
admin.enableServer=false
4lw.commands.whitelist=ruok,srvr
EOF
    log "starting ZooKeeper on $HOST:$ZK_PORT"
    nohup "${java[@]}" org.apache.zookeeper.server.ZooKeeperServerMain "$dir/zoo.cfg" >"$dir/zookeeper.log" 2>&1 </dev/null &
    echo $! > "$dir/zookeeper.pid"
    wait_port ZooKeeper "$ZK_PORT" 60
  fi
  if pid_alive "$dir/kafka.pid"; then log "Kafka (ZooKeeper mode) already running"; return; fi
  cat > "$dir/server.properties" <<EOF
broker.id=1
zookeeper.connect=$HOST:$ZK_PORT
listeners=PLAINTEXT://$HOST:$ZK_KAFKA_PORT
advertised.listeners=PLAINTEXT://$HOST:$ZK_KAFKA_PORT
log.dirs=$dir/data
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
EOF
  log "starting Kafka 3.9 (ZooKeeper mode) on $HOST:$ZK_KAFKA_PORT"
  nohup "${java[@]}" kafka.Kafka "$dir/server.properties" >"$dir/broker.log" 2>&1 </dev/null &
  echo $! > "$dir/kafka.pid"
  wait_port "Kafka (ZooKeeper mode)" "$ZK_KAFKA_PORT" 90
  wait_log "Kafka (ZooKeeper mode)" "$dir/broker.log" "\\[KafkaServer id=1\\] started" "$dir/kafka.pid" 90
}

# ---------------------------------------------------------------- three-broker cluster
CLUSTER_NODES=(1 2 3)
cluster_port() { echo $((CLUSTER_PORT + $1)); }
cluster_controller_port() { echo $((CLUSTER_CONTROLLER_PORT + $1)); }
cluster_brokers() {
  local n list=()
  for n in "${CLUSTER_NODES[@]}"; do list+=("$HOST:$(cluster_port "$n")"); done
  (IFS=,; echo "${list[*]}")
}

cluster_node_start() { # node
  local n=$1 dir="$STACK/kafka-cluster/$1" libs voters="" m
  mkdir -p "$dir"
  if pid_alive "$dir/kafka.pid"; then log "cluster node $n already running"; return; fi
  libs="$(kafka_jars kafka "$STACK/kafka/libs")"
  for m in "${CLUSTER_NODES[@]}"; do voters+="${voters:+,}$m@$HOST:$(cluster_controller_port "$m")"; done
  cat > "$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=$n
controller.quorum.voters=$voters
listeners=PLAINTEXT://$HOST:$(cluster_port "$n"),CONTROLLER://$HOST:$(cluster_controller_port "$n")
advertised.listeners=PLAINTEXT://$HOST:$(cluster_port "$n")
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
num.partitions=4
default.replication.factor=3
min.insync.replicas=2
offsets.topic.replication.factor=3
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
EOF
  local java=(java -Xms128m -Xmx384m -XX:+UseG1GC -Dlog4j2.configurationFile="$ROOT/scripts/kafka/log4j2.properties" -cp "$libs/*")
  if [ ! -f "$dir/data/meta.properties" ]; then
    [ -s "$STACK/kafka-cluster/cluster-id" ] || "${java[@]}" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1 > "$STACK/kafka-cluster/cluster-id"
    "${java[@]}" kafka.tools.StorageTool format -t "$(cat "$STACK/kafka-cluster/cluster-id")" -c "$dir/server.properties" >"$dir/format.log" 2>&1 \
      || die "cannot format cluster node $n (see $dir/format.log)"
  fi
  log "starting Kafka cluster node $n on $HOST:$(cluster_port "$n")"
  : > "$dir/broker.log"
  nohup "${java[@]}" kafka.Kafka "$dir/server.properties" >"$dir/broker.log" 2>&1 </dev/null &
  echo $! > "$dir/kafka.pid"
}

cluster_node_wait() { # node
  local dir="$STACK/kafka-cluster/$1"
  wait_port "Kafka cluster node $1" "$(cluster_port "$1")" 120
  wait_log "Kafka cluster node $1" "$dir/broker.log" "Kafka Server started" "$dir/kafka.pid" 120
}

cluster() { # action [node]
  local n
  case $1 in
    up)
      ensure_installed
      mkdir -p "$STACK/kafka-cluster"
      # All three first: the controllers need a quorum before any broker reports started.
      for n in "${CLUSTER_NODES[@]}"; do cluster_node_start "$n"; done
      for n in "${CLUSTER_NODES[@]}"; do cluster_node_wait "$n"; done
      cluster_brokers
      ;;
    down) for n in "${CLUSTER_NODES[@]}"; do stop_pidfile "Kafka cluster node $n" "$STACK/kafka-cluster/$n/kafka.pid"; done ;;
    kill9) kill9_pidfile "Kafka cluster node $2" "$STACK/kafka-cluster/$2/kafka.pid" ;;
    start) cluster_node_start "$2"; cluster_node_wait "$2" ;;
    brokers) cluster_brokers ;;
    *) die "usage: $0 cluster up|down|brokers|kill9 N|start N" ;;
  esac
}

# ---------------------------------------------------------------- Redis Cluster
REDIS_CLUSTER_NODES=(1 2 3 4 5 6)
redis_cluster_port() { echo $((REDIS_CLUSTER_PORT + $1)); }
redis_cluster_url() {
  local n list=()
  for n in "${REDIS_CLUSTER_NODES[@]}"; do list+=("$HOST:$(redis_cluster_port "$n")"); done
  (IFS=,; echo "redis+cluster://${list[*]}")
}

redis_cluster_node_start() { # node
  local n=$1 dir="$STACK/redis-cluster/$1"
  mkdir -p "$dir"
  if pid_alive "$dir/redis.pid"; then log "Redis Cluster node $n already running"; return; fi
  log "starting Redis Cluster node $n on $HOST:$(redis_cluster_port "$n")"
  # The same durability as the single Redis (AOF, fsync every second); a node is failed over
  # after 2 s without an answer, so the failover tests take seconds, not the default 15. A master
  # whose slots all moved away stays a master (no replica migration): the cluster keeps its three
  # masters, which a failover needs the majority of, and slots can move back to it.
  redis-server --bind $HOST "${REDIS_REACH[@]}" --port "$(redis_cluster_port "$n")" --dir "$dir" \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
    --cluster-allow-replica-migration no \
    --appendonly yes --appendfsync everysec --save '' --maxmemory-policy noeviction \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
  wait_port "Redis Cluster node $n" "$(redis_cluster_port "$n")" 30
  # A node back with its data answers LOADING until its AOF is read: not ready for the checks below.
  local deadline=$((SECONDS + 60))
  until [ "$(redis-cli -h "$HOST" -p "$(redis_cluster_port "$n")" PING 2>/dev/null)" = PONG ]; do
    [ $SECONDS -lt "$deadline" ] || die "Redis Cluster node $n not answering PING within 60 s (see $dir/redis.log)"
    sleep 0.2
  done
}

# Every slot served and every node agreeing (redis-cli --cluster check), within `seconds`.
redis_cluster_wait_ok() { # seconds
  local deadline=$((SECONDS + $1))
  until redis-cli -p "$(redis_cluster_port 1)" --cluster check "$HOST:$(redis_cluster_port 1)" >/dev/null 2>&1 \
      && [ "$(redis-cli -p "$(redis_cluster_port 1)" CLUSTER INFO | tr -d '\r' | sed -n 's/^cluster_state://p')" = ok ]; do
    [ $SECONDS -lt "$deadline" ] || die "the Redis Cluster is not ok within $1 s (see $STACK/redis-cluster/*/redis.log)"
    sleep 0.2
  done
}

redis_cluster() { # action [node]
  local n hosts=()
  case $1 in
    up)
      ensure_installed
      for n in "${REDIS_CLUSTER_NODES[@]}"; do redis_cluster_node_start "$n"; done
      if [ "$(redis-cli -p "$(redis_cluster_port 1)" CLUSTER INFO | tr -d '\r' | sed -n 's/^cluster_known_nodes://p')" != 6 ]; then
        for n in "${REDIS_CLUSTER_NODES[@]}"; do hosts+=("$HOST:$(redis_cluster_port "$n")"); done
        log "creating the Redis Cluster (three masters, one replica each)"
        redis-cli --cluster create "${hosts[@]}" --cluster-replicas 1 --cluster-yes >"$STACK/redis-cluster/create.log" 2>&1 \
          || die "redis-cli --cluster create failed (see $STACK/redis-cluster/create.log)"
      fi
      redis_cluster_wait_ok 60
      redis_cluster_url
      ;;
    down) for n in "${REDIS_CLUSTER_NODES[@]}"; do stop_pidfile "Redis Cluster node $n" "$STACK/redis-cluster/$n/redis.pid"; done ;;
    kill9) kill9_pidfile "Redis Cluster node $2" "$STACK/redis-cluster/$2/redis.pid" ;;
    start) redis_cluster_node_start "$2" ;;
    url) redis_cluster_url ;;
    *) die "usage: $0 redis-cluster up|down|url|kill9 N|start N" ;;
  esac
}

# ---------------------------------------------------------------- the replicas stack
REPLICA_WEBSOCKETS=(1 2)
REPLICA_GRPC=(1 2 3)
# Replica N listens on these + N: all below Linux's ephemeral ports (32768-60999), where a client's
# source port took 50052 once while the brokers started.
REPLICA_WS_PORT="${STACK_REPLICA_WS_PORT:-8180}"
REPLICA_GRPC_PORT="${STACK_REPLICA_GRPC_PORT:-15050}"
REPLICA_METRICS_PORT="${STACK_REPLICA_METRICS_PORT:-9560}"
REPLICA_DB=wallet_replicas
# What every replica runs with, past print_env's: the three brokers (replication 3, min.insync 2),
# the Redis Cluster, and a database, topic, stream, consumer group and key prefix of their own, so
# the single-node services (if running) are untouched, and so are the totals of another stream on
# the same Redis Cluster (the compose wiring's: a user's total sums every stream under a prefix).
replica_env() {
  echo "DATABASE_URL=postgres://$PG_USER@$HOST:$PG_PORT/$REPLICA_DB KAFKA_BROKERS=$(cluster_brokers)"
  echo "KAFKA_TOPIC=user_purchase_replicas KAFKA_TOPIC_REPLICATION_FACTOR=3 KAFKA_TOPIC_MIN_INSYNC_REPLICAS=2"
  echo "KAFKA_GROUP_ID=grpc_kafka_replicas STREAM_ID=7a1e7000-0000-4000-8000-000000000002 REDIS_URL=$(redis_cluster_url)"
  echo "REDIS_KEY_PREFIX=wallet_replicas:"
}

# Waits until `binary healthcheck` passes with the replica's environment.
replica_wait() { # name binary extra-env...
  local name=$1 bin="$ROOT/target/release/$2" deadline=$((SECONDS + 60)); shift 2
  # shellcheck disable=SC2046
  until env $(print_env | sed 's/^export //') $(replica_env) "$@" "$bin" healthcheck >/dev/null 2>&1; do
    pid_alive "$STACK/$name/$name.pid" || die "$name exited (see $STACK/$name/$name.log)"
    [ $SECONDS -lt $deadline ] || die "$name not ready within 60 s (see $STACK/$name/$name.log)"
    sleep 0.2
  done
}

replica_endpoints() {
  local n
  for n in "${REPLICA_WEBSOCKETS[@]}"; do echo "ws://$HOST:$((REPLICA_WS_PORT + n))/ws"; done
  for n in "${REPLICA_GRPC[@]}"; do echo "http://$HOST:$((REPLICA_GRPC_PORT + n))"; done
}

replicas() { # action
  local n
  case $1 in
    up)
      deps
      cluster up >/dev/null
      redis_cluster up >/dev/null
      if ! psql -h "$HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$REPLICA_DB'" | grep -q 1; then
        psql -h "$HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -qc "CREATE DATABASE $REPLICA_DB" >/dev/null
      fi
      build_services
      for n in "${REPLICA_WEBSOCKETS[@]}"; do
        # shellcheck disable=SC2046
        start_service "websocket-$n" websocket $(replica_env) WEBSOCKET_ADDR="$HOST:$((REPLICA_WS_PORT + n))"
      done
      for n in "${REPLICA_GRPC[@]}"; do
        # shellcheck disable=SC2046
        start_service "grpc_kafka-$n" grpc_kafka $(replica_env) GRPC_ADDR="$HOST:$((REPLICA_GRPC_PORT + n))" \
          METRICS_ADDR="$HOST:$((REPLICA_METRICS_PORT + n))"
      done
      for n in "${REPLICA_WEBSOCKETS[@]}"; do replica_wait "websocket-$n" websocket WEBSOCKET_ADDR="$HOST:$((REPLICA_WS_PORT + n))"; done
      for n in "${REPLICA_GRPC[@]}"; do replica_wait "grpc_kafka-$n" grpc_kafka GRPC_ADDR="$HOST:$((REPLICA_GRPC_PORT + n))"; done
      replica_endpoints
      ;;
    down)
      for n in "${REPLICA_WEBSOCKETS[@]}"; do stop_pidfile "websocket-$n" "$STACK/websocket-$n/websocket-$n.pid"; done
      for n in "${REPLICA_GRPC[@]}"; do stop_pidfile "grpc_kafka-$n" "$STACK/grpc_kafka-$n/grpc_kafka-$n.pid"; done
      # The Redis Cluster stays up: the test stack keeps it for its tests (down stops it).
      cluster down
      ;;
    endpoints) replica_endpoints ;;
    *) die "usage: $0 replicas up|down|endpoints" ;;
  esac
}

# ---------------------------------------------------------------- services
build_services() {
  log "building the services (cargo build --release)"
  (cd "$ROOT" && cargo build --release --bins -q)
}

start_service() { # name binary extra-env...
  local name=$1 bin="$ROOT/target/release/$2"; shift 2
  mkdir -p "$STACK/$name"
  stop_pidfile "$name" "$STACK/$name/$name.pid"
  log "starting $name"
  # shellcheck disable=SC2046
  env $(print_env | sed 's/^export //') "$@" nohup "$bin" >"$STACK/$name/$name.log" 2>&1 </dev/null &
  echo $! > "$STACK/$name/$name.pid"
}

start_services() {
  build_services
  start_service websocket websocket
  start_service grpc_kafka grpc_kafka
  wait_port websocket "$WS_PORT" 60
  wait_port grpc_kafka "$GRPC_PORT" 60
  local deadline=$((SECONDS + 60))
  # shellcheck disable=SC2046
  until env $(print_env | sed 's/^export //') "$ROOT/target/release/websocket" healthcheck >/dev/null 2>&1; do
    pid_alive "$STACK/websocket/websocket.pid" || die "websocket exited (see $STACK/websocket/websocket.log)"
    [ $SECONDS -lt $deadline ] || die "websocket not ready within 60 s (see $STACK/websocket/websocket.log)"
    sleep 0.2
  done
}

demo() {
  local ctl="$ROOT/target/release/walletctl" ws="ws://$HOST:$WS_PORT/ws" grpc="http://$HOST:$GRPC_PORT"
  # walletctl mints each command's token with the stack's development key.
  export JWT_HS256_SECRET_FILE
  JWT_HS256_SECRET_FILE="$(dev_key)"
  # Users of their own per run, so the totals printed are exactly this run's purchases.
  local run alice bob
  run="demo-$(date +%s)"
  alice="$run-alice" bob="$run-bob"
  log "sending purchases over WebSocket"
  "$ctl" --ws-url "$ws" send --user-id "$alice" --amount 49.99
  "$ctl" --ws-url "$ws" send --user-id "$alice" --amount 0.01
  "$ctl" --ws-url "$ws" send --user-id "$bob" --amount "12.30"
  log "waiting for the totals over gRPC"
  "$ctl" --grpc-url "$grpc" total "$alice" --wait-count 2 --wait-secs 60
  "$ctl" --grpc-url "$grpc" total "$bob" --wait-count 1 --wait-secs 60
}

status() {
  local name pidfile
  for name in postgres redis kafka websocket grpc_kafka; do
    case $name in
      postgres) pidfile="$STACK/postgres/data/postmaster.pid" ;;
      redis) pidfile="$STACK/redis/redis.pid" ;;
      kafka) pidfile="$STACK/kafka/kafka.pid" ;;
      *) pidfile="$STACK/$name/$name.pid" ;;
    esac
    if pid_alive "$pidfile"; then echo "$name: running (pid $(head -n1 "$pidfile"))"; else echo "$name: stopped"; fi
  done
}

deps() {
  mkdir -p "$STACK"
  ensure_installed
  start_postgres
  start_redis
  start_kafka
  log "dependencies are up; environment: scripts/stack.sh env"
}

down() {
  replicas down
  stop_pidfile websocket "$STACK/websocket/websocket.pid"
  stop_pidfile grpc_kafka "$STACK/grpc_kafka/grpc_kafka.pid"
  stop_pidfile Kafka "$STACK/kafka/kafka.pid"
  stop_pidfile "Kafka (ZooKeeper mode)" "$STACK/kafka-zookeeper/kafka.pid"
  stop_pidfile ZooKeeper "$STACK/kafka-zookeeper/zookeeper.pid"
  cluster down
  redis_cluster down
  stop_pidfile Redis "$STACK/redis/redis.pid"
  stop_postgres
}

pidfile_of() {
  case $1 in
    postgres) echo "$STACK/postgres/data/postmaster.pid" ;;
    redis) echo "$STACK/redis/redis.pid" ;;
    kafka) echo "$STACK/kafka/kafka.pid" ;;
    *) die "unknown dependency $1 (postgres, redis or kafka)" ;;
  esac
}

one() { # action service
  local pidfile pid
  pidfile="$(pidfile_of "$2")"
  case $1 in
    kill9)
      pid_alive "$pidfile" || die "$2 is not running"
      pid=$(head -n1 "$pidfile")
      log "kill -9 $2 (pid $pid)"
      kill -KILL "$pid"
      while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
      # PostgreSQL's children outlive a killed postmaster until they notice; wait for the port.
      if [ "$2" = postgres ]; then
        local deadline=$((SECONDS + 30))
        while (exec 3<>"/dev/tcp/$HOST/$PG_PORT") 2>/dev/null; do
          [ $SECONDS -lt $deadline ] || die "PostgreSQL port still open after kill -9"; sleep 0.1
        done
      fi
      ;;
    stop)
      case $2 in
        postgres) log "stopping PostgreSQL (fast)"; pg_run "$(pg_bindir)/pg_ctl" -D "$STACK/postgres/data" -m fast -w stop >/dev/null ;;
        *) stop_pidfile "$2" "$pidfile" ;;
      esac
      ;;
    start)
      case $2 in
        postgres) start_postgres ;;
        redis) start_redis ;;
        kafka) start_kafka ;;
      esac
      ;;
  esac
}

case "${1:-}" in
  up) deps; start_services; demo; log "the system is up: scripts/stack.sh status; stop it with scripts/stack.sh down" ;;
  deps) deps ;;
  deps-zookeeper) ensure_installed; start_zookeeper_mode ;;
  cluster) [ $# -ge 2 ] || die "usage: $0 cluster up|down|brokers|kill9 N|start N"; cluster "$2" "${3:-}" ;;
  redis-cluster) [ $# -ge 2 ] || die "usage: $0 redis-cluster up|down|url|kill9 N|start N"; redis_cluster "$2" "${3:-}" ;;
  replicas) [ $# -eq 2 ] || die "usage: $0 replicas up|down|endpoints"; replicas "$2" ;;
  kill9|stop|start) [ $# -eq 2 ] || die "usage: $0 $1 postgres|redis|kafka"; one "$1" "$2" ;;
  services) start_services ;;
  stop-services) stop_pidfile websocket "$STACK/websocket/websocket.pid"; stop_pidfile grpc_kafka "$STACK/grpc_kafka/grpc_kafka.pid" ;;
  demo) demo ;;
  pg-bindir) ensure_installed; pg_bindir ;;
  kafka-libs) ensure_installed; mkdir -p "$STACK/kafka"; kafka_jars kafka "$STACK/kafka/libs" ;;
  status) status ;;
  down) down ;;
  env) print_env ;;
  *) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 2 ;;
esac
