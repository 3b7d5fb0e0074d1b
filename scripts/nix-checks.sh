#!/usr/bin/env bash
# The inputs of the flake's build and checks, checked on a machine without nixpkgs (Debian's
# nix-bin evaluates builtins-only Nix, not nixpkgs):
#
#   scripts/nix-checks.sh source   the source crane gets: nix/source.nix evaluated by nix-instantiate
#                                  over the files git tracks (what a flake sees), copied out of a
#                                  local store into an empty folder, and the workspace compiled
#                                  there as the Nix checks do (--release --locked, all targets).
#                                  A file a crate reads at compile time that is not in the source
#                                  fails here as it would fail `nix build`.
#   scripts/nix-checks.sh audit    checks.audit: cargo-audit (pinned, built once per machine)
#                                  offline against the advisory-db revision flake.lock pins, as
#                                  crane's cargoAudit runs it (Cargo.lock and audit.toml files of
#                                  the source, `cargo audit -n -d DB --ignore yanked`). The
#                                  database is the tarball in ../shared/advisory-db/ (ADVISORY_DB_DIR),
#                                  which must hold exactly that revision.
#   scripts/nix-checks.sh e2e      checks.e2e: nix/e2e-check.sh sourced in the copied source with
#                                  crane's cargoWithProfile (CARGO_PROFILE=release), against
#                                  nix/e2e-services.sh run natively (Debian's PostgreSQL and Redis,
#                                  Kafka's jars), as root when run as root (PostgreSQL then runs as
#                                  nobody, as in a Nix build without build users).
#
# The local store is under $STACK_DIR/nix (default .stack/nix; git-ignored), cargo-audit in the
# user's cache (~/.cache/purchase-pipeline), built once per machine; the copy is outside the repository, in $TMPDIR (NIX_SOURCE_COPY), kept between
# runs. It builds into the repository's target/ (CARGO_TARGET_DIR), so the
# dependencies compiled for scripts/stack.sh are reused, and its release binaries are the ones
# the copy built from the same files.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/prereqs.sh
. scripts/prereqs.sh
WORK="${STACK_DIR:-$ROOT/.stack}/nix"
# The copy lives outside the repository, so that a path climbing out of the source (an
# include_str! of "../../../README.md") finds nothing, as in the Nix sandbox, instead of the
# repository's own file.
COPY="${NIX_SOURCE_COPY:-${TMPDIR:-/tmp}/purchase-pipeline-nix-source-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)/source}"
ADVISORY_DB_DIR="${ADVISORY_DB_DIR:-$ROOT/../shared/advisory-db}"
CARGO_AUDIT_VERSION=0.22.1 # cargo install --locked --version
# Built once per machine, not per checkout: a folder of the user's cache, one per version.
CARGO_AUDIT_ROOT="$PREREQ_TOOL_CACHE/cargo-audit-$CARGO_AUDIT_VERSION"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
log() { printf '[nix-checks] %s\n' "$*" >&2; }
die() { printf '[nix-checks] error: %s\n' "$*" >&2; exit 1; }

# nix/source.nix's outPath, evaluated over a copy of the tracked files, brought into $COPY. Only
# files whose content changed are rewritten (rsync --checksum; the store's files all carry the
# same old mtime), so cargo sees exactly what changed since the last run and rebuilds no more.
make_copy() {
  command -v nix-instantiate >/dev/null || prereq_apt nix-bin
  command -v rsync >/dev/null || prereq_apt rsync
  local tracked="$WORK/tracked" store_path
  rm -rf "$tracked"
  mkdir -p "$tracked" "$WORK/store" "$COPY"
  # What a flake sees: the files git tracks, with their contents in the work tree.
  git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$tracked"
  store_path="$(nix-instantiate --store "local?root=$WORK/store" --option build-users-group '' \
    --read-write-mode --eval --json \
    -E "toString (import $tracked/nix/source.nix { root = $tracked; })" | tr -d '"')"
  [ -d "$WORK/store$store_path" ] || die "nix-instantiate printed $store_path, which is not in $WORK/store"
  rsync -r --checksum --delete --chmod=u+w "$WORK/store$store_path/" "$COPY/"
  log "the flake's source: $(find "$COPY" -type f | wc -l) files ($store_path), in $COPY"
}

source_check() {
  make_copy
  log "cargo build --release --locked --workspace --all-targets, in the copy"
  (cd "$COPY" && cargo build --release --locked --workspace --all-targets)
  log "the flake's source compiles"
}

