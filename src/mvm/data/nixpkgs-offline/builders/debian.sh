# Builder of a package copied from the host's Debian packages (run by the set's static busybox).
# Inputs (environment): src (the host files, imported into the store by `mvm setup`; their
# fixed-output hash pins their bytes), propagated (store paths).
set -eu
export LC_ALL=C

# 1. The files, laid out like a root file system (bin/, lib/x86_64-linux-gnu/, lib64/).
mkdir -p "$out"
cp -RP "$src/." "$out/"
chmod -R u+w "$out"

# 2. Packages a profile containing this one also needs (read by buildEnv, like nixpkgs).
if [ -n "$propagated" ]; then
  mkdir -p "$out/nix-support"
  printf '%s\n' $propagated > "$out/nix-support/propagated-user-env-packages"
fi
