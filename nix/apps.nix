# `nix run .#load-images` loads both images into Docker; `nix run .#up` also makes the compose
# secrets and runs docker compose; `nix run .#smoke -- [kraft|zookeeper|cluster]` is the compose smoke
# test CI runs (scripts/compose-smoke.sh with the Nix-built walletctl). Run them from the
# repository: docker compose reads docker-compose.yml and .secrets/ there.
{
  pkgs,
  images,
  build,
}:
let
  load = pkgs.writeShellApplication {
    name = "load-images";
    runtimeInputs = [ pkgs.docker-client ];
    text = ''
      ${images.websocket-image} | docker load
      ${images.grpc_kafka-image} | docker load
    '';
  };
  secrets = ''SECRETS_DIR="$PWD/.secrets" bash ${../scripts/compose-secrets.sh} >/dev/null'';
  up = pkgs.writeShellApplication {
    name = "up";
    # bash and coreutils of their own: the scripts run by name (bash, head, base64, tr, date)
    # must not depend on what the caller's PATH has.
    runtimeInputs = [
      pkgs.bash
      pkgs.coreutils
      pkgs.docker-client
      pkgs.docker-compose
      load
    ];
    text = ''
      ${secrets}
      load-images
      # nixpkgs' docker-compose, called directly: the docker client would not find it as a plugin.
      docker-compose up --wait "$@"
    '';
  };
  smoke = pkgs.writeShellApplication {
    name = "smoke";
    runtimeInputs = [
      pkgs.bash
      pkgs.coreutils
      pkgs.docker-client
      pkgs.docker-compose
      build.walletctl
      load
    ];
    text = ''
      load-images
      DOCKER_COMPOSE=docker-compose COMPOSE_SECRETS_SCRIPT=${../scripts/compose-secrets.sh} \
        bash ${../scripts/compose-smoke.sh} "$@"
    '';
  };
  app = program: description: {
    type = "app";
    program = pkgs.lib.getExe program;
    meta = { inherit description; };
  };
in
{
  load-images = app load "Build the two service images and load them into Docker";
  up = app up "Make the compose secrets, load the images and start the whole system with docker compose";
  smoke = app smoke "The compose smoke test: up, purchases over WebSocket, totals over gRPC, down";
  default = app up "Make the compose secrets, load the images and start the whole system with docker compose";
}
