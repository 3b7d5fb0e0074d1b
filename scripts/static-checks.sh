#!/usr/bin/env bash
# What can be checked of the Nix and Docker side on a machine without a Nix store or a Docker
# engine:
#   - every .nix file parses (nix-instantiate --parse, Debian's nix-bin) and passes deadnix;
#   - flake.lock is valid JSON, version 7, and pins exactly the revisions and narHashes of
#     ../shared/nix-pins.json (when that file is beside the repository);
#   - docker-compose.yml validates against the Compose Specification (compose-go, the loader of
#     Docker Compose) in both profiles, kraft and zookeeper, plus the project's own rules;
#   - the GitHub Actions workflows pass actionlint.
# Tools are installed where missing into $STACK_DIR/tools (default .stack/tools; git-ignored).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TOOLS="${STACK_DIR:-$ROOT/.stack}/tools"
mkdir -p "$TOOLS/bin"
log() { printf '[static] %s\n' "$*" >&2; }

if ! command -v nix-instantiate >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing nix-bin (for nix-instantiate --parse)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nix-bin >/dev/null \
      || { DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nix-bin >/dev/null; }
  else
    echo "nix-instantiate is missing: install Debian's nix-bin" >&2; exit 1
  fi
fi
# shellcheck source=scripts/prereqs.sh
. scripts/prereqs.sh
if ! "$TOOLS/bin/deadnix" --version 2>/dev/null | grep -qx "deadnix $PREREQ_DEADNIX_VERSION"; then
  log "installing deadnix $PREREQ_DEADNIX_VERSION with cargo"
  cargo install --quiet --locked --force --version "$PREREQ_DEADNIX_VERSION" --root "$TOOLS" deadnix
fi
if ! "$TOOLS/bin/actionlint" -version 2>/dev/null | head -n1 | grep -qx "${PREREQ_ACTIONLINT_VERSION#v}"; then
  log "building actionlint $PREREQ_ACTIONLINT_VERSION (Go module proxy)"
  GOBIN="$TOOLS/bin" go install "github.com/rhysd/actionlint/cmd/actionlint@$PREREQ_ACTIONLINT_VERSION"
fi
if [ ! -x "$TOOLS/compose-check" ] || [ -n "$(find scripts/compose-check -newer "$TOOLS/compose-check" -type f)" ]; then
  log "building compose-check (compose-go)"
  (cd scripts/compose-check && go build -o "$TOOLS/compose-check" .)
fi

nix_files=(flake.nix nix/*.nix)
log "nix-instantiate --parse ${nix_files[*]}"
for file in "${nix_files[@]}"; do
  nix-instantiate --parse "$file" >/dev/null
done
log "deadnix"
"$TOOLS/bin/deadnix" --fail "${nix_files[@]}"

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

for profile in kraft zookeeper; do
  "$TOOLS/compose-check" -profile "$profile" docker-compose.yml
done
log "actionlint .github/workflows/*.yml"
"$TOOLS/bin/actionlint" .github/workflows/*.yml
echo "static checks passed"
