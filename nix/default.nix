# Everything the flake exports for one system, assembled from the files beside this one.
{
  nixpkgs,
  crane,
  advisory-db,
  system,
}:
let
  pkgs = nixpkgs.legacyPackages.${system};
  build = import ./packages.nix { inherit pkgs crane; };
  images = import ./images.nix { inherit pkgs build; };
  checks = import ./checks.nix { inherit pkgs build advisory-db; };
  apps = import ./apps.nix { inherit pkgs images; };
in
{
  packages = {
    inherit (build) websocket grpc_kafka walletctl;
    inherit (images) websocket-image grpc_kafka-image;
    default = pkgs.symlinkJoin {
      name = "purchase-pipeline";
      paths = [
        build.websocket
        build.grpc_kafka
        build.walletctl
        images.websocket-image
        images.grpc_kafka-image
      ];
    };
  };
  inherit apps checks;
  devShells.default = import ./shell.nix { inherit pkgs build checks; };
  formatter = pkgs.nixfmt;
}
