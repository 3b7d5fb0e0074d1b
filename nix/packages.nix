# The Rust workspace built with crane: one dependency build shared by one package per binary.
{ pkgs, crane }:
let
  inherit (pkgs) lib;
  craneLib = crane.mkLib pkgs;
  root = ../.;

  # The files crane gets: one definition (nix/source.nix, builtins only), which
  # scripts/nix-source-check.sh evaluates, copies and builds on machines without nixpkgs.
  src = lib.cleanSourceWith {
    src = root;
    inherit (import ./source.nix { inherit root; }) filter;
    name = "source";
  };

  commonArgs = {
    inherit src;
    pname = "purchase-pipeline";
    inherit (craneLib.crateNameFromCargoToml { cargoToml = ../Cargo.toml; }) version;
    strictDeps = true;
    # rdkafka builds librdkafka from source with cmake (feature cmake-build); tonic needs protoc.
    nativeBuildInputs = [
      pkgs.cmake
      pkgs.pkg-config
      pkgs.protobuf
    ];
    buildInputs = [
      pkgs.zlib
      # librdkafka 2.12 includes <curl/curl.h> even when built without curl support.
      pkgs.curl.dev
    ];
    PROTOC = "${pkgs.protobuf}/bin/protoc";
  };

  cargoArtifacts = craneLib.buildDepsOnly commonArgs;

  binary =
    {
      name,
      package ? name,
    }:
    craneLib.buildPackage (
      commonArgs
      // {
        inherit cargoArtifacts;
        pname = name;
        cargoExtraArgs = "--locked -p ${package} --bin ${name}";
        # The tests need PostgreSQL, Kafka and Redis: they run in checks.e2e instead.
        doCheck = false;
        meta.mainProgram = name;
      }
    );
in
{
  inherit
    craneLib
    src
    commonArgs
    cargoArtifacts
    ;
  # The websocket binary's package is wallet_websocket (crates/websocket/Cargo.toml says why).
  websocket = binary {
    name = "websocket";
    package = "wallet_websocket";
  };
  grpc_kafka = binary { name = "grpc_kafka"; };
  walletctl = binary { name = "walletctl"; };
}
