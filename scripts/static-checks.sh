#!/usr/bin/env bash
# What can be checked of the Nix and Docker side on a machine without a Nix store or a Docker
# engine:
#   - every .nix file parses (nix-instantiate --parse, Debian's nix-bin) and passes deadnix;
#   - flake.lock is valid JSON, version 7, and pins exactly the revisions and narHashes of
#     ../shared/nix-pins.json (when that file is beside the repository);
#   - docker-compose.yml validates against the Compose Specification (compose-go, the loader of
#     Docker Compose) in each profile, kraft, zookeeper and cluster, and with the monitoring
#     profile, plus the project's own rules (exactly one websocket, grpc_kafka and topic init
#     service active; every long-running service has a health check; the services' images carry
#     the workspace's version, the tag Nix gives them; every broker named is an active service;
#     every secret file a setting names is mounted; both services agree on the stream and topic);
#   - the GitHub Actions workflows pass actionlint;
#   - the monitoring profile's Prometheus configuration passes `promtool check config`, and the
#     Grafana dashboard is JSON whose every query names only metrics the services export.
# The pinned tools (deadnix, promtool, actionlint) are built where missing once per machine, into
# a folder per version under $PREREQ_TOOL_CACHE (~/.cache/purchase-pipeline); compose-check,
# built from this repository, into $STACK_DIR/tools (default .stack/tools; git-ignored).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TOOLS="${STACK_DIR:-$ROOT/.stack}/tools"
mkdir -p "$TOOLS"
log() { printf '[static] %s\n' "$*" >&2; }

# shellcheck source=scripts/prereqs.sh
. scripts/prereqs.sh
DEADNIX="$PREREQ_TOOL_CACHE/deadnix-$PREREQ_DEADNIX_VERSION"
PROMTOOL="$PREREQ_TOOL_CACHE/promtool-$PREREQ_PROMTOOL_VERSION"
ACTIONLINT="$PREREQ_TOOL_CACHE/actionlint-$PREREQ_ACTIONLINT_VERSION"
# nix-instantiate --parse, from Debian's nix-bin.
command -v nix-instantiate >/dev/null || prereq_apt nix-bin
if ! "$DEADNIX/bin/deadnix" --version 2>/dev/null | grep -qx "deadnix $PREREQ_DEADNIX_VERSION"; then
  log "installing deadnix $PREREQ_DEADNIX_VERSION with cargo into $DEADNIX (once per machine)"
  cargo install --quiet --locked --force --version "$PREREQ_DEADNIX_VERSION" --root "$DEADNIX" deadnix
fi
if [ ! -x "$PROMTOOL/bin/promtool" ]; then
  log "building promtool $PREREQ_PROMTOOL_VERSION (Go module proxy) into $PROMTOOL (once per machine)"
  GOBIN="$PROMTOOL/bin" go install "github.com/prometheus/prometheus/cmd/promtool@$PREREQ_PROMTOOL_VERSION"
fi
if ! "$ACTIONLINT/bin/actionlint" -version 2>/dev/null | head -n1 | grep -qxE "v?${PREREQ_ACTIONLINT_VERSION#v}"; then
  log "building actionlint $PREREQ_ACTIONLINT_VERSION (Go module proxy) into $ACTIONLINT (once per machine)"
  GOBIN="$ACTIONLINT/bin" go install "github.com/rhysd/actionlint/cmd/actionlint@$PREREQ_ACTIONLINT_VERSION"
fi
if [ ! -x "$TOOLS/compose-check" ] || [ -n "$(find scripts/compose-check -newer "$TOOLS/compose-check" -type f)" ]; then
  log "building compose-check (compose-go)"
  (cd scripts/compose-check && go build -o "$TOOLS/compose-check" .)
fi

