# Minimal OCI images of the two services: the binary's closure, CA certificates, a passwd file for
# the non-root user, nothing else (no shell: health checks use the binaries' `healthcheck`).
{ pkgs, build }:
let
  # The workspace's version (Cargo.toml, [workspace.package]); docker-compose.yml names the same
  # tag, checked by scripts/static-checks.sh.
  tag = build.commonArgs.version;
  image =
    {
      name,
      package,
      port,
    }:
    pkgs.dockerTools.streamLayeredImage {
      inherit name tag;
      # The package in `contents` links its binary at /bin/<name>: a stable path for the
      # compose health checks.
      contents = [
        package
        pkgs.cacert
        pkgs.dockerTools.fakeNss
      ];
      config = {
        Entrypoint = [ "/bin/${package.meta.mainProgram}" ];
        User = "65534:65534";
        ExposedPorts."${toString port}/tcp" = { };
        Env = [
          "SSL_CERT_FILE=${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt"
          "LOG_FORMAT=json"
        ];
      };
    };
in
{
  inherit tag;
  websocket-image = image {
    name = "purchase-pipeline/websocket";
    package = build.websocket;
    port = 8080;
  };
  grpc_kafka-image = image {
    name = "purchase-pipeline/grpc_kafka";
    package = build.grpc_kafka;
    port = 50051;
  };
}
