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
  packages = {
    inherit (build) websocket grpc_kafka walletctl;
    inherit (images) websocket-image grpc_kafka-image;
    # The three binaries. The images stay outputs of their own: each is a script that streams
    # the image (dockerTools.streamLayeredImage), not a directory, so it cannot be joined here;
    # `nix run .#load-images` loads them.
    default = pkgs.symlinkJoin {
      name = "purchase-pipeline";
      paths = [
        build.websocket
        build.grpc_kafka
        build.walletctl
      ];
    };
  };
  checks = import ./checks.nix {
    inherit
      pkgs
      build
      advisory-db
      packages
      ;
  };
  apps = import ./apps.nix { inherit pkgs images build; };
in
{
  inherit packages apps checks;
  devShells.default = import ./shell.nix { inherit pkgs build checks; };
  # treefmt with nixfmt: a bare `nix fmt` formats every .nix file of the repository (nixfmt alone
  # would wait for a file name, or read standard input).
  formatter = pkgs.nixfmt-tree;
}