nix_files=(flake.nix nix/*.nix)
log "nix-instantiate --parse ${nix_files[*]}"
for file in "${nix_files[@]}"; do
  nix-instantiate --option build-users-group "" --parse "$file" >/dev/null
done
log "deadnix"
"$DEADNIX/bin/deadnix" --fail "${nix_files[@]}"

log "flake.lock"
python3 - "$ROOT/../shared/nix-pins.json" <<'PY'
import json, os, sys
lock = json.load(open("flake.lock"))
assert lock["version"] == 7 and lock["root"] == "root", "flake.lock: not a version 7 lock"
root_inputs = lock["nodes"]["root"]["inputs"]
for name in ("nixpkgs", "crane", "advisory-db"):
    assert root_inputs.get(name) == name, f"flake.lock: root input {name} missing"
    locked = lock["nodes"][name]["locked"]
    for key in ("rev", "narHash", "lastModified", "owner", "repo", "type"):
        assert key in locked, f"flake.lock: {name}.locked.{key} missing"
assert lock["nodes"]["advisory-db"].get("flake") is False, "advisory-db must be flake = false"
pins_path = sys.argv[1]
if os.path.exists(pins_path):
    pins = json.load(open(pins_path))
    for name in ("nixpkgs", "crane", "advisory-db"):
        assert lock["nodes"][name]["locked"] == pins[name]["locked"], f"flake.lock: {name} differs from the verified pin"
        assert lock["nodes"][name]["original"] == pins[name]["original"], f"flake.lock: {name} original differs"
    print("[static] flake.lock pins match the verified revisions and narHashes", file=sys.stderr)
else:
    print(f"[static] {pins_path} not found: checked the lock's structure only", file=sys.stderr)
PY

# The workspace's version is the Nix-built images' tag (nix/images.nix): compose must name it.
version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)"
for profile in kraft zookeeper cluster kraft,monitoring cluster,monitoring; do
  "$TOOLS/compose-check" -profile "$profile" -version "$version" docker-compose.yml
done
log "promtool check config scripts/monitoring/prometheus.yml"
"$PROMTOOL/bin/promtool" check config scripts/monitoring/prometheus.yml >&2
log "Grafana dashboard"
python3 - scripts/monitoring/grafana/dashboards/*.json <<'PY'
import json, re, sys
# Every metric family the services export (README, "Metrics"); a query naming another is a typo.
exported = {
    "websocket_connections_open", "websocket_connections_refused_total", "websocket_frames_total",
    "websocket_commit_batch_size", "websocket_commit_duration_seconds", "websocket_commit_queue_depth",
    "websocket_outbox_backlog_rows", "websocket_outbox_oldest_age_seconds",
    "websocket_outbox_events_relayed_total", "websocket_kafka_produce_errors_total",
    "websocket_stream_events_total", "websocket_stream_backlog_rows",
    "websocket_stream_oldest_age_seconds",
    "grpc_kafka_events_applied_total", "grpc_kafka_duplicates_skipped_total",
    "grpc_kafka_redis_apply_duration_seconds", "grpc_kafka_ack_to_visible_seconds",
    "grpc_kafka_consumer_lag_records", "grpc_kafka_last_applied_event_age_seconds",
    "grpc_requests_total", "grpc_request_duration_seconds",
    "process_resident_memory_bytes", "process_open_fds",
}
functions = {"sum", "rate", "by", "histogram_quantile", "max", "le", "method", "outcome", "reason",
             "partition", "job", "code"}
for path in sys.argv[1:]:
    dashboard = json.load(open(path))
    assert dashboard.get("panels"), f"{path}: no panels"
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            for name in re.findall(r"[a-z_]+(?=[{\[( ]|$)", re.sub(r'"[^"]*"', "", target["expr"])):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                assert name in functions or base in exported or name in exported, \
                    f"{path}: panel {panel['title']!r} queries unknown metric {name}"
print(f"[static] {len(sys.argv) - 1} dashboard(s) parse and query exported metrics", file=sys.stderr)
PY
log "actionlint .github/workflows/*.yml"
"$ACTIONLINT/bin/actionlint" .github/workflows/*.yml
echo "static checks passed"
