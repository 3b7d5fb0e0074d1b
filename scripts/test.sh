#!/usr/bin/env bash
# Runs every check and test of the project on this machine: the one test command of the README,
# and what CI runs.
#
#   1. installs what is missing and starts PostgreSQL, Redis and Kafka on loopback (scripts/stack.sh deps);
#   2. formatting and lints (cargo fmt --check, cargo clippy -D warnings);
#   3. builds the binaries;
#   4. the Nix and compose static checks (scripts/static-checks.sh);
#   5. the docker-compose wiring run natively, in KRaft and in ZooKeeper mode (scripts/compose-wiring.sh);
#   6. every unit, integration and end-to-end test (cargo test), then the fault-injection suite,
#      which prints one line of figures per scenario; closing with one summary line.
#
# Tests need the real services: if they cannot be reached, the tests fail, they never skip.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

step() { printf '\n==> %s\n' "$*"; }

step "native stack (PostgreSQL, Redis, Kafka)"
scripts/stack.sh deps
eval "$(scripts/stack.sh env)"
export TEST_DATABASE_URL="${DATABASE_URL%/*}/postgres"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build the binaries the end-to-end tests run"
cargo build --workspace --bins --locked

step "Nix and compose static checks"
scripts/static-checks.sh

step "compose wiring, natively: KRaft (default profile)"
scripts/compose-wiring.sh kraft

step "compose wiring, natively: ZooKeeper profile (Kafka 3.9)"
scripts/compose-wiring.sh zookeeper

step "cargo test (unit, integration, end-to-end)"
mkdir -p .stack
: > .stack/cargo-test.log
status=0
cargo test --workspace --locked --no-fail-fast --exclude tests 2>&1 | tee -a .stack/cargo-test.log || status=1
cargo test --locked --no-fail-fast -p tests --test it 2>&1 | tee -a .stack/cargo-test.log || status=1

step "fault-injection suite (takes PostgreSQL, Redis and Kafka down one at a time)"
cargo test --locked --no-fail-fast -p tests --test faults -- --nocapture --test-threads=1 2>&1 \
  | grep -v '^\[stack\]' | tee -a .stack/cargo-test.log || status=1

# One closing line over every test binary (cargo prints one per binary, the last often empty).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f; exit (f > 0 || p == 0) }' .stack/cargo-test.log || status=1
exit $status
