# Builder of a package copied from the host's Debian packages (run by the host's static busybox).
# Inputs (environment): debianVersions ("pkg version" lines), copyList ("src dst" lines),
# treeList ("src dst excl,udes" lines), unownedSums ("sha256  path" lines), propagated (paths).
set -eu
export LC_ALL=C

# 1. The host must still have exactly the Debian packages this derivation was generated for:
#    otherwise the store path (computed from those versions) would not describe its contents.
want=$(printf '%s\n' "$debianVersions" | sort)
have=$(/usr/bin/dpkg-query -W -f '${binary:Package} ${Version}\n' $(printf '%s\n' "$debianVersions" | cut -d' ' -f1) 2>&1 | sort) || true
if [ "$want" != "$have" ]; then
  echo "error: the host's Debian packages changed since the offline nixpkgs set was installed" >&2
  echo "recorded:" >&2; printf '%s\n' "$want" | sed 's/^/  /' >&2
  echo "now:" >&2; printf '%s\n' "$have" | sed 's/^/  /' >&2
  echo "hint: re-run mvm.build.offline_nixpkgs.install() to record the new versions" >&2
  exit 1
fi
if [ -n "$unownedSums" ]; then
  if ! printf '%s\n' "$unownedSums" | sha256sum -c -s -; then
    echo "error: a host file pinned by content changed since the offline nixpkgs set was installed" >&2
    echo "hint: re-run mvm.build.offline_nixpkgs.install()" >&2
    exit 1
  fi
fi

mkdir -p "$out"

# 2. Single files (programs, libraries, the ELF interpreter), symlinks followed.
while read -r src dst; do
  [ -n "$src" ] || continue
  mkdir -p "$out/${dst%/*}"
  cp -L "$src" "$out/$dst"
done <<COPY
$copyList
COPY

# 3. Directory trees, minus excluded names (glob patterns matched anywhere in the tree).
set -f
while read -r src dst excl; do
  [ -n "$src" ] || continue
  mkdir -p "$out/$dst"
  cp -a "$src/." "$out/$dst/"
  for pat in $(printf '%s' "$excl" | tr ',' ' '); do
    find "$out/$dst" -name "$pat" -prune -exec rm -rf {} +
  done
done <<TREES
$treeList
TREES
set +f

# 4. Absolute symlinks would point into the guest's (empty) /usr: replace them by copies.
find "$out" -type l | while read -r l; do
  t=$(readlink "$l")
  case "$t" in
    /*) rm -f "$l"
        if [ -e "$t" ]; then cp -L "$t" "$l"; else echo "warning: dropped dangling $l -> $t" >&2; fi ;;
  esac
done
chmod -R u+w "$out"

# 5. Packages a profile containing this one also needs (read by buildEnv, like nixpkgs).
if [ -n "$propagated" ]; then
  mkdir -p "$out/nix-support"
  printf '%s\n' $propagated > "$out/nix-support/propagated-user-env-packages"
fi
