# mvm's offline stand-in for nixpkgs (use: --override-input nixpkgs path:<this directory>).
#
# This host cannot fetch nixpkgs, so the packages here are not compiled from source: each one
# copies the host's Debian binaries, every shared library they load and the ELF interpreter
# into its store path, laid out like a root file system:
#   $out/bin/curl  $out/lib/x86_64-linux-gnu/libcurl.so.4 ...  $out/lib64/ld-linux-x86-64.so.2
# A profile made with buildEnv merges those trees, so once the profile is laid out at the
# guest's `/` (next to its /nix/store closure) the binaries find their standard interpreter
# path and libraries without any patching.
#
# versions.json is generated at install time (mvm.build.offline_nixpkgs.install): for each
# package, the host files it is made of (libraries resolved with ldd), the version of every
# Debian package they come from, and the content-addressed store path those files were imported
# to (`files`: name and NAR hash). Builds run in Nix's sandbox, which shows them nothing of the
# host: each package is a fixed-output path of host files that `mvm setup` imported, copied by
# the set's own static busybox. An upgraded Debian package changes the imported bytes, hence the
# store paths of the packages holding its files, and nothing else.
{
  description = "mvm offline nixpkgs: buildEnv, trivial builders and packages copied from Debian";

  outputs = { self }:
    let
      system = "x86_64-linux";
      versionsFile = ./versions.json;
      versions =
        if builtins.pathExists versionsFile
        then builtins.fromJSON (builtins.readFile versionsFile)
        else throw "mvm offline nixpkgs: versions.json is missing; create this flake with mvm.build.offline_nixpkgs.install()";
      pkgs = import ./pkgs.nix { inherit system versions; };
    in
    {
      legacyPackages.${system} = pkgs;
      packages.${system} = {
        inherit (pkgs) bash busybox cacert coreutils curl openssl python3 wget;
        pip = pkgs.python3Packages.pip;
      };
      lib = pkgs.lib;
    };
}
