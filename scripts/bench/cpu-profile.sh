#!/usr/bin/env bash
# Where the CPU goes while the pipeline runs flat out: CPU seconds used by each component of the
# stack (PostgreSQL with all its backends, Kafka, Redis, websocket, grpc_kafka, and the load
# generator as the rest of the machine) during one closed-loop walletctl bench, from /proc.
# Everything shares the same cores, so this is the profile that says which part to make cheaper.
#
#   scripts/bench/cpu-profile.sh [--replicas] [connections purchases-per-connection in-flight]
#
# --replicas: the same on the replicas stack (scripts/stack.sh replicas up: two websocket and three
# grpc_kafka processes, three brokers, six Redis Cluster nodes), the load split over both websockets
# by two walletctl processes at once; each component's figure is the sum over its processes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
STACK="${STACK_DIR:-$ROOT/.stack}"
REPLICAS=0
if [ "${1:-}" = --replicas ]; then REPLICAS=1; shift; fi
eval "$(scripts/stack.sh env)"
connections=${1:-100} purchases=${2:-3000} in_flight=${3:-16}
hz=$(getconf CLK_TCK)

ticks_of() { # pids... -> utime+stime of each, summed
  local pid total=0
  for pid in "$@"; do
    [ -r "/proc/$pid/stat" ] || continue
    # Fields after the command name (which may hold spaces): utime is 14, stime 15 overall.
    total=$((total + $(sed 's/^.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}')))
  done
  echo "$total"
}
pg_pids() {
  local master
  master=$(head -n1 "$STACK/postgres/data/postmaster.pid")
  echo "$master" $(ps -o pid= --ppid "$master")
}
machine_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
# The pid files of a component's processes.
pidfiles() {
  if [ $REPLICAS = 0 ]; then echo "$STACK/$1/$1.pid"; return; fi
  case $1 in
    kafka) ls "$STACK"/kafka-cluster/*/kafka.pid ;;
    redis) ls "$STACK"/redis-cluster/*/redis.pid ;;
    *) ls "$STACK/$1"-*/"$1"-*.pid ;;
  esac
}
pids_of() { local file; for file in $(pidfiles "$1"); do head -n1 "$file"; done; }
snapshot() {
  local name
  echo "postgres $(ticks_of $(pg_pids))"
  # shellcheck disable=SC2046
  for name in kafka redis websocket grpc_kafka; do echo "$name $(ticks_of $(pids_of "$name"))"; done
  echo "machine $(machine_ticks)"
}

bench=(bench --purchases "$purchases" --in-flight "$in_flight" --users 1000)
if [ $REPLICAS = 1 ]; then
  mapfile -t endpoints < <(scripts/stack.sh replicas up)
fi
before=$(snapshot)
started=$(date +%s%N)
if [ $REPLICAS = 0 ]; then
  target/release/walletctl --ws-url "ws://$WEBSOCKET_ADDR/ws" --grpc-url "http://$GRPC_ADDR" \
    "${bench[@]}" --connections "$connections" >&2
else
  loads=()
  for n in 1 2; do
    target/release/walletctl --ws-url "${endpoints[$((n - 1))]}" --grpc-url "${endpoints[$((n + 1))]}" \
      "${bench[@]}" --connections $((connections / 2)) >&2 &
    loads+=($!)
  done
  for pid in "${loads[@]}"; do wait "$pid"; done
fi
wall=$(awk -v a="$started" -v b="$(date +%s%N)" 'BEGIN {printf "%.3f", (b - a) / 1e9}')
after=$(snapshot)
total=$((connections * purchases))
echo "CPU by component during $total purchases in $wall s ($(nproc) cores):"
join <(echo "$before" | sort) <(echo "$after" | sort) | while read -r name b a; do
  awk -v n="$name" -v a="$a" -v b="$b" -v hz="$hz" 'BEGIN {printf "%s %.2f\n", n, (a - b) / hz}'
done | sort -k1,1 | awk -v total="$total" -v wall="$wall" -v cores="$(nproc)" '
  { cpu[$1] = $2 }
  END {
    others = cpu["machine"] - cpu["postgres"] - cpu["kafka"] - cpu["redis"] - cpu["websocket"] - cpu["grpc_kafka"]
    cpu["load generator and the rest"] = others
    n = split("postgres kafka redis websocket grpc_kafka", order, " ")
    order[n + 1] = "load generator and the rest"
    for (i = 1; i <= n + 1; i++) {
      name = order[i]
      printf "  %-28s %7.2f CPU s  %5.1f%% of the machine  %6.1f CPU ms per 1000 purchases\n", name, cpu[name], 100 * cpu[name] / (wall * cores), 1000000 * cpu[name] / total
    }
    printf "  %-28s %7.2f CPU s  %5.1f%% busy\n", "machine (all)", cpu["machine"], 100 * cpu["machine"] / (wall * cores)
  }'
