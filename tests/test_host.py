"""`mvm doctor` and concurrent commands on one pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, Mvm, needs_assets


def test_doctor_reports_what_the_host_has(mvm: Mvm) -> None:
    checks = {c["check"]: c for c in json.loads(mvm.ok("doctor", "--json").out)}
    for name in ("qemu", "kvm", "accelerator", "nix", "mkfs.ext4", "/dev/net/tun", "bridge", "guest kernel"):
        assert name in checks
    assert checks["qemu"]["ok"] and "QEMU emulator" in checks["qemu"]["detail"]
    assert checks["accelerator"]["detail"] in ("kvm", "tcg")
    # KVM is only used when the probe found it fast, never just because /dev/kvm opens
    if checks["accelerator"]["detail"] == "kvm":
        assert "usable and fast" in checks["kvm"]["detail"]


def test_doctor_fails_without_a_guest_kernel(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = dict(os.environ, MVM_HOME=str(tmp_path / "empty"))
    p = subprocess.run([sys.executable, "-m", "mvm.cli.main", "doctor", "--json"], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 1
    kernel = next(c for c in json.loads(p.stdout) if c["check"] == "guest kernel")
    assert not kernel["ok"] and "mvm setup" in kernel["detail"]


@pytest.mark.nix
@needs_assets("kernel", "nixpkgs-offline", "builtin-flake")
def test_two_builds_of_one_pool_at_once_are_safe(mvm: Mvm) -> None:
    mvm.ok("tenant", "create", "acme")
    mvm.ok("pool", "create", "acme/w", "--profile", "minimal")
    argv = [sys.executable, "-m", "mvm.cli.main", "pool", "build", "acme/w", "--force"]
    procs = [subprocess.Popen(argv, env=mvm.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    revs = json.loads(mvm.ok("pool", "revisions", "acme/w", "--json").out)
    assert len(revs) == 1 and revs[0]["current"]
    rdir = mvm.home / "tenants/acme/pools/w/artifacts"
    assert sorted(os.listdir(rdir / "revisions")) == [revs[0]["revision"]]
    assert os.readlink(rdir / "current") == f"revisions/{revs[0]['revision']}"
    builds = json.loads(mvm.ok("pool", "info", "acme/w", "--json").out)["builds"]
    assert [b["status"] for b in builds] == ["ok", "ok"]


def test_every_debian_package_mvm_copies_from_is_installed_by_make() -> None:
    from mvm.image.offline_nixpkgs import DEBIAN_PACKAGES

    listed = {ln.split()[0] for ln in (REPO / "deps" / "apt.txt").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")}
    assert set(DEBIAN_PACKAGES) <= listed, set(DEBIAN_PACKAGES) - listed
