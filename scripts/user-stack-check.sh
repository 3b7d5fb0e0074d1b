#!/usr/bin/env bash
# Proves that the test command neither touches nor depends on the system a user is running
# (issue 11). Run by .ci/run around scripts/test.sh:
#
#   scripts/user-stack-check.sh before   scripts/stack.sh up (the README's first command), then
#                                        500,000 purchases through it (walletctl bench), then
#                                        records its processes, its purchases and its totals
#   scripts/user-stack-check.sh client-env   prints that system's environment (scripts/stack.sh env)
#                                        and a WALLET_TOKEN for it: .ci/run runs the test command
#                                        with them exported
#   scripts/user-stack-check.sh after    the same processes still run, PostgreSQL holds the very
#                                        same purchases, and every gRPC total still equals
#                                        PostgreSQL's (walletctl reconcile)
#
# Everything it records goes to .stack/user-stack-check.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
unset STACK_DIR
STATE="$ROOT/.stack/user-stack-check"
# 100 connections: the user's system keeps its default rate limit (WS_RATE_LIMIT_PER_SEC, 1,000
# frames a second per connection), and 50 connections of a system committing 54,000 purchases a
# second passed it (one frame refused as rate-limited, which fails the bench).
CONNECTIONS=100
PURCHASES_PER_CONNECTION="${USER_STACK_PURCHASES_PER_CONNECTION:-5000}"
log() { printf '[user-stack] %s\n' "$*" >&2; }
die() { printf '[user-stack] error: %s\n' "$*" >&2; exit 1; }

eval "$(scripts/stack.sh env)"
ctl=(target/release/walletctl --ws-url "ws://$WEBSOCKET_ADDR/ws" --grpc-url "http://$GRPC_ADDR")
ledger() {
  psql "$DATABASE_URL" -tAc "SELECT COUNT(*), COALESCE(SUM(amount_cents), 0), \
    md5(COALESCE(string_agg(purchase_id::text || user_id || amount_cents, ',' ORDER BY purchase_id), '')) FROM purchases"
}

case "${1:-}" in
  before)
    scripts/stack.sh up
    log "writing $((CONNECTIONS * PURCHASES_PER_CONNECTION)) purchases to the user's system"
    "${ctl[@]}" bench --connections "$CONNECTIONS" --in-flight 16 --purchases "$PURCHASES_PER_CONNECTION" --users 1000 \
      || die "walletctl bench against the user's system failed"
    mkdir -p "$STATE"
    scripts/stack.sh status > "$STATE/status"
    ledger > "$STATE/ledger"
    "${ctl[@]}" reconcile --wait-secs 120 > "$STATE/reconcile" || die "totals differ before the tests: $(tail -n1 "$STATE/reconcile")"
    log "recorded: $(cat "$STATE/status" | tr '\n' ' ')"
    log "recorded: purchases, sum, digest = $(cat "$STATE/ledger"); $(tail -n1 "$STATE/reconcile")"
    ;;
  client-env)
    # What a user of that system has exported: its environment and a token for it with both :any
    # scopes (valid for two hours), as README's command-line section suggests.
    scripts/stack.sh env
    printf 'export WALLET_TOKEN=%s\n' "$("${ctl[@]}" token --user-id user-stack-check \
      --scope purchases:write:any --scope totals:read:any --ttl-secs 7200)"
    ;;
  after)
    [ -f "$STATE/ledger" ] || die "run '$0 before' first"
    scripts/stack.sh status > "$STATE/status.after"
    diff "$STATE/status" "$STATE/status.after" >&2 || die "the user's processes changed while the tests ran"
    grep -q stopped "$STATE/status.after" && die "a process of the user's system is stopped"
    [ "$(ledger)" = "$(cat "$STATE/ledger")" ] || die "the user's purchases changed: $(ledger) vs $(cat "$STATE/ledger")"
    "${ctl[@]}" reconcile > "$STATE/reconcile.after" || die "the user's totals changed: $(tail -n1 "$STATE/reconcile.after")"
    [ "$(tail -n1 "$STATE/reconcile.after")" = "$(tail -n1 "$STATE/reconcile")" ] \
      || die "reconcile summary changed: $(tail -n1 "$STATE/reconcile.after")"
    log "the user's system is untouched: same processes, same purchases ($(cat "$STATE/ledger")), $(tail -n1 "$STATE/reconcile.after")"
    ;;
  *) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 2 ;;
esac
