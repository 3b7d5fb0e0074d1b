# `nix run .#load-images` loads both images into Docker; `nix run .#up` also runs docker compose.
{ pkgs, images }:
let
  load = pkgs.writeShellApplication {
    name = "load-images";
    runtimeInputs = [ pkgs.docker-client ];
    text = ''
      ${images.websocket-image} | docker load
      ${images.grpc_kafka-image} | docker load
    '';
  };
  up = pkgs.writeShellApplication {
    name = "up";
    runtimeInputs = [
      pkgs.docker-client
      pkgs.docker-compose
      load
    ];
    text = ''
      load-images
      docker compose up --wait "$@"
    '';
  };
in
{
  load-images = {
    type = "app";
    program = pkgs.lib.getExe load;
    meta.description = "Build the two service images and load them into Docker";
  };
  up = {
    type = "app";
    program = pkgs.lib.getExe up;
    meta.description = "Load the images and start the whole system with docker compose";
  };
  default = {
    type = "app";
    program = pkgs.lib.getExe up;
    meta.description = "Load the images and start the whole system with docker compose";
  };
}
