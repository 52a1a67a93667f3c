"""The image pipeline with real Nix builds and real ext4 images (issue: foundation)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import Mvm, needs_assets
from tests.imagefs import chroot, mounted

pytestmark = [pytest.mark.nix, needs_assets("kernel", "nixpkgs-offline", "builtin-flake")]


def current(mvm: Mvm, pool: str) -> str:
    t, p = pool.split("/")
    return os.readlink(mvm.home / f"tenants/{t}/pools/{p}/artifacts/current")


def rootfs(mvm: Mvm, pool: str) -> Path:
    t, p = pool.split("/")
    return mvm.home / f"tenants/{t}/pools/{p}/artifacts/current/rootfs.ext4"


def revisions(mvm: Mvm, pool: str) -> list[str]:
    t, p = pool.split("/")
    return sorted(os.listdir(mvm.home / f"tenants/{t}/pools/{p}/artifacts/revisions"))


def test_guide_flake_builds_every_profile_and_it_runs_in_the_image(mvm: Mvm, flake_copy) -> None:  # type: ignore[no-untyped-def]
    flake = flake_copy("guide-flake")
    mvm.ok("tenant", "create", "acme")
    for profile in ("minimal", "baseline", "python"):
        mvm.ok("pool", "create", f"acme/{profile}", "--flake", str(flake), "--profile", profile,
               "--cpus", "2", "--mem", "1024")
        r = mvm.ok("pool", "build", f"acme/{profile}")
        assert "nix-build" in r.err and "pack" in r.err  # per-step progress
    with mounted(rootfs(mvm, "acme/minimal")) as root:
        assert chroot(root, "/bin/busybox", "echo", "ok").stdout == "ok\n"
        assert "curl" in chroot(root, "/usr/bin/curl", "--version").stdout
        assert (root / "mvm" / "init").exists()
    with mounted(rootfs(mvm, "acme/baseline")) as root:
        assert chroot(root, "/bin/bash", "-c", "echo ok $((6*7))").stdout == "ok 42\n"
        r = chroot(root, "/bin/curl", "--version")
        assert r.returncode == 0 and r.stdout.startswith("curl ")
        assert chroot(root, "/usr/bin/wget", "--version").returncode == 0
        assert "OpenSSL" in chroot(root, "/bin/openssl", "version").stdout
    with mounted(rootfs(mvm, "acme/python")) as root:
        r = chroot(root, "/bin/python3", "-c", "import ssl, sqlite3, json, hashlib; print(json.dumps([1]))")
        assert r.returncode == 0 and r.stdout == "[1]\n", r.stderr
        r = chroot(root, "/bin/pip", "--version")
        assert r.returncode == 0 and r.stdout.startswith("pip "), r.stderr
    manifest = json.loads((rootfs(mvm, "acme/python").parent / "manifest.json").read_text())
    assert manifest["profile"] == "python" and manifest["closure_size"] > 10 * 2**20
    assert manifest["kernel"]["source"] == "default"
    assert (rootfs(mvm, "acme/python").parent / "vmlinux").read_bytes()[:4] == b"\x7fELF"


def test_services_flake_puts_the_unit_in_the_rootfs(mvm: Mvm, flake_copy) -> None:  # type: ignore[no-untyped-def]
    flake = flake_copy("services-flake")
    mvm.ok("tenant", "create", "acme")
    mvm.ok("pool", "create", "acme/svc", "--flake", str(flake), "--profile", "baseline")
    mvm.ok("pool", "build", "acme/svc")
    with mounted(rootfs(mvm, "acme/svc")) as root:
        r = chroot(root, "/bin/cat", "/etc/systemd/system/my-app.service")
        assert "ExecStart=/usr/bin/my-app" in r.stdout and "WantedBy=multi-user.target" in r.stdout


def test_cache_hit_new_revision_and_reproducible_bytes(mvm: Mvm, flake_copy) -> None:  # type: ignore[no-untyped-def]
    flake = flake_copy("guide-flake")
    mvm.ok("tenant", "create", "acme")
    mvm.ok("pool", "create", "acme/w", "--flake", str(flake), "--profile", "minimal")
    mvm.ok("pool", "build", "acme/w")
    first = current(mvm, "acme/w")
    manifest = rootfs(mvm, "acme/w").parent / "manifest.json"
    before = manifest.read_bytes()
    r = mvm.ok("pool", "build", "acme/w")
    assert "cache hit" in r.out and current(mvm, "acme/w") == first
    assert manifest.read_bytes() == before and revisions(mvm, "acme/w") == [first.split("/")[-1]]
    sha = json.loads(before)["rootfs_sha256"]
    crashed = mvm.home / "tenants/acme/pools/w/artifacts/revisions/.tmp-0123456789abcdef-99999"
    crashed.mkdir()  # what a build killed half-way leaves; the next build sweeps it
    mvm.ok("pool", "build", "acme/w", "--force")
    assert not crashed.exists()
    assert json.loads(manifest.read_text())["rootfs_sha256"] == sha  # same inputs, same bytes

    text = (flake / "flake.nix").read_text()
    (flake / "flake.nix").write_text(text.replace("[ busybox curl ]", "[ busybox curl wget ]"))
    mvm.ok("pool", "build", "acme/w")
    second = current(mvm, "acme/w")
    assert second != first and len(revisions(mvm, "acme/w")) == 2
    with mounted(rootfs(mvm, "acme/w")) as root:
        assert chroot(root, "/bin/wget", "--version").returncode == 0
    revs = json.loads(mvm.ok("pool", "revisions", "acme/w", "--json").out)
    assert [r["current"] for r in revs] == [False, True]

    # rollback to a hash moves current without building; an unknown hash changes nothing
    r = mvm.ok("pool", "rollback", "acme/w", "--revision", first.split("/")[-1])
    assert current(mvm, "acme/w") == first and "nix-build" not in r.err
    r = mvm("pool", "rollback", "acme/w", "--revision", "deadbeef00")
    assert r.rc != 0 and len(r.lines) == 1 and "no revision" in r.err
    assert current(mvm, "acme/w") == first
    r = mvm("pool", "rollback", "acme/w", "--revision", "../../etc")
    assert r.rc != 0 and len(r.lines) == 1 and current(mvm, "acme/w") == first
    mvm.ok("pool", "rollback", "acme/w", "--revision", second.split("/")[-1])
    mvm.ok("pool", "rollback", "acme/w")  # no hash: the previous one
    assert current(mvm, "acme/w") == first

    # gc never deletes current or a revision an instance uses
    r = mvm.ok("pool", "gc", "acme/w", "--keep", "0")
    assert "removed 1" in r.out and revisions(mvm, "acme/w") == [first.split("/")[-1]]


def test_failing_builds_change_nothing(mvm: Mvm, flake_copy) -> None:  # type: ignore[no-untyped-def]
    flake = flake_copy("guide-flake")
    text = (flake / "flake.nix").read_text()
    broken_drv = ('      broken = pkgs.runCommand "broken" { } "echo boom-from-the-builder >&2; exit 3";\n')
    text = text.replace("      python = pkgs.buildEnv", broken_drv + "      python = pkgs.buildEnv")
    (flake / "flake.nix").write_text(text)
    mvm.ok("tenant", "create", "acme")
    mvm.ok("pool", "create", "acme/w", "--flake", str(flake), "--profile", "minimal")
    mvm.ok("pool", "create", "acme/b", "--flake", str(flake), "--profile", "broken")
    mvm.ok("pool", "build", "acme/w")
    good = current(mvm, "acme/w")
    revs = revisions(mvm, "acme/w")

    r = mvm("pool", "build", "acme/b")  # a failing derivation: Nix's own error, nothing made
    assert r.rc != 0 and "boom-from-the-builder" in r.err
    rdir = mvm.home / "tenants/acme/pools/b/artifacts/revisions"
    assert not rdir.exists() or not any(rdir.iterdir())
    assert not (mvm.home / "tenants/acme/pools/b/artifacts/current").exists()

    (flake / "flake.nix").write_text(text.replace("[ busybox curl ];", "[ busybox curl ]"))
    r = mvm("pool", "build", "acme/w")  # a Nix syntax error
    assert r.rc != 0 and "syntax error" in r.err
    assert current(mvm, "acme/w") == good and revisions(mvm, "acme/w") == revs

    (flake / "flake.nix").write_text(text.replace("minimal = pkgs.buildEnv", "tiny = pkgs.buildEnv"))
    r = mvm("pool", "build", "acme/w")  # the profile is gone from the flake
    assert r.rc != 0 and "minimal" in r.err
    assert current(mvm, "acme/w") == good and revisions(mvm, "acme/w") == revs
    builds = json.loads(mvm.ok("pool", "info", "acme/w", "--json").out)["builds"]
    assert [b["status"] for b in builds] == ["ok", "failed", "failed"]
    assert not list((mvm.home / "tenants/acme/pools/w/artifacts/revisions").glob(".tmp-*"))


def test_missing_profile_is_reported_by_the_first_build(mvm: Mvm, flake_copy) -> None:  # type: ignore[no-untyped-def]
    flake = flake_copy("guide-flake")
    mvm.ok("tenant", "create", "acme")
    mvm.ok("pool", "create", "acme/w", "--flake", str(flake), "--profile", "nope")  # not evaluated
    r = mvm("pool", "build", "acme/w")
    assert r.rc != 0 and "nope" in r.err and "packages.x86_64-linux" in r.err
    assert not (mvm.home / "tenants/acme/pools/w/artifacts/current").exists()
    assert [b["status"] for b in json.loads(mvm.ok("pool", "info", "acme/w", "--json").out)["builds"]] == ["failed"]


def test_builtin_profiles_without_flake(mvm: Mvm) -> None:
    mvm.ok("tenant", "create", "acme")
    mvm.ok("pool", "create", "acme/w", "--profile", "minimal")
    mvm.ok("pool", "build", "acme/w")
    with mounted(rootfs(mvm, "acme/w")) as root:
        assert chroot(root, "/bin/busybox", "echo", "ok").stdout == "ok\n"
    r = mvm("pool", "create", "acme/x", "--profile", "nope")
    assert r.rc != 0 and len(r.lines) == 1


def test_profile_that_ships_a_kernel_uses_it(mvm: Mvm, flake_copy) -> None:  # type: ignore[no-untyped-def]
    flake = flake_copy("guide-flake")
    kernel = Path(os.environ.get("MVM_ASSETS_HOME", "/var/lib/mvm")) / "kernel"
    # mvm's own kernel, shipped by the profile (from the flake's source: builds see no host path)
    (flake / "kernel").mkdir()
    for name in ("vmlinux", "initrd"):
        shutil.copyfile(kernel / name, flake / "kernel" / name)
    own = ('      withkernel = pkgs.buildEnv { name = "with-kernel"; paths = [ pkgs.busybox'
           ' (pkgs.runCommand "k" { } "mkdir $out; cp ${./kernel}/vmlinux ${./kernel}/initrd $out/") ]; };\n')
    text = (flake / "flake.nix").read_text()
    (flake / "flake.nix").write_text(text.replace("      python = pkgs.buildEnv", own + "      python = pkgs.buildEnv"))
    mvm.ok("tenant", "create", "acme")
    mvm.ok("pool", "create", "acme/k", "--flake", str(flake), "--profile", "withkernel")
    r = mvm.ok("pool", "build", "acme/k")
    assert "kernel: profile" in r.err
    manifest = json.loads((rootfs(mvm, "acme/k").parent / "manifest.json").read_text())
    assert manifest["kernel"]["source"] == "profile" and manifest["initrd"] is True


def test_a_killed_build_shows_as_interrupted(mvm: Mvm, flake_copy) -> None:  # type: ignore[no-untyped-def]
    import secrets
    import signal
    import subprocess
    import sys
    import time

    flake = flake_copy("guide-flake")
    text = (flake / "flake.nix").read_text()
    slow = f'      slow = pkgs.runCommand "slow-{secrets.token_hex(4)}" {{ }} "sleep SECONDS; mkdir $out";\n'
    (flake / "flake.nix").write_text(text.replace("      python = pkgs.buildEnv",
                                                  slow.replace("SECONDS", "120") + "      python = pkgs.buildEnv"))
    mvm.ok("tenant", "create", "acme")
    mvm.ok("pool", "create", "acme/s", "--flake", str(flake), "--profile", "slow")
    p = subprocess.Popen([sys.executable, "-m", "mvm.cli.main", "pool", "build", "acme/s"], env=mvm.env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def builds() -> list[dict[str, object]]:
        return list(json.loads(mvm.ok("pool", "info", "acme/s", "--json").out)["builds"])

    deadline = time.monotonic() + 60
    while not builds() or builds()[-1]["status"] != "running":
        assert time.monotonic() < deadline, "the build never started"
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert builds()[-1]["status"] == "interrupted"  # shown, not stuck at `running`
    (flake / "flake.nix").write_text(text.replace("      python = pkgs.buildEnv",
                                                  slow.replace("SECONDS", "0") + "      python = pkgs.buildEnv"))
    mvm.ok("pool", "build", "acme/s")
    last_two = builds()[-2:]
    assert [b["status"] for b in last_two] == ["interrupted", "ok"]
    assert last_two[0]["error"] == "the command running it died"


def test_builds_count_in_the_disk_quota_and_keep_the_newest_three(mvm: Mvm, flake_copy) -> None:  # type: ignore[no-untyped-def]
    """Issue 16 item 3, with the host builder's real revisions (~80 MiB each here: the rootfs,
    and the default kernel copied in)."""
    flake = flake_copy("guide-flake")
    text = (flake / "flake.nix").read_text()
    mvm.ok("tenant", "create", "acme", "--max-disk", "1000")
    mvm.ok("pool", "create", "acme/w", "--flake", str(flake), "--profile", "minimal")
    made = []
    for n in range(4):
        (flake / "flake.nix").write_text(text.replace('"mvm-minimal"', f'"mvm-minimal-{n}"'))
        mvm.ok("pool", "build", "acme/w")
        made.append(current(mvm, "acme/w").split("/")[-1])
    assert len(set(made)) == 4 and revisions(mvm, "acme/w") == sorted(made[-3:])  # the newest 3
    info = json.loads(mvm.ok("pool", "info", "acme/w", "--json").out)
    held = sum(os.lstat(p).st_blocks * 512 for p in (mvm.home / "tenants/acme/pools/w/artifacts/revisions").rglob("*"))
    assert info["build_disk"] * 2**20 >= held > 0
    tenant = json.loads(mvm.ok("tenant", "info", "acme", "--json").out)
    assert tenant["disk_used"] == info["build_disk"]

    # data disks take most of the rest: the next revision does not fit
    mvm.ok("pool", "create", "acme/d", "--data-disk", "700", "--network", "none")
    mvm.ok("instance", "create", "acme/d")
    (flake / "flake.nix").write_text(text.replace('"mvm-minimal"', '"mvm-minimal-big"'))
    r = mvm("pool", "build", "acme/w")
    assert r.rc == 5 and len(r.errors) == 1, r.err
    assert re.search(rf"error: building acme/w would exceed tenant acme's disk quota: "
                     rf"{700 + info['build_disk']} MiB used \+ \d+ MiB needed > max-disk 1000 MiB",
                     r.errors[0]), r.errors
    assert current(mvm, "acme/w").split("/")[-1] == made[-1] and revisions(mvm, "acme/w") == sorted(made[-3:])
    assert not [p for p in (mvm.home / "tenants/acme/pools/w/artifacts/revisions").iterdir()
                if p.name.startswith(".")]
    # room made by `pool gc --keep 0` (the current revision stays): it builds
    assert "removed 2" in mvm.ok("pool", "gc", "acme/w", "--keep", "0").out
    mvm.ok("pool", "build", "acme/w")
    assert len(revisions(mvm, "acme/w")) == 2
