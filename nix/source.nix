# The one definition of the files the flake hands to crane: the Cargo workspace (Cargo.toml,
# Cargo.lock, every file under crates/ and tests/ but the browser test's Node project) plus what
# the crates read at compile time or in their tests besides it (proto/ for wallet_proto's build
# script, migrations/ embedded into the websocket binary). Whole folders, not file patterns: a file
# a crate embeds or a test replays is in the source because its crate is. Those read at compile
# time today: crates/grpc_kafka/src/apply_batch.lua and apply_sequenced.lua (include_str!) and the console page,
# crates/websocket/src/console/index.html, console.css and console.js; also the proptest
# regression files (crates/grpc_kafka/proptest-regressions/, crates/sequencing/
# proptest-regressions/, crates/purchase/tests/properties.proptest-regressions).
#
# Builtins only, so that Debian's nix-bin evaluates it too: `scripts/nix-checks.sh source` copies
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
  # Top-level files and folders handed over whole.
  files = [
    "Cargo.toml"
    "Cargo.lock"
  ];
  folders = [
    "crates"
    "tests"
    "proto"
    "migrations"
  ];
  # Inside those folders, what no crate reads: the browser test (Node, run by scripts/test.sh).
  excluded = [ "tests/browser" ];
  filter =
    path: _type:
    let
      rel = relative path;
    in
    !(builtins.elem rel excluded)
    && (builtins.elem rel files || builtins.elem (topLevel path) folders);
in
{
  inherit filter;
  outPath = builtins.path {
    name = "source";
    path = root;
    inherit filter;
  };
}
