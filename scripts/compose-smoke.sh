#!/usr/bin/env bash
# The compose smoke test, what CI runs on a machine with Docker: the whole system from
# docker-compose.yml with the images already loaded, a few purchases in the {"user_id", "amount"}
# format through the published WebSocket port with walletctl, their totals read back over gRPC.
# Compose logs are printed on failure; the project's containers and volumes are always removed.
#
#   scripts/compose-smoke.sh [kraft|zookeeper|cluster]   (nix run .#smoke -- PROFILE loads the images first)
#
# In the cluster profile the purchases go through both websocket replicas' ports (8080, 8081) and
# every grpc_kafka replica's port (50051-50053) must answer the exact totals.
#
# Needs docker with the compose plugin (or DOCKER_COMPOSE=docker-compose) and walletctl on PATH;
# run from the repository.
set -euo pipefail
PROFILE="${1:-kraft}"
case "$PROFILE" in kraft|zookeeper|cluster) ;; *) echo "usage: $0 [kraft|zookeeper|cluster]" >&2; exit 2 ;; esac
ROOT="${SMOKE_ROOT:-$PWD}"
[ -f "$ROOT/docker-compose.yml" ] || { echo "run from the repository (no docker-compose.yml in $ROOT)" >&2; exit 2; }
cd "$ROOT"
log() { printf '[smoke %s] %s\n' "$PROFILE" "$*" >&2; }

SECRETS_DIR="$ROOT/.secrets" bash "${COMPOSE_SECRETS_SCRIPT:-$ROOT/scripts/compose-secrets.sh}" >/dev/null
export COMPOSE_PROFILES="$PROFILE"
project="purchase-smoke-$PROFILE"
# DOCKER_COMPOSE names a standalone compose binary (the Nix app uses nixpkgs' docker-compose).
if [ -n "${DOCKER_COMPOSE:-}" ]; then dc=("$DOCKER_COMPOSE"); else dc=(docker compose); fi
compose() { "${dc[@]}" -p "$project" "$@"; }
finish() {
  local status=$?
  if [ "$status" != 0 ]; then
    log "failed; the services' logs:"
    compose logs --no-color || true
  fi
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  exit "$status"
}
trap finish EXIT

log "docker compose up --wait"
compose up --wait --wait-timeout 300

export JWT_HS256_SECRET_FILE="$ROOT/.secrets/jwt-hs256.key" # walletctl mints its tokens with it
ws_ports=(8080) grpc_ports=(50051)
[ "$PROFILE" != cluster ] || { ws_ports=(8080 8081); grpc_ports=(50051 50052 50053); }
run="smoke-$(date +%s)"
send() { # port user amount
  walletctl --ws-url "ws://127.0.0.1:$1/ws" send --user-id "$2" --amount "$3"
}
log "purchases over WebSocket"
send "${ws_ports[0]}" "$run-alice" 49.99
send "${ws_ports[-1]}" "$run-alice" 0.01
send "${ws_ports[-1]}" "$run-bob" 12.30
log "totals over gRPC"
check() { # port user count expected-line
  local got
  got=$(walletctl --grpc-url "http://127.0.0.1:$1" total "$2" --wait-count "$3" --wait-secs 120)
  [ "$got" = "$4" ] || { log "port $1: got '$got', want '$4'"; return 1; }
  echo "$got"
}
for port in "${grpc_ports[@]}"; do
  check "$port" "$run-alice" 2 "$run-alice: total 50.00 (5000 cents) over 2 purchases"
  check "$port" "$run-bob" 1 "$run-bob: total 12.30 (1230 cents) over 1 purchase"
done
log "passed"
