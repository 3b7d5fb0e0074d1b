#!/usr/bin/env bash
# Runs every check and test of the project on this machine: the one test command of the README,
# and what CI runs.
#
#   scripts/test.sh          everything below, then stops the test stack it started
#   scripts/test.sh deps     only start the test stack (to run `cargo test` by hand)
#   scripts/test.sh env      print the test stack's environment: eval "$(scripts/test.sh env)"
#   scripts/test.sh down     stop the test stack
#
# The tests run against a stack of their own: PostgreSQL, Redis (one, and a Redis Cluster of three
# masters and three replicas) and Kafka under .stack-test/ on
# ports of their own (below), started and stopped here. A system started with `scripts/stack.sh up`
# (.stack/, the default ports) is never touched, even by the fault suite that kills and wipes.
#
#   1. installs what is missing and starts the test stack (scripts/stack.sh deps with STACK_DIR);
#   2. formatting and lints (cargo fmt --check, cargo clippy -D warnings);
#   3. the flake's source, exactly the files crane gets, compiled in a folder of its own as the
#      Nix checks do (scripts/nix-checks.sh source: release, all targets; its binaries are the
#      ones every later step runs);
#   4. the Nix and compose static checks (scripts/static-checks.sh) and the flake's dependency
#      audit against its pinned advisory-db (scripts/nix-checks.sh audit);
#   5. the docker-compose wiring run natively, in KRaft, ZooKeeper and cluster mode
#      (scripts/compose-wiring.sh);
#   6. the flake's e2e check natively (scripts/nix-checks.sh e2e: every unit, integration and
#      end-to-end test, in the copied source, against nix/e2e-services.sh), the tidy checks of
#      the hand-kept documents against the code (tests/tidy), a smoke run of the
#      benchmarks (scripts/bench.sh --smoke, and --smoke --cluster on the replicas stack of two
#      websocket and three grpc_kafka processes), the console page in a real browser
#      (scripts/browser-test.sh), then the fault-injection suite, which prints one line of figures
#      per scenario (each on the Redis and on the Redis Cluster, and the network partitions
#      between hosts of their own: network namespaces, so it runs as root); closing with one
#      summary line.
#
# Tests need the real services: if they cannot be reached, the tests fail, they never skip.
#
# Nothing the user exported for a deployment of their own changes what this command does: every
# variable a binary reads (each `env = "..."` of their settings, with its *_FILE form: DATABASE_URL,
# KAFKA_BROKERS, REDIS_URL, JWT_*, the *_ADDR, walletctl's WALLET_TOKEN and URLs, all that
# `scripts/stack.sh env` prints), STACK_*, TEST_DATABASE_URL, WALLET_BIN_DIR, OTEL_* and RUST_LOG
# are unset first. .ci/run proves it: it runs this command with the user system's environment and
# a valid token for it exported.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
for name in $(grep -rhoE 'env = "[A-Z][A-Z0-9_]*"' crates/*/src | sed 's/.*"\(.*\)"/\1/' | sort -u) \
  $(compgen -e | grep -E '^(STACK_|OTEL_)|^(TEST_DATABASE_URL|WALLET_BIN_DIR|RUST_LOG)$' || true); do
  unset "$name" "${name}_FILE"
done

# The test stack: its own folder and ports (scripts/stack.sh and the scripts it runs read these).
export STACK_DIR="$ROOT/.stack-test"
# Every port below 32768, outside Linux's ephemeral range (32768-60999): the fault suite kills and
# restarts these servers, and while one is down a client reconnecting to its port may be given
# that very port as its own source port (a TCP self-connect), which then holds it: the restart
# failed with "Address already in use" (Kafka cluster node 2, once in CI).
export STACK_PG_PORT=25532 STACK_REDIS_PORT=26479
export STACK_KAFKA_PORT=29592 STACK_KAFKA_CONTROLLER_PORT=29593
export STACK_ZK_PORT=22281 STACK_ZK_KAFKA_PORT=29692
export STACK_CLUSTER_PORT=29790 STACK_CLUSTER_CONTROLLER_PORT=29890
# The Redis Cluster's nodes on 21001-21006, their cluster buses 10000 above (31001-31006).
export STACK_REDIS_CLUSTER_PORT=21000
export STACK_WS_PORT=18180 STACK_GRPC_PORT=20151 STACK_METRICS_PORT=19464
export STACK_WIRING_WS_PORT=18181 STACK_WIRING_GRPC_PORT=20152 STACK_WIRING_METRICS_PORT=19465
# The replicas stack (scripts/stack.sh replicas, the benchmark's cluster mode): replica N on these + N.
export STACK_REPLICA_WS_PORT=18280 STACK_REPLICA_GRPC_PORT=20250 STACK_REPLICA_METRICS_PORT=19560

test_env() {
  scripts/stack.sh env | grep -v -e WEBSOCKET_ADDR -e GRPC_ADDR -e METRICS_ADDR -e CONSOLE_TOTALS_URL -e GRPC_WEB_ALLOWED_ORIGINS
  local database_url
  database_url="$(scripts/stack.sh env | sed -n 's/^export DATABASE_URL=//p')"
  echo "export TEST_DATABASE_URL=${database_url%/*}/postgres"
  echo "export REDIS_CLUSTER_URL=$(scripts/stack.sh redis-cluster url)"
  env | grep '^STACK_' | sed 's/^/export /'
}

case "${1:-}" in
  deps) scripts/stack.sh deps; scripts/stack.sh redis-cluster up >/dev/null; test_env; exit 0 ;;
  env) test_env; exit 0 ;;
  down) scripts/stack.sh down; exit 0 ;;
  "") ;;
  *) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 2 ;;
esac

step() { printf '\n==> %s\n' "$*"; }
trap 'step "stopping the test stack"; scripts/stack.sh down || true' EXIT

step "test stack (PostgreSQL, Redis, a Redis Cluster, Kafka under .stack-test/)"
scripts/stack.sh deps
scripts/stack.sh redis-cluster up >/dev/null
eval "$(test_env)"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "the flake's source: copied as crane gets it and compiled there (release, all targets)"
scripts/nix-checks.sh source

step "Nix and compose static checks"
scripts/static-checks.sh

step "the flake's audit: cargo-audit against the advisory-db revision flake.lock pins"
scripts/nix-checks.sh audit

step "compose wiring, natively: KRaft (default profile)"
scripts/compose-wiring.sh kraft

step "compose wiring, natively: ZooKeeper profile (Kafka 3.9)"
scripts/compose-wiring.sh zookeeper

step "compose wiring, natively: cluster profile (three brokers, a Redis Cluster, 2 + 3 replicas)"
scripts/compose-wiring.sh cluster

step "the flake's e2e check, natively: unit, integration and end-to-end tests (cargo test --release)"
log="$STACK_DIR/cargo-test.log"
: > "$log"
status=0
scripts/nix-checks.sh e2e 2>&1 | tee -a "$log" || status=1

step "tidy: README's configuration table, the tests ARCHITECTURE.md names and module docs against the code"
cargo test --release --locked -p tests --test tidy 2>&1 | tee -a "$log" || status=1

step "benchmark smoke: scripts/bench.sh --smoke (every step, tiny; figures printed, never asserted)"
scripts/bench.sh --smoke || status=1

step "benchmark smoke, cluster mode: one of each against the replicas stack (tiny)"
scripts/bench.sh --smoke --cluster || status=1

step "browser test of the console page (Chromium, playwright-core) against the same services"
scripts/stack.sh services >/dev/null
scripts/browser-test.sh || status=1
scripts/stack.sh stop-services

step "fault-injection suite (takes the test stack's PostgreSQL, Redis and Kafka down one at a time)"
cargo test --release --locked --no-fail-fast -p tests --test faults -- --nocapture --test-threads=1 2>&1 \
  | grep -v '^\[stack\]' | tee -a "$log" || status=1

# One closing line over every test binary (cargo prints one per binary, the last often empty).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f; exit (f > 0 || p == 0) }' "$log" || status=1
exit $status
