# The build phase of the flake's e2e check: the services of nix/e2e-services.sh (E2E_SERVICES),
# then the workspace's binaries, its unit tests and the integration and end-to-end suite (tests/it)
# against them, in the profile of the dependency build (crane's cargoWithProfile and
# CARGO_PROFILE, release by default), and the services stopped whatever the outcome (no trap:
# stdenv owns the EXIT trap).
#
# Sourced, not run: nix/checks.nix sources it in crane's build phase, where cargoWithProfile is
# crane's; scripts/nix-checks.sh e2e sources it natively in a copy of the flake's source, with
# the same function. The fault-injection suite (tests/faults) drives the native stack through
# scripts/stack.sh and runs in scripts/test.sh instead.
# A start that failed ends the check here (returning from this sourced file): natively it runs
# where `set -e` is ignored, and the tests would only have failed for want of the services.
if ! bash "$E2E_SERVICES" start; then
  echo "e2e: the services did not start" >&2
  bash "$E2E_SERVICES" stop || true
  return 1
fi
eval "$(bash "$E2E_SERVICES" env)"
e2e_status=0
{
  cargoWithProfile build --locked --workspace --bins &&
    cargoWithProfile test --locked --workspace --no-fail-fast --exclude tests &&
    cargoWithProfile test --locked --no-fail-fast -p tests --test it
} || e2e_status=$?
bash "$E2E_SERVICES" stop
[ "$e2e_status" = 0 ]
