# buildEnv: merge store paths into one tree of symlinks, like nixpkgs' buildEnv.
# A directory provided by one package is linked as a whole; provided by several, it becomes a
# real directory whose entries are linked (recursively). Two different files at one place are
# a collision: the package with the lower meta.priority number wins; at equal priority
# identical files keep the first, different ones fail (unless ignoreCollisions).
# Unlike nixpkgs, top-level directories (bin, etc, lib, ...) are always real directories.
# Packages named in nix-support/propagated-user-env-packages are added too, losing every
# collision. Inputs: pkgList ("priority path" lines, sorted), ignoreCollisions, postBuild.
set -eu
store=${NIX_STORE:-/nix/store}
added=" "
mkdir -p "$out"

prio_of() {  # priority of the package a path in the store belongs to
  h=${1#"$store"/}
  h=${h%%-*}
  eval "echo \${prio_$h:-5}"
}

collide() {  # $1: entry already in $out, $2: new entry
  if [ -L "$1" ]; then old=$(readlink "$1"); else old="a directory merged from several paths"; fi
  echo "error: buildEnv '$name': collision at /${1#"$out"/}: $old and $2 differ" >&2
  echo "hint: drop one of them from paths, give one a larger meta.priority number (it loses), or set ignoreCollisions = true" >&2
  exit 1
}

link() {  # $1: directory to link from, $2: real directory in $out
  local src="$1" dst="$2" e n t old tp
  for e in "$src"/* "$src"/.[!.]* "$src"/..?*; do
    if [ ! -e "$e" ] && [ ! -L "$e" ]; then continue; fi
    n=${e##*/}
    t="$dst/$n"
    if [ "$dst" = "$out" ] && [ "$n" = nix-support ]; then continue; fi
    if [ ! -e "$t" ] && [ ! -L "$t" ]; then
      if [ "$dst" = "$out" ] && [ -d "$e" ]; then
        mkdir "$t"  # top-level directories are real, so a root made from the profile can add to /etc
        link "$e" "$t"
      else
        ln -s "$e" "$t"
      fi
      continue
    fi
    if [ -d "$e" ] && [ -d "$t" ]; then
      if [ -L "$t" ]; then
        old=$(readlink "$t")
        if [ "$(readlink -f "$old")" = "$(readlink -f "$e")" ]; then continue; fi
        rm "$t"
        mkdir "$t"
        link "$old" "$t"
      fi
      link "$e" "$t"
      continue
    fi
    if [ ! -d "$e" ] && [ ! -d "$t" ] && cmp -s "$t" "$e"; then
      continue  # identical contents: keep the first
    fi
    if [ -L "$t" ]; then tp=$(prio_of "$(readlink "$t")"); else tp=$cur_prio; fi
    if [ "$cur_prio" -gt "$tp" ] || [ "$cur_prio" -ge 1000 ]; then
      continue  # the entry already there wins
    fi
    if [ "$cur_prio" -lt "$tp" ] && [ -L "$t" ]; then
      rm "$t"
      ln -s "$e" "$t"
      continue
    fi
    if [ -n "${ignoreCollisions:-}" ]; then
      echo "warning: buildEnv '$name': ignoring collision at /${t#"$out"/} (keeping $(readlink "$t" || echo directory))" >&2
      continue
    fi
    collide "$t" "$e"
  done
}

add_pkg() {  # $1: priority, $2: store path
  case "$added" in *" $2 "*) return 0 ;; esac
  added="$added$2 "
  if [ ! -d "$2" ]; then
    echo "error: buildEnv '$name': $2 is not a directory (a single file cannot be merged)" >&2
    exit 1
  fi
  h=${2#"$store"/}
  h=${h%%-*}
  eval "prio_$h=$1"
  cur_prio=$1
  link "$2" "$out"
}

while read -r prio path; do
  [ -n "$path" ] || continue
  add_pkg "$prio" "$path"
done <<PKGS
$pkgList
PKGS

propagated_of() {
  for p in "$@"; do
    if [ -f "$p/nix-support/propagated-user-env-packages" ]; then
      cat "$p/nix-support/propagated-user-env-packages"
    fi
  done
}
queue=$(propagated_of $added)
while [ -n "$queue" ]; do
  next=""
  for p in $queue; do
    case "$added" in *" $p "*) continue ;; esac
    add_pkg 1000 "$p"
    next="$next $(propagated_of "$p")"
  done
  queue=$(echo $next)
done

if [ -n "${postBuild:-}" ]; then
  eval "$postBuild"
fi
