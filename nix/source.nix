# The one definition of the files the flake hands to crane: the Cargo workspace (Cargo.toml,
# Cargo.lock, every file under crates/ and tests/ but the browser test's Node project) plus what
# the crates read at compile time or in their tests besides it (proto/ for wallet_proto's build
# script, migrations/ embedded into the websocket binary). Whole folders, not file patterns: a file
# a crate embeds (include_str!, the console's HTML, CSS and JS, apply_batch.lua) or a test replays
# (proptest regression files) is in the source because its crate is.
#
# Builtins only, so that Debian's nix-bin evaluates it too: scripts/nix-source-check.sh copies
# exactly `outPath` out of a local store and builds the workspace there, the way crane would.
# nix/packages.nix gives the same `filter` to nixpkgs' lib.cleanSourceWith, which calls
# builtins.path with it on the same root: the same tree, the same store path.
{
  root ? ../.,
}:
let
  prefix = toString root + "/";
  relative =
    path:
    let
      full = toString path;
    in
    builtins.substring (builtins.stringLength prefix) (
      builtins.stringLength full - builtins.stringLength prefix
    ) full;
  topLevel = path: builtins.head (builtins.match "([^/]*).*" (relative path));
  # crane's commonCargoSources (Cargo.toml and Cargo.lock, *.rs, *.toml anywhere), plus the proto
  # and migrations folders and the Lua script.
  base = path: builtins.baseNameOf (toString path);
  hasSuffix =
    suffix: s:
    let
      n = builtins.stringLength s;
      m = builtins.stringLength suffix;
    in
    n >= m && builtins.substring (n - m) m s == suffix;
  filter =
    path: type:
    type == "directory"
    || hasSuffix ".rs" (base path)
    || hasSuffix ".toml" (base path)
    || base path == "Cargo.lock"
    || builtins.elem (topLevel path) [
      "proto"
      "migrations"
    ]
    || relative path == "crates/grpc_kafka/src/apply_batch.lua";
in
{
  inherit filter;
  outPath = builtins.path {
    name = "source";
    path = root;
    inherit filter;
  };
}
