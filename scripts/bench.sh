#!/usr/bin/env bash
# Benchmarks: the machine's own ceilings and the project's figures, measured in the same run, in
# one table (figure, ceiling or goal, ratio), plus a latency-versus-offered-load plot and the
# backlog after the ack over time. The headline is the rate at which purchases become visible in
# gRPC (acked and counted), not the ack rate. Every figure of the project is the median of three
# runs with its range, the first run after start-up among them. Figures only: nothing here passes
# or fails on speed.
#
#   scripts/bench.sh            the full run (about 15 minutes), on the stack of scripts/stack.sh
#   scripts/bench.sh --smoke    every step, tiny and short (CI runs this to keep it working)
#   scripts/bench.sh --soak S   the full run, then a soak of S seconds at half the sustained
#                               maximum: ack-to-visible p99 minute by minute, RSS of both services
#                               at start and end, totals exact
#   scripts/bench.sh --cluster  instead of the full run: the same closed loop on one of each (the
#                               stack of scripts/stack.sh up) and on the replicas stack (scripts/stack.sh
#                               replicas up: two websocket and three grpc_kafka processes, three
#                               brokers with replication 3, a Redis Cluster), three runs each,
#                               figures in $STACK_DIR/bench-cluster/ (with --smoke: tiny)
#
# Ceilings: pgbench with the project's schema and insert shape (scripts/bench/*.sql); Kafka's own
# ProducerPerformance and ConsumerPerformance from the broker's jars; the project's Lua script
# under redis-benchmark. Project: walletctl bench (closed loop, open-loop sweep with
# ack-to-visible latency, GetTotalSpent read load, idle connections) and ghz (from the Go module
# proxy) as an independent gRPC client. Results: $STACK_DIR/bench/ (JSON, table.md, latency.svg).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SMOKE=0 SOAK=0 CLUSTER=0
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) SMOKE=1 ;;
    --cluster) CLUSTER=1 ;;
    --soak) SOAK="${2:?--soak needs seconds}"; shift ;;
    *) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 2 ;;
  esac
  shift
done
STACK="${STACK_DIR:-$ROOT/.stack}"
OUT="$STACK/bench"
log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }
pick() { if [ $SMOKE = 1 ]; then echo "$2"; else echo "$1"; fi; } # full smoke

# The figures are the pipeline's: the per-connection rate limit (WS_RATE_LIMIT_PER_SEC, 1,000 by
# default) would otherwise cap the open loop's 20 connections at 20,000 purchases/s.
export WS_RATE_LIMIT_PER_SEC=1000000 WS_RATE_LIMIT_BURST=1000000
scripts/stack.sh up >&2
eval "$(scripts/stack.sh env)"
ctl=(target/release/walletctl --ws-url "ws://$WEBSOCKET_ADDR/ws" --grpc-url "http://$GRPC_ADDR")
# Every figure of the project is the median of RUNS runs (minimum and maximum shown beside it),
# the first run right after start-up among them.
RUNS=3

if [ $CLUSTER = 1 ]; then
  OUT="$STACK/bench-cluster"
  rm -rf "$OUT" && mkdir -p "$OUT"
  trap 'scripts/stack.sh replicas down >&2 || true' EXIT
  mapfile -t endpoints < <(scripts/stack.sh replicas up)
  connections=$(pick 100 10) purchases=$(pick 3000 100)
  closed=(bench --mode closed --in-flight 16 --purchases "$purchases" --users 1000)
  for run in $(seq $RUNS); do
    log "cluster: one of each, closed loop ($connections connections x 16 in flight), run $run"
    "${ctl[@]}" "${closed[@]}" --connections "$connections" --json "$OUT/single-$run.json" >&2 \
      || die "closed-loop bench on one of each: totals not exact"
    log "cluster: the replicas, the same load split over both websockets at once, run $run"
    pids=()
    for n in 1 2; do
      target/release/walletctl --ws-url "${endpoints[$((n - 1))]}" --grpc-url "${endpoints[$((n + 1))]}" \
        "${closed[@]}" --connections $((connections / 2)) --json "$OUT/replicas-$run-$n.json" >&2 &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || die "closed-loop bench on the replicas: totals not exact"; done
  done
  python3 scripts/bench/cluster_report.py "$OUT"
  exit 0
fi

