# `nix flake check`: lints, unit tests, dependency audit, and the end-to-end tests run inside the
# build sandbox against PostgreSQL, Redis and Kafka from nixpkgs, started by the check itself.
{
  pkgs,
  build,
  advisory-db,
}:
let
  inherit (build) craneLib commonArgs cargoArtifacts;
in
{
  inherit (build) websocket grpc_kafka walletctl;

  clippy = craneLib.cargoClippy (
    commonArgs
    // {
      inherit cargoArtifacts;
      cargoClippyExtraArgs = "--all-targets -- --deny warnings";
    }
  );

  fmt = craneLib.cargoFmt { inherit (build) src; };

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
      ];
      buildPhaseCargoCommand = ''
        bash ${./e2e-services.sh} start
        export TEST_DATABASE_URL=postgres://postgres@127.0.0.1:55432/postgres
        export KAFKA_BROKERS=127.0.0.1:59092
        export REDIS_URL=redis://127.0.0.1:56379/
        cargo build --locked --workspace --bins
        cargo test --locked --workspace --no-fail-fast --exclude tests
        # The fault-injection suite (tests/faults) stops and starts the native stack through
        # scripts/stack.sh; in the sandbox the integration and end-to-end tests run.
        cargo test --locked --no-fail-fast -p tests --test it
        bash ${./e2e-services.sh} stop
      '';
      installPhaseCommand = "touch $out";
    }
  );
}
