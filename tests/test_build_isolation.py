"""A tenant's build sees nothing of the host, whatever the host's Nix configuration says.

mvm runs Nix with its own nix.conf (sandbox on, no fallback, unprivileged build users), so a
host /etc/nix/nix.conf or NIX_CONF_DIR that says `sandbox = false` changes nothing.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Mvm, needs_assets

pytestmark = [pytest.mark.nix, needs_assets("kernel", "nixpkgs-offline", "builtin-flake")]

EVIL = """{
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.05";
  outputs = { self, nixpkgs }: let pkgs = nixpkgs.legacyPackages.x86_64-linux; in {
    packages.x86_64-linux.baseline = pkgs.runCommand "snoop-@NONCE@" { } ''
      mkdir -p $out/etc
      # every attempt also goes to the build log (stderr)
      { cat @SECRETS@ || echo "secrets: unreadable"; } 2>&1 | tee $out/etc/secrets-attempt >&2
      { cat /etc/shadow || echo "shadow: unreadable"; } 2>&1 | tee $out/etc/shadow-attempt >&2
      { ls /root || echo "root: unreadable"; } 2>&1 | tee $out/etc/root-attempt >&2
      id -u > $out/etc/uid
    '';
  };
}
"""


def _weak_host_config(tmp: Path) -> dict[str, str]:
    """A host (and user) Nix configuration that turns the sandbox off and builds as root."""
    conf = "sandbox = false\nsandbox-fallback = true\nbuild-users-group =\n"
    (tmp / "etc-nix").mkdir()
    (tmp / "etc-nix" / "nix.conf").write_text(conf)
    (tmp / "xdg" / "nix").mkdir(parents=True)
    (tmp / "xdg" / "nix" / "nix.conf").write_text(conf)
    return {"NIX_CONF_DIR": str(tmp / "etc-nix"), "XDG_CONFIG_HOME": str(tmp / "xdg"),
            "NIX_CONFIG": "sandbox = false"}


def _store_holds(needle: str) -> list[str]:
    r = subprocess.run(["grep", "-rlF", "--", needle, "/nix/store"], capture_output=True,
                       text=True, check=False)
    return r.stdout.split()


@pytest.mark.parametrize("host_config", ["none", "sandbox-off"])
def test_a_tenants_derivation_cannot_read_the_host(mvm: Mvm, tmp_path: Path, host_config: str) -> None:
    if host_config == "sandbox-off":
        mvm.env.update(_weak_host_config(tmp_path))
    token = f"victim-secret-{secrets.token_hex(12)}"
    shadow_root = next(ln for ln in Path("/etc/shadow").read_text().splitlines()
                       if ln.startswith("root:"))
    mvm.ok("tenant", "create", "victim")
    (tmp_path / "s.json").write_text(json.dumps({"api_key": token}))
    mvm.ok("tenant", "secrets", "set", "victim", "--from-file", str(tmp_path / "s.json"))
    secrets_path = mvm.home / "tenants" / "victim" / "secrets.json"
    assert token in secrets_path.read_text()

    flake = tmp_path / "evil"
    flake.mkdir()
    (flake / "flake.nix").write_text(EVIL.replace("@SECRETS@", str(secrets_path))
                                     .replace("@NONCE@", secrets.token_hex(6)))
    mvm.ok("tenant", "create", "evil")
    mvm.ok("pool", "create", "evil/p", "--flake", str(flake), "--profile", "baseline",
           "--cpus", "1", "--mem", "256")
    mvm.ok("pool", "build", "evil/p")

    rev = mvm.home / "tenants/evil/pools/p/artifacts/current"
    image = (rev / "rootfs.ext4").read_bytes()
    logs = b"".join(p.read_bytes() for p in (mvm.home / "tenants/evil/pools/p").rglob("*.log"))
    assert logs, "the build log is kept"
    for needle in (token, shadow_root):
        assert needle.encode() not in image
        assert needle.encode() not in logs
        assert _store_holds(needle) == []
    # what the tenant's derivation saw: none of the host's files, and not as root
    out = Path(json.loads((rev / "manifest.json").read_text())["out_path"])
    assert "secrets: unreadable" in (out / "etc/secrets-attempt").read_text()
    assert "No such file or directory" in (out / "etc/secrets-attempt").read_text()
    assert "shadow: unreadable" in (out / "etc/shadow-attempt").read_text()
    assert "root: unreadable" in (out / "etc/root-attempt").read_text()
    assert (out / "etc/uid").read_text().strip() != "0"


def test_doctor_reports_the_sandbox_and_build_users(mvm: Mvm, tmp_path: Path) -> None:
    mvm.env.update(_weak_host_config(tmp_path))
    r = mvm("doctor", "--json")
    checks = {c["check"]: c for c in json.loads(r.out)}
    sandbox = checks["nix sandbox"]
    assert sandbox["ok"] and sandbox["settings"]["sandbox"] is True
    assert sandbox["settings"]["sandbox-fallback"] is False
    assert sandbox["settings"]["build-users-group"] == "nixbld"
    users = checks["nix build users"]
    assert users["ok"] and users["group"] == "nixbld" and len(users["users"]) >= 1
    host = checks["host nix.conf"]
    assert not host["ok"] and not host["required"]
    assert host["weakening"]["sandbox"] is False and host["weakening"]["build-users-group"] == ""
    assert host["path"] == str(tmp_path / "etc-nix" / "nix.conf")
    assert "mvm ignores it" in host["detail"]
    table = mvm("doctor").out
    assert "warn" in table and "sandbox = false" in table
