# The Rust workspace built with crane: one dependency build shared by one package per binary.
{ pkgs, crane }:
let
  inherit (pkgs) lib;
  craneLib = crane.mkLib pkgs;
  root = ../.;

  # Cargo sources plus what the build reads besides them: the proto files (wallet_proto's build.rs)
  # and the SQL migrations (embedded into the websocket binary).
  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      (craneLib.fileset.commonCargoSources root)
      ../proto
      ../migrations
      ../crates/grpc_kafka/src/apply_batch.lua
    ];
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
    name:
    craneLib.buildPackage (
      commonArgs
      // {
        inherit cargoArtifacts;
        pname = name;
        cargoExtraArgs = "--locked -p ${name} --bin ${name}";
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
  websocket = binary "websocket";
  grpc_kafka = binary "grpc_kafka";
  walletctl = binary "walletctl";
}
