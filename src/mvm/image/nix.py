"""Host Nix: evaluate and build flakes, offline when the host says so."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvm.errors import BuildFailed, CommandFailed, HostUnsupported
from mvm.util import proc

SYSTEM = "x86_64-linux"
CONF_DIR = Path(__file__).resolve().parent.parent / "data" / "nix"
BUILD_GROUP = "nixbld"
CACHE = "https://cache.nixos.org/"


def env(nixpkgs: str = "") -> dict[str, str]:
    """The environment of every Nix command mvm runs: mvm's own nix.conf and nothing else.

    The host's /etc/nix/nix.conf (or a NIX_CONF_DIR in mvm's environment) and users' config
    files are not read, and no daemon is used, so a host setting such as `sandbox = false`
    cannot weaken a tenant's build. Substituters depend on where nixpkgs comes from: none for
    the offline package set (nothing to fetch, and no network to wait for).
    """
    subst = "" if nixpkgs else CACHE
    return {
        "NIX_CONF_DIR": str(CONF_DIR),
        "NIX_USER_CONF_FILES": str(CONF_DIR / "nix.conf"),
        "NIX_CONFIG": f"substituters = {subst}",
        "NIX_REMOTE": "local",
    }


def build_users() -> list[str]:
    """Members of the build users group Nix runs builders as (empty when the group is missing)."""
    import grp

    try:
        return list(grp.getgrnam(BUILD_GROUP).gr_mem)
    except KeyError:
        return []


def require_build_users() -> None:
    if not build_users():
        raise HostUnsupported(f"Nix's build users (group {BUILD_GROUP!r} with members) do not exist",
                              "run `mvm setup` (as root): it creates them")


def effective_settings(nixpkgs: str) -> dict[str, Any]:
    """Nix's settings as mvm's builds see them (`nix show-config` under mvm's environment)."""
    out = proc.output(["nix", "show-config", "--json"], env=env(nixpkgs), timeout=60)
    data: dict[str, Any] = json.loads(out)
    return {k: v.get("value") if isinstance(v, dict) else v for k, v in data.items()}


def _override_args(nixpkgs: str) -> list[str]:
    """(An offline package set's host files are the caller's to import first:
    `offline_nixpkgs.ensure_imported`.)"""
    if not nixpkgs:
        return []
    return ["--override-input", "nixpkgs", nixpkgs]


def _common(nixpkgs: str) -> list[str]:
    return ["--no-write-lock-file", *_override_args(nixpkgs)]


def metadata(ref: str, nixpkgs: str, override: bool = True, cwd: Path | None = None) -> dict[str, Any]:
    args = ["nix", "flake", "metadata", "--json", "--no-write-lock-file"]
    if override:
        args += _override_args(nixpkgs)
    try:
        out = proc.run([*args, ref], env=env(nixpkgs), timeout=300, cwd=cwd).stdout
    except CommandFailed as e:
        raise BuildFailed(_nix_error(e), "check the flake reference and that it evaluates") from e
    result: dict[str, Any] = json.loads(out)
    return result


def prefetch(ref: str) -> str:
    """Fetch a URL flake ref's source tree into the store (nothing of it evaluated, none of its
    inputs fetched); returns its store path, which mvm then checks and copies like a directory."""
    try:
        out = proc.run(["nix", "flake", "prefetch", "--json", "--", ref], env=env(), timeout=900).stdout
    except CommandFailed as e:
        raise BuildFailed(_nix_error(e), "check the flake reference") from e
    path: str = json.loads(out)["storePath"]
    return path


@dataclass(frozen=True)
class BuildResult:
    out_path: str
    drv_path: str
    locked: dict[str, Any]


def build(ref: str, profile: str, log: Path, nixpkgs: str, cwd: Path | None = None) -> BuildResult:
    """`nix build <ref>#<profile>`; Nix's own messages go to the build log and into the error.
    `ref` is the staged copy of the tenant's source (`path:<dir>`, see image.source), and
    Nix runs in it, so a relative path anywhere resolves inside the tenant's own tree."""
    require_build_users()
    common = _common(nixpkgs)
    args = ["nix", "build", "--no-link", "--json", "-L", *common, f"{ref}#packages.{SYSTEM}.{profile}"]
    with log.open("ab") as f:
        f.write(("$ " + " ".join(args) + "\n").encode())
    try:
        res = proc.run(args, env=env(nixpkgs), timeout=3600, cwd=cwd)
    except CommandFailed as e:
        with log.open("ab") as f:
            f.write(e.stderr.encode() + b"\n")
        raise BuildFailed(_nix_error(e), f"full log: {log}") from e
    with log.open("ab") as f:
        f.write(res.stderr)
    data = json.loads(res.stdout)
    meta = metadata(ref, nixpkgs, cwd=cwd)
    return BuildResult(data[0]["outputs"]["out"], data[0]["drvPath"], meta.get("locks", {}))


def closure(out_path: str) -> list[str]:
    out = proc.output(["nix-store", "--query", "--requisites", out_path], env=env(), timeout=300)
    return sorted(line for line in out.splitlines() if line)


def _nix_error(e: CommandFailed) -> str:
    return error_text(e.stderr, e.message)


def error_text(stderr: str, fallback: str) -> str:
    """Nix's own error with the builder's log lines, without Nix's warnings (about our
    --override-input or the lock file we do not write: noise to the user)."""
    kept, in_warning = [], False
    for ln in stderr.strip().splitlines():
        if ln.startswith("warning:"):
            in_warning = True
            continue
        if in_warning and (ln[:1].isspace() or ln.startswith(("•", "…"))):
            continue
        in_warning = False
        kept.append(ln)
    text = "\n".join(kept).strip()
    return text if text else fallback