audit_check() {
  local rev tarball db="$WORK/advisory-db"
  rev="$(python3 -c 'import json; print(json.load(open("flake.lock"))["nodes"]["advisory-db"]["locked"]["rev"])')"
  tarball="$ADVISORY_DB_DIR/advisory-db-$rev.tar.gz"
  if [ ! -f "$tarball" ]; then
    die "flake.lock pins advisory-db $rev, but $ADVISORY_DB_DIR holds $(cd "$ADVISORY_DB_DIR" 2>/dev/null && ls advisory-db-*.tar.gz 2>/dev/null | tr '\n' ' ' || echo nothing): the two must move together"
  fi
  if [ "$(cat "$db/.revision" 2>/dev/null)" != "$rev" ]; then
    rm -rf "$db" && mkdir -p "$db"
    tar -xzf "$tarball" -C "$db" --strip-components=1
    echo "$rev" > "$db/.revision"
  fi
  if ! "$CARGO_AUDIT_ROOT/bin/cargo-audit" --version 2>/dev/null | grep -qx "cargo-audit $CARGO_AUDIT_VERSION"; then
    log "installing cargo-audit $CARGO_AUDIT_VERSION with cargo into $CARGO_AUDIT_ROOT (once per machine)"
    cargo install --quiet --locked --force --version "$CARGO_AUDIT_VERSION" --root "$CARGO_AUDIT_ROOT" cargo-audit
  fi
  # crane's cargoAudit keeps the Cargo.lock and audit.toml files of the source and nothing else.
  make_copy
  local audit_src="$WORK/audit-source"
  rm -rf "$audit_src" && mkdir -p "$audit_src"
  (cd "$COPY" && find . -type f \( -name Cargo.lock -o -name audit.toml \) -print0 | tar --null -T - -cf -) | tar -xf - -C "$audit_src"
  log "cargo audit -n -d <advisory-db $rev> --ignore yanked"
  (cd "$audit_src" && PATH="$CARGO_AUDIT_ROOT/bin:$PATH" cargo audit -n -d "$db" --ignore yanked)
}

# crane's cargoWithProfile (lib/setupHooks/cargoHelperFunctionsHook.sh): --release for the
# release profile, --profile for another one.
cargoWithProfile() {
  local profileArgs=()
  if [[ "${CARGO_PROFILE}" == "release" ]]; then
    profileArgs+=("--release")
  elif [[ -n "${CARGO_PROFILE:-}" ]]; then
    profileArgs+=("--profile" "${CARGO_PROFILE}")
  fi
  cargo "${@:1:1}" "${profileArgs[@]}" "${@:2}"
}

e2e_check() {
  make_copy
  # The tools nixpkgs puts on the check's PATH, from this machine: PostgreSQL's server binaries,
  # redis-server, and kafka-storage.sh / kafka-server-start.sh over Kafka's jars.
  local pgbin libs shims="$WORK/bin" tmp
  pgbin="$(scripts/stack.sh pg-bindir)"
  libs="$(scripts/stack.sh kafka-libs)"
  mkdir -p "$shims"
  local java="exec java -Xms256m -Xmx768m -XX:+UseG1GC -Dlog4j2.configurationFile=$ROOT/scripts/kafka/log4j2.properties -cp '$libs/*'"
  printf '#!/bin/sh\n%s kafka.tools.StorageTool "$@"\n' "$java" > "$shims/kafka-storage.sh"
  printf '#!/bin/sh\n%s kafka.Kafka "$@"\n' "$java" > "$shims/kafka-server-start.sh"
  chmod +x "$shims"/*.sh
  # A fresh 0700 folder, as a Nix builder's; e2e-services.sh makes it traversable when root.
  tmp="$(mktemp -d /tmp/nix-e2e.XXXXXX)"
  (
    cd "$COPY"
    export PATH="$pgbin:$shims:$PATH" TMPDIR="$tmp" CARGO_PROFILE=release
    export E2E_SERVICES="$ROOT/nix/e2e-services.sh"
    export KAFKA_PROPERTIES_TEMPLATE="$ROOT/scripts/kafka/kraft-single.properties"
    # Only what the check's environment has: not the test stack's addresses.
    unset TEST_DATABASE_URL DATABASE_URL KAFKA_BROKERS REDIS_URL WALLET_BIN_DIR STACK_DIR
    set -e
    # shellcheck source=nix/e2e-check.sh
    source "$ROOT/nix/e2e-check.sh"
  ) || { rm -rf "$tmp"; die "the e2e check failed"; }
  rm -rf "$tmp"
  log "the e2e check passed"
}

case "${1:-}" in
  source) source_check ;;
  audit) audit_check ;;
  e2e) e2e_check ;;
  *) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 2 ;;
esac
