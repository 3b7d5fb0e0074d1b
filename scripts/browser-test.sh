#!/usr/bin/env bash
# The console page in a real browser, against a running stack's services (scripts/stack.sh;
# scripts/test.sh runs it against its own stack, scripts/compose-wiring.sh against the compose
# configuration): Debian's Chromium (installed when missing, as root) driven by playwright-core
# (tests/browser, installed from its lock file when missing). Mints a token for a user of this
# run with walletctl and the development key.
#
# CONSOLE_ADDR, JWT_HS256_SECRET_FILE and WALLETCTL override the stack's address, key and
# walletctl binary.
#
#   scripts/browser-test.sh [--screenshot FILE]     default: $STACK_DIR/console.png
#
# README's screenshot is docs/console.png: scripts/browser-test.sh --screenshot docs/console.png
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STACK="${STACK_DIR:-$ROOT/.stack}"
SHOT="$STACK/console.png"
[ "${1:-}" = --screenshot ] && SHOT="$(realpath -m "${2:?--screenshot FILE}")"
log() { printf '[browser] %s\n' "$*" >&2; }
die() { printf '[browser] error: %s\n' "$*" >&2; exit 1; }

# shellcheck source=scripts/prereqs.sh
. scripts/prereqs.sh
command -v chromium >/dev/null || prereq_apt chromium
command -v node >/dev/null && command -v npm >/dev/null || die "node and npm are missing (Debian: nodejs, npm)"
if [ ! -d tests/browser/node_modules/playwright-core ] \
   || [ tests/browser/package-lock.json -nt tests/browser/node_modules/.package-lock.json ]; then
  log "installing playwright-core from tests/browser/package-lock.json"
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error >&2)
fi

if [ -n "${CONSOLE_ADDR:-}" ]; then
  WEBSOCKET_ADDR="$CONSOLE_ADDR"
else
  eval "$(scripts/stack.sh env)"
fi
ctl="${WALLETCTL:-$ROOT/target/release/walletctl}"
[ -x "$ctl" ] || die "$ctl is missing: start the services first (scripts/stack.sh services)"
listening() { (exec 3<>"/dev/tcp/${WEBSOCKET_ADDR%:*}/${WEBSOCKET_ADDR##*:}") 2>/dev/null; }
listening || die "the websocket service is not running at $WEBSOCKET_ADDR (scripts/stack.sh services)"
user="browser-$(date +%s)-$$"
token="$("$ctl" token --user-id "$user" --ttl-secs 600)"
mkdir -p "$(dirname "$SHOT")"
log "console at http://$WEBSOCKET_ADDR/ for $user"
CONSOLE_URL="http://$WEBSOCKET_ADDR/" TOKEN="$token" USER_ID="$user" SCREENSHOT="$SHOT" \
  CHROMIUM="$(command -v chromium)" node tests/browser/console.test.mjs
