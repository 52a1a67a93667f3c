#!/usr/bin/env bash
# Install the Debian packages mvm needs, only those missing; apt-get update once, only if needed.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
pkgs=$(grep -hv '^\s*#' "$here/deps/apt.txt" "$@" 2>/dev/null | awk 'NF{print $1}' | sort -u)
missing=()
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
echo "installing Debian packages: ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then echo "error: run as root to install packages" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