rm -rf "$OUT" && mkdir -p "$OUT"
libs="$STACK/kafka/libs"
java_tool() { java -Xmx512m -Dlog4j2.configurationFile="$ROOT/scripts/kafka/log4j2.properties" -cp "$libs/*" "$@"; }
cpus=$(nproc)
echo "{\"cpus\": $cpus, \"memory_kib\": $(awk '/MemTotal/ {print $2}' /proc/meminfo), \"smoke\": $SMOKE}" > "$OUT/machine.json"

# ------------------------------------------------------------------ ceilings
log "ceiling: PostgreSQL (pgbench, 100-row transactions, 4 clients)"
pg_admin="${DATABASE_URL%/*}/postgres"
pg_secs=$(pick 20 3)
psql "$pg_admin" -qc "DROP DATABASE IF EXISTS bench_ceiling" -qc "CREATE DATABASE bench_ceiling" >/dev/null
# The service's schema: every migration, and the stream's index the service builds after them.
for migration in migrations/V*.sql; do
  psql "${DATABASE_URL%/*}/bench_ceiling" -q -f "$migration" >/dev/null
done
psql "${DATABASE_URL%/*}/bench_ceiling" -qc "CREATE INDEX purchases_stream_order
  ON purchases ((COALESCE(txid, '1'::xid8)), purchase_id)" >/dev/null
pgbench_bin="$(ls -d /usr/lib/postgresql/*/bin/pgbench | sort -V | tail -n1)"
for shape in outbox only; do
  file="scripts/bench/pg_purchases_$shape.sql"
  tps=$("$pgbench_bin" -n -c 4 -j "$cpus" -T "$pg_secs" -f "$file" "${DATABASE_URL%/*}/bench_ceiling" 2>/dev/null \
        | awk '/^tps = / {print $3}')
  [ -n "$tps" ] || die "pgbench gave no figure"
  echo "{\"tps\": $tps, \"purchases_per_sec\": $(awk "BEGIN {print $tps * 100}")}" > "$OUT/ceiling-pg-$shape.json"
done
psql "$pg_admin" -qc "DROP DATABASE IF EXISTS bench_ceiling" >/dev/null

log "ceiling: fdatasync of one 8 kB write where PostgreSQL keeps its data (pg_test_fsync)"
fsync_us=$("${pgbench_bin%/*}/pg_test_fsync" -s "$(pick 2 1)" -f "$STACK/postgres/fsync.test" 2>/dev/null \
  | awk '/fdatasync/ && /usecs\/op/ {print $(NF-1); exit}')
rm -f "$STACK/postgres/fsync.test"
[ -n "$fsync_us" ] || die "pg_test_fsync gave no figure"
echo "{\"fdatasync_usecs\": $fsync_us}" > "$OUT/ceiling-fsync.json"

log "ceiling: Kafka (ProducerPerformance acks=all, ConsumerPerformance; 180-byte records, 4 partitions)"
records=$(pick 2000000 20000)
ceiling_topic="bench-ceiling-$(date +%s)"
java_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BROKERS" --create \
  --topic "$ceiling_topic" --partitions 4 --replication-factor 1 >/dev/null 2>&1
produced=$(java_tool org.apache.kafka.tools.ProducerPerformance --topic "$ceiling_topic" \
  --num-records "$records" --record-size 180 --throughput -1 \
  --producer-props "bootstrap.servers=$KAFKA_BROKERS" acks=all linger.ms=5 2>/dev/null | tail -n1)
produce_rate=$(echo "$produced" | sed -n 's/.* \([0-9.]*\) records\/sec.*/\1/p')
[ -n "$produce_rate" ] || die "ProducerPerformance gave no figure: $produced"
consumed=$(java_tool org.apache.kafka.tools.ConsumerPerformance --bootstrap-server "$KAFKA_BROKERS" \
  --topic "$ceiling_topic" --messages "$records" --timeout 60000 2>/dev/null | tail -n1)
consume_rate=$(echo "$consumed" | awk -F', *' '{print $6}')
[ -n "$consume_rate" ] || die "ConsumerPerformance gave no figure: $consumed"
java_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BROKERS" --delete --topic "$ceiling_topic" >/dev/null 2>&1 || true
echo "{\"produce_per_sec\": $produce_rate, \"consume_per_sec\": $consume_rate}" > "$OUT/ceiling-kafka.json"

