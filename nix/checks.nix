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
      # The crates whose tests need no services (the domain, the carved cores of both services
      # under paused time, supervision, the key schema); the rest run in `e2e` below.
      cargoNextestExtraArgs = "-p purchase -p wallet_websocket -p grpc_kafka -p kafka_common -p service_kit -p totals_schema -p sequencing -p auth";
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
        # setpriv: PostgreSQL refuses to run as root, which a builder without build users is.
        pkgs.util-linux
      ];
      # The services and the broker settings the native run uses too (scripts/nix-checks.sh e2e).
      E2E_SERVICES = ./e2e-services.sh;
      KAFKA_PROPERTIES_TEMPLATE = ../scripts/kafka/kraft-single.properties;
      # nix/e2e-check.sh: services, binaries, unit tests, tests/it, in the profile of
      # cargoArtifacts (crane's CARGO_PROFILE through cargoWithProfile, release by default), so
      # the dependencies built by buildDepsOnly are reused, not rebuilt.
      buildPhaseCargoCommand = "source ${./e2e-check.sh}";
      installPhaseCommand = "touch $out";
    }
  );
}
