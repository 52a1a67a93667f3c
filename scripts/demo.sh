#!/usr/bin/env bash
# The user guide's whole flow on the embedded defaults: tenant, secrets, pool, build, scale,
# exec into a guest. Re-runnable: the demo tenant is destroyed first.
set -euo pipefail
cd "$(dirname "$0")/.."
mvm() { .venv/bin/mvm "$@"; }
say() { printf '\n\033[1m$ mvm %s\033[0m\n' "$*"; mvm "$@"; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

mvm tenant destroy demo --force >/dev/null 2>&1 || true
say doctor || true
say tenant create demo
printf '{"API_KEY": "demo-not-a-real-key", "DB_URL": "postgres://demo"}\n' > "$tmp/secrets.json"
say tenant secrets set demo --from-file "$tmp/secrets.json"
say pool create demo/workers --profile baseline --cpus 2 --mem 1024 --data-disk 64
say pool build demo/workers
say pool revisions demo/workers
say pool scale demo/workers --running 2 --warm 1 --sleeping 1
say instance list demo/workers
inst=$(mvm instance list demo/workers --json | python3 -c \
  'import json,sys; print(next(i["address"] for i in json.load(sys.stdin) if i["state"]=="running"))')
say instance exec "$inst" -- /bin/bash -c 'echo "hello from $(hostname)"; uname -r; ls -l /run/secrets; grep -E " /data | /run/secrets " /proc/mounts'
sleeper=$(mvm instance list demo/workers --json | python3 -c \
  'import json,sys; print(next(i["address"] for i in json.load(sys.stdin) if i["state"]=="sleeping"))')
say instance wake "$sleeper"
say instance exec "$sleeper" -- /bin/bash -c 'echo "woken: $(hostname)"'
say pool scale demo/workers --running 0 --warm 0 --sleeping 0
say tenant destroy demo --force
echo
echo "demo complete"
