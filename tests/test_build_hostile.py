"""Hostile flakes built by the host builder (issue 8, scopes 3 and 5): nothing outside a build's
closure is followed, no host path reaches the store, no host file or mode changes."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Mvm, needs_assets

pytestmark = [pytest.mark.nix, needs_assets("kernel", "nixpkgs-offline", "builtin-flake")]

FLAKE = """{
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.05";
  outputs = { self, nixpkgs }: let pkgs = nixpkgs.legacyPackages.x86_64-linux; in {
    packages.x86_64-linux.p = pkgs.runCommand "hostile-@NONCE@" { } ''
      @SCRIPT@
    '';
  };
}
"""

GOOD = "mkdir -p $out/bin; echo good > $out/bin/good"
# Each refused before anything is packed: a link out of the closure.
REFUSED = {
    "out-to-victim": "ln -s @VICTIM@ $out",
    "out-to-etc": "ln -s /etc $out",
    "kernel-to-victim": "mkdir $out; ln -s @VICTIM@/secrets.json $out/vmlinux",
    "initrd-to-victim": "mkdir $out; printf '\\177ELF\\002' > $out/vmlinux; ln -s @VICTIM@/secrets.json $out/initrd",
}
# Built, with mvm's own /tmp and the profile's /usr left as a link nobody follows.
LINKED_DIRS = "mkdir -p $out/bin; echo ok > $out/bin/ok; ln -s @HOSTTMP@ $out/tmp; ln -s @HOSTDIR@ $out/usr"


def modes(*dirs: Path) -> dict[str, tuple[int, int, list[str]]]:
    return {str(d): (d.stat().st_mode, d.stat().st_mtime_ns, sorted(os.listdir(d))) for d in dirs}


def store_holds(needle: str) -> list[str]:
    r = subprocess.run(["grep", "-rlF", "--", needle, "/nix/store"], capture_output=True, text=True, check=False)
    return r.stdout.split()


def debugfs_ls(image: Path, path: str) -> str:
    return subprocess.run(["debugfs", "-R", f"ls -l {path}", str(image)], capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture
def victim(mvm: Mvm, tmp_path: Path) -> tuple[Path, str]:
    return make_victim(mvm, tmp_path)


def make_victim(mvm: Mvm, tmp_path: Path) -> tuple[Path, str]:
    """Another tenant with secrets: its directory and the token its secrets hold."""
    token = f"victim-secret-{secrets.token_hex(12)}"
    mvm.ok("tenant", "create", "victim")
    (tmp_path / "s.json").write_text(json.dumps({"api_key": token}))
    mvm.ok("tenant", "secrets", "set", "victim", "--from-file", str(tmp_path / "s.json"))
    return mvm.home / "tenants" / "victim", token


def write(flake: Path, script: str, **subst: str) -> None:
    for k, v in subst.items():
        script = script.replace(f"@{k}@", v)
    flake.mkdir(exist_ok=True)
    (flake / "flake.nix").write_text(FLAKE.replace("@SCRIPT@", script).replace("@NONCE@", secrets.token_hex(6)))


def test_outputs_linking_out_of_the_closure(mvm: Mvm, tmp_path: Path, victim: tuple[Path, str]) -> None:
    vdir, token = victim
    hostdir, hosttmp = tmp_path / "host-usr", tmp_path / "host-tmp"
    hostdir.mkdir()
    (hostdir / "keep").write_text("host file")
    hosttmp.mkdir(mode=0o700)
    flake = tmp_path / "evil"
    write(flake, GOOD)
    (flake / "secrets.json").write_text(json.dumps({"api_key": token + "-own"}))  # next to flake.nix
    mvm.ok("tenant", "create", "evil")
    mvm.ok("pool", "create", "evil/p", "--flake", str(flake), "--profile", "p")
    mvm.ok("pool", "build", "evil/p")
    arts = mvm.home / "tenants/evil/pools/p/artifacts"
    good = os.readlink(arts / "current")
    revs = sorted(os.listdir(arts / "revisions"))
    watched = modes(vdir, hostdir, hosttmp)
    etc_mode = Path("/etc").stat().st_mode  # (its listing may change under other tests)

    for name, script in REFUSED.items():
        write(flake, script, VICTIM=str(vdir))
        r = mvm("pool", "build", "evil/p")
        assert r.rc != 0 and len(r.errors) == 1, (name, r.err)
        assert "outside the build's closure" in r.errors[0], (name, r.errors)
        assert os.readlink(arts / "current") == good and sorted(os.listdir(arts / "revisions")) == revs, name

    write(flake, LINKED_DIRS, HOSTTMP=str(hosttmp), HOSTDIR=str(hostdir))
    mvm.ok("pool", "build", "evil/p")
    assert modes(vdir, hostdir, hosttmp) == watched  # no host mode, file or link changed
    assert Path("/etc").stat().st_mode == etc_mode
    image = arts / "current" / "rootfs.ext4"
    root = debugfs_ls(image, "/")
    tmp_line = next(ln for ln in root.splitlines() if ln.split()[-1:] == ["tmp"])
    assert tmp_line.split()[1] == "41777"  # mvm's own /tmp, a directory
    usr_line = next(ln for ln in root.splitlines() if ln.split()[-1:] == ["usr"])
    assert usr_line.split()[1].startswith("120")  # the profile's link, kept as a link
    data = b"".join((arts / "current" / f).read_bytes() for f in ("rootfs.ext4", "vmlinux", "initrd"))
    assert token.encode() not in data and b"host file" not in data
    logs = b"".join(p.read_bytes() for p in (mvm.home / "tenants/evil/pools/p").rglob("*.log"))
    assert token.encode() not in logs
    assert store_holds(token) == []  # neither the victim's secrets nor the tenant's own secrets.json


def test_inputs_and_refs_naming_host_paths(mvm: Mvm, tmp_path: Path, victim: tuple[Path, str]) -> None:
    vdir, token = victim
    mvm.ok("tenant", "create", "evil")
    flake = tmp_path / "evil"
    write(flake, GOOD)
    mvm.ok("pool", "create", "evil/p", "--flake", str(flake), "--profile", "p")
    for url in (f"path:{vdir}", str(vdir), "path:../../home/tenants/victim", f"git+file://{vdir}"):
        text = FLAKE.replace("@SCRIPT@", GOOD).replace("@NONCE@", secrets.token_hex(6))
        text = text.replace('inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.05";',
                            'inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.05";\n'
                            f'  inputs.v = {{ url = "{url}"; flake = false; }};')
        (flake / "flake.nix").write_text(text.replace("{ self, nixpkgs }", "{ self, nixpkgs, v }"))
        r = mvm("pool", "build", "evil/p")
        assert r.rc != 0 and len(r.errors) == 1 and "names a host path" in r.errors[0], (url, r.err)
        assert "nix-build" not in r.err  # refused before Nix ran
    assert not (mvm.home / "tenants/evil/pools/p/artifacts/current").exists()
    # --flake naming another tenant's directory (with a flake.nix planted there): refused
    (vdir / "flake.nix").write_text(FLAKE.replace("@SCRIPT@", GOOD).replace("@NONCE@", "x"))
    for ref in (f"path:{vdir}", str(vdir)):
        r = mvm("pool", "create", "evil/q", "--flake", ref, "--profile", "p")
        assert r.rc != 0 and len(r.lines) == 1 and "inside mvm's state" in r.err
    assert store_holds(token) == []
