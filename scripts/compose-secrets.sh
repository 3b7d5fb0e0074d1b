#!/usr/bin/env bash
# Makes the secrets docker-compose.yml mounts (Docker secrets, under /run/secrets/ in the
# containers), once, with random values, under .secrets/ (git-ignored). Nothing secret is in the
# compose file or the repository; `docker compose up` needs these files first.
#
#   scripts/compose-secrets.sh          create what is missing, keep what exists
#
#   postgres_password   the PostgreSQL superuser's password (POSTGRES_PASSWORD_FILE)
#   database_url        the websocket service's connection string, with that password
#   redis_password      Redis' requirepass
#   redis_url           grpc_kafka's Redis URL, with that password
#   redis_cluster_url   the `cluster` profile's: its six nodes as seeds (redis+cluster://), with
#                       the same password (every node's requirepass and masterauth)
#   grafana_admin_password   Grafana's admin password (the monitoring profile)
#   jwt-hs256.key       the development signing key of both services' tokens; mint a token for
#                       user 123 with: JWT_HS256_SECRET_FILE=.secrets/jwt-hs256.key walletctl token --user-id 123
#
# The folder is readable by its owner only; the files inside are world-readable so that the
# services' non-root user (65534) can read their bind mounts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${SECRETS_DIR:-$ROOT/.secrets}"
mkdir -p "$DIR" && chmod 700 "$DIR"
random() { head -c 32 /dev/urandom | base64 -w0 | tr -d '/+=' | head -c 40; }
write() { # name value
  [ -s "$DIR/$1" ] && return 0
  printf '%s\n' "$2" > "$DIR/$1"
  chmod 644 "$DIR/$1"
}
write postgres_password "$(random)"
write redis_password "$(random)"
write database_url "postgres://postgres:$(head -n1 "$DIR/postgres_password")@postgres:5432/wallet"
write redis_url "redis://:$(head -n1 "$DIR/redis_password")@redis:6379/0"
write redis_cluster_url "redis+cluster://:$(head -n1 "$DIR/redis_password")@$(printf 'redis-node-%d:6379,' 1 2 3 4 5 6 | sed 's/,$//')"
write jwt-hs256.key "$(head -c 48 /dev/urandom | base64 -w0)"
write grafana_admin_password "$(random)"
echo "$DIR"
