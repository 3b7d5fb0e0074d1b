# `nix develop`: the Rust toolchain (from crane's devShell), protoc, the clients of every service,
# and the tools the checks use.
{
  pkgs,
  build,
  checks,
}:
build.craneLib.devShell {
  inherit checks;
  PROTOC = "${pkgs.protobuf}/bin/protoc";
  packages = [
    pkgs.protobuf
    pkgs.apacheKafka
    pkgs.kcat
    pkgs.postgresql
    pkgs.redis
    pkgs.grpcurl
    pkgs.cargo-nextest
    pkgs.cargo-audit
    pkgs.cargo-deny
    pkgs.statix
    pkgs.deadnix
    pkgs.nixfmt
    pkgs.docker-compose
  ];
}
