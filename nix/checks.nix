# `nix flake check`: every package (the default one and both images included, so an output that
# cannot build fails the check), lints, unit tests, dependency audit, and the end-to-end tests
# run inside the build sandbox against PostgreSQL, Redis and Kafka from nixpkgs, started by the
# check itself.
{
  pkgs,
  build,
  advisory-db,
  packages,
}:
let
  inherit (build) craneLib commonArgs cargoArtifacts;
in
{
  inherit (packages)
    default
    websocket
    grpc_kafka
    walletctl
    websocket-image
    grpc_kafka-image
    ;

  clippy = craneLib.cargoClippy (
    commonArgs
    // {
      inherit cargoArtifacts;
      cargoClippyExtraArgs = "--all-targets -- --deny warnings";
    }
  );

  fmt = craneLib.cargoFmt {
    inherit (build) src;
    pname = "purchase-pipeline";
    inherit (commonArgs) version;
  };

  unit-tests = craneLib.cargoNextest (
    commonArgs
    // {
      inherit cargoArtifacts;
      # Tests of the domain crate need no services; the rest run in `e2e` below.
      cargoNextestExtraArgs = "-p purchase";
    }
  );

  audit = craneLib.cargoAudit {
    inherit (build) src;
    inherit advisory-db;
    pname = "purchase-pipeline";
    inherit (commonArgs) version;
  };

  e2e = craneLib.mkCargoDerivation (
    commonArgs
    // {
      inherit cargoArtifacts;
      pname = "purchase-pipeline-e2e";
      doInstallCargoArtifacts = false;
      nativeBuildInputs = commonArgs.nativeBuildInputs ++ [
        pkgs.postgresql
        pkgs.redis
        pkgs.apacheKafka
        # setpriv: PostgreSQL refuses to run as root, which a builder without a sandbox may be.
        pkgs.util-linux
      ];
      # The profile of cargoArtifacts (crane's CARGO_PROFILE, release by default, through
      # cargoWithProfile), so the dependencies built by buildDepsOnly are reused, not rebuilt.
      # The services are stopped whatever the outcome (no trap: stdenv owns the EXIT trap).
      buildPhaseCargoCommand = ''
        bash ${./e2e-services.sh} start
        eval "$(bash ${./e2e-services.sh} env)"
        e2e_status=0
        {
          cargoWithProfile build --locked --workspace --bins &&
          cargoWithProfile test --locked --workspace --no-fail-fast --exclude tests &&
          # The fault-injection suite (tests/faults) stops and starts the native stack through
          # scripts/stack.sh; in the sandbox the integration and end-to-end tests run.
          cargoWithProfile test --locked --no-fail-fast -p tests --test it
        } || e2e_status=$?
        bash ${./e2e-services.sh} stop
        [ "$e2e_status" = 0 ]
      '';
      installPhaseCommand = "touch $out";
    }
  );
}