log "ceiling: Redis (the project's counting script, one record per call, redis-benchmark, 50 clients, pipeline 16)"
redis_port="${REDIS_URL##*:}"; redis_port="${redis_port%%/*}"
sha=$(redis-cli -p "$redis_port" SCRIPT LOAD "$(cat crates/grpc_kafka/src/apply_sequenced.lua)")
calls=$(pick 1000000 20000)
redis_rate=$(redis-benchmark -p "$redis_port" --dbnum 15 -n "$calls" -c 50 -P 16 -r 100000000 -q \
  EVALSHA "$sha" 2 "bench:marks:{__rand_int__}" "bench:total:{__rand_int__}" 0 0 100 2>/dev/null \
  | tr '\r' '\n' | awk '/requests per second/ {for (i = 1; i <= NF; i++) if ($(i+1) == "requests") print $i}' | tail -n1)
[ -n "$redis_rate" ] || die "redis-benchmark gave no figure"
redis-cli -p "$redis_port" -n 15 FLUSHDB ASYNC >/dev/null
echo "{\"events_per_sec\": $redis_rate}" > "$OUT/ceiling-redis.json"

# ------------------------------------------------------------------ the project
# PostgreSQL's row writes per table (inserts, updates, deletes), from its statistics.
pg_writes() {
  psql "$DATABASE_URL" -Atc "SELECT COALESCE(json_object_agg(relname, json_build_array(n_tup_ins, n_tup_upd, n_tup_del)), '{}')
    FROM pg_stat_user_tables WHERE relname IN ('purchases', 'purchase_outbox', 'relay_rounds')"
}
# The backlog after the ack over time, sampled every half second while a run goes on: purchases
# committed but not yet relayed (websocket_stream_backlog_rows), records in Kafka not yet counted
# (the sum of grpc_kafka_consumer_lag_records), records counted so far, and the resident memory
# of both services.
rss() { awk '/VmRSS/ {print $2}' "/proc/$(head -n1 "$STACK/$1/$1.pid")/status"; }
sample_backlog() { # csv-file; runs until killed
  local began; began=$(date +%s.%N)
  echo "secs,relay_backlog,consumer_lag,applied,websocket_rss_kib,grpc_kafka_rss_kib" > "$1"
  while :; do
    local ws grpc
    ws=$(curl -s --max-time 1 "http://$WEBSOCKET_ADDR/metrics" || true)
    grpc=$(curl -s --max-time 1 "http://$METRICS_ADDR/metrics" || true)
    awk -v t="$(date +%s.%N)" -v began="$began" -v ws="$ws" -v grpc="$grpc" \
      -v ws_rss="$(rss websocket)" -v grpc_rss="$(rss grpc_kafka)" 'BEGIN {
      n = split(ws, lines, "\n"); backlog = ""
      for (i = 1; i <= n; i++) if (lines[i] ~ /^websocket_stream_backlog_rows /) { split(lines[i], f, " "); backlog = f[2] }
      n = split(grpc, lines, "\n"); lag = 0; applied = ""
      for (i = 1; i <= n; i++) {
        if (lines[i] ~ /^grpc_kafka_consumer_lag_records/) { split(lines[i], f, " "); lag += f[2] }
        if (lines[i] ~ /^grpc_kafka_events_applied_total /) { split(lines[i], f, " "); applied = f[2] }
      }
      printf "%.2f,%s,%d,%s,%s,%s\n", t - began, backlog, lag, applied, ws_rss, grpc_rss }' >> "$1"
    sleep 0.5
  done
}
with_backlog() { # csv-file command...: the command, sampled
  local csv=$1; shift
  sample_backlog "$csv" & local sampler=$!
  local status=0
  "$@" || status=$?
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true
  return $status
}

log "project: sustained, closed loop (100 connections x 16 in flight), $RUNS runs"
writes_before=$(pg_writes)
for run in $(seq $RUNS); do
  with_backlog "$OUT/backlog-closed-$run.csv" "${ctl[@]}" bench --mode closed --connections "$(pick 100 10)" \
    --in-flight 16 --purchases "$(pick 3000 100)" --users 1000 --json "$OUT/closed-$run.json" >&2 \
    || die "closed-loop bench: totals not exact"
done
# The statistics reach the view within a second or so of the commits: read them until every
# acked purchase's insert shows (or 15 s), then count the writes per purchase.
acked=$(python3 -c 'import json, sys; print(sum(json.load(open(f))["acked"] for f in sys.argv[1:]))' "$OUT"/closed-*.json)
for _ in $(seq 30); do
  writes_after=$(pg_writes)
  python3 -c 'import json, sys; b, a = (json.loads(x).get("purchases", [0]) for x in sys.argv[1:3])
