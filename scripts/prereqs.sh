#!/usr/bin/env bash
# What the project's scripts need before anything else, checked first with a message naming what
# to install. Debian packages are installed when running as root with apt; the Rust toolchain is
# the one thing the scripts never install (README, "Prerequisites").
#
#   scripts/prereqs.sh            check everything .ci/run needs (and say so)
#   . scripts/prereqs.sh; prereqs_build    the build's needs only (scripts/stack.sh)
#   . scripts/prereqs.sh; prereqs_ci       everything; exports GOTOOLCHAIN when the installed Go
#                                          is too old for scripts/compose-check but can fetch one
#   . scripts/prereqs.sh; prereq_apt PKG... the one way the scripts install Debian packages
#
# Pinned tool versions used by the scripts (installed by them where missing):
PREREQ_GO_MIN=1.24                 # scripts/compose-check/go.mod
PREREQ_GOTOOLCHAIN=go1.27.3        # fetched by the go command itself when the installed Go is older
PREREQ_DEADNIX_VERSION=1.3.1       # cargo install --locked --version
PREREQ_ACTIONLINT_VERSION=v1.7.12  # go install github.com/rhysd/actionlint/cmd/actionlint@...
PREREQ_PROMTOOL_VERSION=v0.316.0   # go install github.com/prometheus/prometheus/cmd/promtool@...
# Where pinned tools are built, once per machine (a folder per tool and version).
PREREQ_TOOL_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/purchase-pipeline"

_prereq_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_prereq_log() { printf '[prereqs] %s\n' "$*" >&2; }
_prereq_die() { printf '[prereqs] error: %s\n' "$*" >&2; exit 1; }
_prereq_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; } # $1 >= $2

# Installs Debian packages as root (the package lists are refreshed when an install fails); stops
# naming them otherwise. policy-rc.d keeps packages from starting system-wide servers of their own.
prereq_apt() { # packages...
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    _prereq_die "missing: $*. Install them (Debian: apt-get install $*) and run again."
  fi
  _prereq_log "installing $*"
  local status=0
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 \
    || { DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2; } \
    || status=$?
  rm -f /usr/sbin/policy-rc.d
  [ "$status" = 0 ] || _prereq_die "could not install $*"
}

# The Rust toolchain at the workspace's rust-version, and a C compiler (librdkafka, ring).
prereqs_build() {
  local need have
  need="$(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$_prereq_root/Cargo.toml")"
  if ! command -v cargo >/dev/null || ! command -v rustc >/dev/null; then
    _prereq_die "the Rust toolchain (cargo, rustc $need or newer) is missing: install it (for example with rustup) and run again"
  fi
  have="$(rustc --version | awk '{print $2}')"
  _prereq_ge "${have%%-*}" "$need" || _prereq_die "rustc $have is older than the workspace's rust-version $need: update the Rust toolchain"
  command -v cc >/dev/null || prereq_apt build-essential
}

# Everything .ci/run uses beyond what scripts/stack.sh installs itself.
prereqs_ci() {
  prereqs_build
  command -v python3 >/dev/null || prereq_apt python3
  command -v git >/dev/null || prereq_apt git
  command -v go >/dev/null || prereq_apt golang-go
  local go_version
  go_version="$(go env GOVERSION 2>/dev/null | sed 's/^go//')"
  if ! _prereq_ge "${go_version:-0}" "$PREREQ_GO_MIN"; then
    if _prereq_ge "${go_version:-0}" 1.21; then
      _prereq_log "Go $go_version is older than $PREREQ_GO_MIN: using GOTOOLCHAIN=$PREREQ_GOTOOLCHAIN (the go command fetches it)"
      export GOTOOLCHAIN="$PREREQ_GOTOOLCHAIN"
    else
      _prereq_die "Go ${go_version:-?} is too old: install Go $PREREQ_GO_MIN or newer and run again"
    fi
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  prereqs_ci
  _prereq_log "ok: rustc $(rustc --version | awk '{print $2}'), $(cc --version | head -n1), $(python3 --version), $(go version | awk '{print $3}')${GOTOOLCHAIN:+ (GOTOOLCHAIN=$GOTOOLCHAIN)}"
fi
