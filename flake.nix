{
  description = "Purchase totals pipeline: websocket and grpc_kafka services, their OCI images and checks";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";
    crane.url = "github:ipetkov/crane/v0.23.4";
    advisory-db = {
      url = "github:rustsec/advisory-db";
      flake = false;
    };
  };

  outputs =
    {
      nixpkgs,
      crane,
      advisory-db,
      ...
    }:
    let
      # Linux only: the images are Linux images, and the e2e check runs PostgreSQL, Redis and Kafka
      # in the Linux build sandbox. On other systems the flake has no outputs at all (nix build
      # says the attribute is missing; nix flake check checks nothing), as README says.
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f (import ./nix { inherit nixpkgs crane advisory-db system; }));
    in
    {
      packages = forAllSystems (project: project.packages);
      apps = forAllSystems (project: project.apps);
      devShells = forAllSystems (project: project.devShells);
      checks = forAllSystems (project: project.checks);
      formatter = forAllSystems (project: project.formatter);
    };
}