sys.exit(0 if a[0] - b[0] >= int(sys.argv[3]) else 1)' "$writes_before" "$writes_after" "$acked" && break
  sleep 0.5
done
echo "{\"purchases\": $acked, \"before\": $writes_before, \"after\": $writes_after}" > "$OUT/pg-writes.json"

log "project: open-loop sweep (latency versus offered load, ack-to-visible sampled), $RUNS runs per rate"
rates=$(pick "1000 2500 5000 10000 15000 20000 25000 30000" "500 1000")
secs=$(pick 15 3)
for run in $(seq $RUNS); do
  for rate in $rates; do
    "${ctl[@]}" bench --mode open --rate "$rate" --duration-secs "$secs" --connections 20 --users 1000 \
      --json "$OUT/open-$rate-$run.json" >&2 || log "open loop at $rate/s: not every purchase acked and counted (see figures)"
  done
done

log "project: GetTotalSpent (walletctl, 50 concurrent over 4 connections; ghz, 1 and 50 concurrent), $RUNS runs"
GHZ="$(go env GOPATH)/bin/ghz"
if [ ! -x "$GHZ" ]; then
  log "installing ghz from the Go module proxy"
  go install github.com/bojand/ghz/cmd/ghz@v0.93.0 >&2
fi
# Calls carry a token for the user they read, as every client's do (AUTH_MODE=jwt).
reader_token="$("${ctl[@]}" token --user-id bench-reader)"
ghz_args=(--insecure --proto proto/wallet/v1/wallet.proto --import-paths proto
  --call wallet.v1.WalletService/GetTotalSpent -d '{"user_id":"bench-reader"}' -O json
  --metadata "{\"authorization\":\"Bearer $reader_token\"}")
for run in $(seq $RUNS); do
  "${ctl[@]}" bench --mode read --concurrency 50 --grpc-connections 4 --duration-secs "$(pick 10 2)" \
    --json "$OUT/read-$run.json" >&2
  "$GHZ" "${ghz_args[@]}" -c 1 -z "$(pick 10s 2s)" "$GRPC_ADDR" > "$OUT/ghz-1-$run.json"
  "$GHZ" "${ghz_args[@]}" -c 50 --connections 4 -z "$(pick 10s 2s)" "$GRPC_ADDR" > "$OUT/ghz-50-$run.json"
  # Figures of refused calls would mean nothing: every call must be OK, except the few in flight
  # when ghz ends its run (it closes the connections under them: Unavailable or Canceled).
  for concurrency in 1 50; do
    python3 - "$OUT/ghz-$concurrency-$run.json" "$concurrency" <<'PY' || die "ghz calls failed (see $OUT/ghz-$concurrency-$run.json)"
import json, sys
codes = json.load(open(sys.argv[1])).get("statusCodeDistribution", {})
cut_short = sum(n for code, n in codes.items() if code in ("Unavailable", "Canceled"))
others = {code: n for code, n in codes.items() if code not in ("OK", "Unavailable", "Canceled")}
if not codes.get("OK") or others or cut_short > int(sys.argv[2]):
    sys.exit(f"{sys.argv[1]}: {codes}")
PY
  done
done

log "project: idle WebSocket connections (server memory per connection)"
"${ctl[@]}" bench --mode idle --connections "$(pick 5000 200)" --pid "$(head -n1 "$STACK/websocket/websocket.pid")" \
  --json "$OUT/idle.json" >&2

if [ "$SOAK" -gt 0 ]; then
  rate=$(python3 -c 'import json, statistics, sys
print(int(statistics.median(json.load(open(f))["sustained_counted_per_sec"] for f in sys.argv[1:]) / 2))' "$OUT"/closed-*.json)
  log "soak: $SOAK s at $rate purchases/s (half the sustained maximum)"
  start_ws=$(rss websocket) start_grpc=$(rss grpc_kafka)
  with_backlog "$OUT/backlog-soak.csv" "${ctl[@]}" bench --mode open --rate "$rate" --duration-secs "$SOAK" \
    --connections 20 --users 1000 --visible-samples 20 --json "$OUT/soak-load.json" >&2 \
    || log "soak: not every purchase acked and counted"
  echo "{\"secs\": $SOAK, \"rate\": $rate, \"websocket_rss_kib\": [$start_ws, $(rss websocket)], \"grpc_kafka_rss_kib\": [$start_grpc, $(rss grpc_kafka)]}" > "$OUT/soak.json"
fi

python3 scripts/bench/report.py "$OUT"
