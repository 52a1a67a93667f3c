"""The ephemeral builder microVM (issue 8): builds through it, its failures, and what it leaves.

Booting real builders under TCG is slow (~30 s for a first build), so these tests are few and
each checks several things; the strictness of the output reader is shown without a VM.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mvm.config.paths import Layout
from mvm.image import archive
from tests.conftest import Mvm, _kill_guests_of, instances_by_state, needs_assets, sh
from tests.test_build_hostile import debugfs_ls, make_victim, modes, store_holds

VM_MARKS = (pytest.mark.guest, pytest.mark.nix,
            needs_assets("kernel", "nixpkgs-offline", "builder"))


def vm_test(f):  # type: ignore[no-untyped-def]
    for mark in VM_MARKS:
        f = mark(f)
    return f

FLAKE = """{
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.05";
  outputs = { self, nixpkgs }: let
    pkgs = nixpkgs.legacyPackages.x86_64-linux;
  in {
    packages.x86_64-linux.minimal =
      if builtins.pathExists ./fail then derivation {
        name = "fails"; system = "x86_64-linux";
        builder = "${pkgs.busybox}/bin/busybox";
        args = [ "sh" "-c" "echo mvm-test-derivation-failed >&2; exit 3" ];
      } else if builtins.pathExists ./slow then derivation {
        name = "slow"; system = "x86_64-linux";
        builder = "${pkgs.busybox}/bin/busybox";
        args = [ "sh" "-c" "sleep 600" ];
      } else pkgs.buildEnv { name = "ok"; paths = [ pkgs.busybox ]; };
  };
}
"""


def _leftovers(m: Mvm, tenant: str, pool: str) -> list[str]:
    """Whatever a builder of this pool left: processes, run directory, disks but the store."""
    left = []
    run = Layout(m.home).runtime_dir() / f"builder.{tenant}.{pool}"
    if run.exists():
        left.append(f"run dir {run}: {sorted(os.listdir(run))}")
    wdir = m.home / "tenants" / tenant / "pools" / pool / "builder"
    extra = sorted(set(os.listdir(wdir)) - {"store.ext4"}) if wdir.exists() else []
    if extra:
        left.append(f"in {wdir}: {extra}")
    revs = m.home / "tenants" / tenant / "pools" / pool / "artifacts" / "revisions"
    if revs.exists():
        left += [f"partial revision {n}" for n in os.listdir(revs) if n.startswith(".")]
    name = f"builder-{tenant}-{pool}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if name in cmd and str(m.home).encode() in cmd:
            left.append(f"process {pid}")
    return left


def _builds(m: Mvm, pool: str) -> list[tuple[str, str]]:
    info = json.loads(m.ok("pool", "info", pool, "--json").out)
    return [(b["builder"], b["status"]) for b in info["builds"]]


@vm_test
def test_guide_flake_through_the_builder_vm_same_revision_as_host_and_boots(
        gmvm: Mvm, flake_copy) -> None:  # type: ignore[no-untyped-def]
    flake = flake_copy("guide-flake")
    gmvm.ok("tenant", "create", "acme")
    gmvm.ok("pool", "create", "acme/w", "--flake", str(flake), "--profile", "minimal",
            "--network", "none")
    r = gmvm.ok("pool", "build", "acme/w", "--builder", "vm", "--builder-mem", "1024")
    rev = r.out.split("revision ")[1].split()[0]
    # steps and Nix's own log stream as progress
    assert "builder: up" in r.err and "nix-build" in r.err and "pack" in r.err
    assert "building '/nix/store/" in r.err
    # the host builder gives the same revision (it finds it: same hash, nothing to pack)
    h = gmvm.ok("pool", "build", "acme/w", "--builder", "host")
    assert f"revision {rev}" in h.out
    # unchanged flake: a cache hit decided on the host, no builder booted
    c = gmvm.ok("pool", "build", "acme/w", "--builder", "vm")
    assert f"revision {rev}" in c.out and "cache hit" in c.out and "builder" not in c.err
    assert _builds(gmvm, "acme/w") == [("vm", "ok"), ("host", "ok"), ("vm", "ok")]
    manifest = json.loads((gmvm.home / "tenants/acme/pools/w/artifacts/current/manifest.json")
                          .read_text())
    assert manifest["builder"]["kind"] == "vm" and manifest["kernel"]["source"] == "default"
    log = Path(json.loads(gmvm.ok("pool", "info", "acme/w", "--json").out)["builds"][0]["log"])
    assert "@mvm pack" in log.read_text()  # the builder's console is kept with the build
    assert _leftovers(gmvm, "acme", "w") == []
    # an instance boots from the revision the builder made
    gmvm.ok("pool", "scale", "acme/w", "--running", "1")
    inst = instances_by_state(gmvm, "acme/w")["running"][0]
    out = sh(gmvm, inst, "curl --version | head -1; cat /proc/cmdline")
    assert out.rc == 0 and out.out.startswith("curl "), out


@vm_test
def test_guide_profiles_and_its_service_through_the_builder_vm_same_revision_as_host(
        gmvm: Mvm, flake_copy) -> None:  # type: ignore[no-untyped-def]
    """The guide's `baseline` and `python` and its "Adding Services" flake (`minimal` is the
    test above): each built by a builder microVM gives the revision the host builder gives.
    The services flake is the guide's text with the app its unit names (tests/fixtures/app-flake)."""
    guide, app = flake_copy("guide-flake"), flake_copy("app-flake")
    pools = {"acme/baseline": (guide, "baseline"), "acme/python": (guide, "python"),
             "acme/svc": (app, "baseline")}
    gmvm.ok("tenant", "create", "acme")
    revs = {}
    for pool, (flake, profile) in pools.items():
        gmvm.ok("pool", "create", pool, "--flake", str(flake), "--profile", profile,
                "--network", "none")
        r = gmvm.ok("pool", "build", pool, "--builder", "vm")
        assert "builder: up" in r.err and "pack" in r.err, r.err
        revs[pool] = r.out.split("revision ")[1].split()[0]
        manifest = gmvm.home / f"tenants/acme/pools/{pool[5:]}/artifacts/current/manifest.json"
        packed = json.loads(manifest.read_text())["rootfs_sha256"]
        # the host builder, made to pack again: the same revision, byte for byte (but for
        # python: the package set's python3 compiles its bytecode under `python -I`, so with
        # hash randomisation, and its .pyc bytes differ from one build of it to the next)
        h = gmvm.ok("pool", "build", pool, "--builder", "host", "--force")
        assert f"revision {revs[pool]}" in h.out, (pool, h.out)
        if profile != "python":
            assert json.loads(manifest.read_text())["rootfs_sha256"] == packed, pool
        assert _builds(gmvm, pool) == [("vm", "ok"), ("host", "ok")]
        assert _leftovers(gmvm, *pool.split("/")) == []
    assert len(set(revs.values())) == 3
    # (Each image is the host builder's, byte for byte but python's .pyc files: what runs in
    # it is test_build's test_guide_flake_builds_every_profile_and_it_runs_in_the_image; the
    # app flake's baseline is the very revision whose unit test_instances' guide flow sees run
    # in a guest; an instance booted from a builder VM's image is the test above.)


@vm_test
def test_failing_flake_timeout_and_interrupt_leave_current_and_nothing_behind(
        mvm: Mvm, tmp_path: Path) -> None:
    try:
        _failures(mvm, tmp_path)
    finally:
        _kill_guests_of(mvm.home)  # (a safety net: the test fails on any builder left)


def _failures(mvm: Mvm, tmp_path: Path) -> None:
    flake = tmp_path / "flake"
    flake.mkdir()
    (flake / "flake.nix").write_text(FLAKE)
    mvm.ok("tenant", "create", "acme")
    mvm.ok("pool", "create", "acme/p", "--flake", str(flake), "--profile", "minimal")
    for bad, line in ((("--builder", "foo"), "--builder must be vm or host (got 'foo')"),
                      (("--builder-mem", "10"), "--builder-mem must be between 512 and 16384 MiB"
                                                " (got 10)"),
                      (("--builder-cpus", "0"), "--builder-cpus must be between 1 and 8 (got 0)"),
                      (("--timeout", "0"), "--timeout must be positive (got 0)")):
        r = mvm("pool", "build", "acme/p", *bad)
        assert (r.rc, r.lines) == (2, [f"error: {line}"]), r
    assert _builds(mvm, "acme/p") == []
    good = mvm.ok("pool", "build", "acme/p", "--builder", "host").out.split("revision ")[1].split()[0]
    cur = mvm.home / "tenants/acme/pools/p/artifacts/current"

    def unchanged() -> None:
        assert os.readlink(cur) == f"revisions/{good}"
        assert json.loads(mvm.ok("pool", "info", "acme/p", "--json").out)["current"] == good
        assert _leftovers(mvm, "acme", "p") == []

    # a failing derivation: Nix's own error, with the builder's log lines
    (flake / "fail").write_text("")
    r = mvm("pool", "build", "acme/p", "--builder", "vm")
    assert r.rc == 7 and "mvm-test-derivation-failed" in r.err and "exit code 3" in r.err, r.err
    unchanged()
    # a syntax error
    (flake / "flake.nix").write_text("{ outputs = { self }: { \n")
    r = mvm("pool", "build", "acme/p", "--builder", "vm")
    assert r.rc == 7 and "syntax error" in r.err, r.err
    unchanged()
    # --timeout says so (a build that cannot finish in time, however fast the host)
    (flake / "flake.nix").write_text(FLAKE)
    (flake / "fail").unlink()
    (flake / "slow").write_text("")
    r = mvm("pool", "build", "acme/p", "--builder", "vm", "--timeout", "4")
    assert r.rc == 7 and "did not finish within 4s (--timeout)" in r.err, r.err
    unchanged()
    # Ctrl-C while the builder runs (SIGINT as a terminal sends it: not ignored, even when the
    # test itself runs as a background job)
    p = subprocess.Popen([sys.executable, "-m", "mvm.cli.main", "pool", "build", "acme/p",
                          "--builder", "vm"], env=mvm.env, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert p.stderr is not None
        seen = ""
        for line in p.stderr:
            seen += line
            if "builder: up" in line:
                p.send_signal(signal.SIGINT)
                break
        rest = p.communicate(timeout=120)[1]
        assert p.returncode == 130, seen + rest
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    unchanged()
    assert [s for _, s in _builds(mvm, "acme/p")] == ["ok", "failed", "failed", "failed", "failed"]


# -- the output archive, without a VM --------------------------------------------------------

def _archive(entries: list[tuple[bytes, bytes]], magic: bytes = archive.MAGIC,
             end: bytes = archive.END) -> bytes:
    out = io.BytesIO()
    out.write(magic)
    for header, data in entries:
        out.write(header + b"\n" + data)
    out.write(end)
    return out.getvalue()


def _entry(name: str, data: bytes, size: int | None = None, digest: str | None = None
           ) -> tuple[bytes, bytes]:
    sha = digest or hashlib.sha256(data).hexdigest()
    return f"{name} {len(data) if size is None else size} {sha}".encode(), data


RESULT = b'{"ok": true}\n'


@pytest.mark.parametrize("blob,why", [
    (b"", "wrote no result"),
    (_archive([_entry("result.json", RESULT), _entry("../etc/passwd", b"x")]), "malformed"),
    (_archive([_entry("result.json", RESULT), _entry("secrets.json", b"x")]), "unknown file"),
    (_archive([_entry("result.json", RESULT), _entry("initrd", b"a"), _entry("initrd", b"b")]),
     "twice"),
    (_archive([_entry("result.json", RESULT), _entry("initrd", b"abc", digest="0" * 64)]),
     "does not match its hash"),
    (_archive([_entry("result.json", RESULT), _entry("initrd", b"abc", size=10**11)]),
     "too large"),
    (_archive([_entry("initrd", b"abc")]), "no result.json"),
    (_archive([_entry("result.json", b"[1]")]), "not a result"),
])
def test_output_archive_reader_refuses_anything_but_known_files(
        tmp_path: Path, blob: bytes, why: str) -> None:
    disk = tmp_path / "out.img"
    disk.write_bytes(blob + b"\0" * 4096)
    dest = tmp_path / "rev"
    dest.mkdir()
    with pytest.raises(archive.BadOutput, match=why):
        archive.read_archive(disk, dest)
    assert os.listdir(dest) == []  # nothing half-written is kept


def test_output_archive_round_trip_and_kernel_formats(tmp_path: Path) -> None:
    (tmp_path / "k").write_bytes(b"\x7fELF\x02" + b"\0" * 2000)
    disk = tmp_path / "out.img"
    with disk.open("wb") as f:
        archive.write_archive(f, {"ok": True, "revision": "r"}, [("vmlinux", tmp_path / "k")])
        f.truncate(1 << 20)
    dest = tmp_path / "rev"
    dest.mkdir()
    result, files = archive.read_archive(disk, dest)
    assert result == {"ok": True, "revision": "r"} and sorted(os.listdir(dest)) == ["vmlinux"]
    assert files["vmlinux"] == hashlib.sha256((tmp_path / "k").read_bytes()).hexdigest()
    assert archive.check_kernel(dest / "vmlinux") == "elf"
    bz = bytearray(1024)
    bz[0x1FE:0x200] = b"\x55\xaa"
    bz[0x202:0x206] = b"HdrS"
    assert archive.kernel_format(bytes(bz)) == "bzimage"
    (tmp_path / "sh").write_bytes(b"#!/bin/sh\n" + b"\0" * 1024)
    with pytest.raises(archive.BadOutput, match="neither an ELF vmlinux nor a bzImage"):
        archive.check_kernel(tmp_path / "sh")


def test_the_input_disk_carries_the_job_under_the_name_the_builder_image_runs(tmp_path: Path) -> None:
    """The builder image's /mvm/init (its text is in the recipe, so installed images keep it)
    runs `python3 -m mvm.build.vm_job`: the input disk's code alone (standard library besides)
    reaches the job, now `mvm.builder.in_guest`, under that name, and every mvm module the
    shipped ones import (inside functions too) is shipped."""
    import ast
    import re
    import tarfile

    from mvm.builder import on_host, vm_image
    from mvm.image import source
    from mvm.model import Pool

    layout = Layout(tmp_path / "home", tmp_path / "run")
    layout.kernel_dir().mkdir(parents=True)
    (layout.kernel_dir() / "vmlinux").write_bytes(b"\x7fELF\x02")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "flake.nix").write_text("{ outputs = _: { }; }")
    ref = source.check_ref(str(tmp_path / "f"), layout)
    pool = Pool("acme", "w", ref, "p", 1, 256, flake_id=source.identity(ref))
    image = vm_image.BuilderInfo(tmp_path / "img", "v1", "", {}, 0, "", 0.0)
    net = {"address": "10.0.0.2/24", "gateway": "10.0.0.1", "dns": []}
    prep = on_host.prepare(layout, "", pool, image, net)
    indir = tmp_path / "in"
    with tarfile.open(prep.input) as tar:
        tar.extractall(indir)  # (mvm's own input disk; Debian 12's Python 3.11.2 has no filter=)
    run = re.search(r"python3 -m (\S+) /tmp/in", vm_image.INIT)
    assert run is not None
    env = {"PYTHONPATH": str(indir / "lib"), "PATH": os.environ["PATH"]}  # -S: no site-packages
    r = subprocess.run([sys.executable, "-S", "-m", run.group(1), str(tmp_path / "no-input")],
                       env=env, cwd=indir, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0  # reached the job's main, which found no job.json in that directory
    assert "lib/mvm/builder/in_guest.py" in r.stderr and "no-input/job.json" in r.stderr, r.stderr
    lib = indir / "lib"
    missing = []
    for f in sorted(lib.rglob("*.py")):  # imports inside functions too (the job's are lazy)
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mvm"):
                base = lib.joinpath(*node.module.split("."))  # a name of a module, or a module
                missing += [f"{f.relative_to(lib)}: {node.module}.{a.name}" for a in node.names
                            if not base.with_suffix(".py").is_file() and not (base / f"{a.name}.py").is_file()]
            elif isinstance(node, ast.Import):
                missing += [f"{f.relative_to(lib)}: {a.name}" for a in node.names if a.name.startswith("mvm")
                            and not lib.joinpath(*a.name.split(".")).with_suffix(".py").is_file()]
    assert missing == []


# -- hostile flakes through the builder microVM -----------------------------------------------

HOSTILE = """{
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.05";
  inputs.v = { url = "@INPUT@"; flake = false; };
  outputs = { self, nixpkgs, ... }@args: let pkgs = nixpkgs.legacyPackages.x86_64-linux; in {
    packages.x86_64-linux.p = pkgs.runCommand "hostile-@NONCE@" { } ''
      @SCRIPT@
    '';
  };
}
"""
# One build, each attack seen on its own: the derivation reading /etc/shadow and leaving a
# process behind, /usr and /tmp linked to host directories (kept as links; mvm's own /tmp).
# (A host path as an input is refused on the host before any builder boots: INPUT_ATTACK.)
ATTACKS = r"""
  mkdir -p $out/bin; echo good > $out/bin/good
  cat /etc/shadow > $out/read-shadow 2>&1 || echo "no /etc/shadow" >> $out/read-shadow
  ( exec -a leftover-@NONCE@ sleep 100000 ) </dev/null >/dev/null 2>&1 &
  ln -s @HOSTTMP@ $out/tmp; ln -s @HOSTDIR@ $out/usr
"""
INPUT_ATTACK = "mkdir $out; cat ${args.v}/shadow > $out/input-shadow"
# Each refused inside the builder (which has an /etc of its own to lead to), with the line the
# host builder gives (tests/test_build_hostile.py) and no trace of a crash.
VM_REFUSED = {
    "out-to-etc": "ln -s /etc $out",
    "initrd-out-of-store": "mkdir $out; printf '\\177ELF\\002' > $out/vmlinux; "
                           "ln -s /etc/shadow $out/initrd",
}


def _data_holds(disk: Path, needles: list[bytes]) -> list[bytes]:
    """Which needles a (sparse) disk image holds anywhere in its bytes."""
    found: set[bytes] = set()
    keep = max(map(len, needles))
    with disk.open("rb") as f:
        fd, pos, end = f.fileno(), 0, os.fstat(f.fileno()).st_size
        while pos < end:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            stop, tail = os.lseek(fd, pos, os.SEEK_HOLE), b""
            f.seek(pos)
            while pos < stop:
                chunk = tail + f.read(min(8 << 20, stop - pos))
                pos += len(chunk) - len(tail)
                found |= {n for n in needles if n in chunk}
                tail = chunk[-keep:]
    return sorted(found)


def _hostile(flake: Path, script: str, input_url: str, **subst: str) -> None:
    for k, v in subst.items():
        script = script.replace(f"@{k}@", v)
    flake.mkdir(exist_ok=True)
    text = HOSTILE if input_url else "\n".join(ln for ln in HOSTILE.splitlines() if "@INPUT@" not in ln)
    (flake / "flake.nix").write_text(text.replace("@SCRIPT@", script)
                                     .replace("@INPUT@", input_url)
                                     .replace("@NONCE@", secrets.token_hex(6)))


@vm_test
def test_hostile_flakes_through_the_builder_vm(mvm: Mvm, tmp_path: Path) -> None:
    try:
        _hostile_builds(mvm, tmp_path, make_victim(mvm, tmp_path))
    finally:
        _kill_guests_of(mvm.home)


def _hostile_builds(mvm: Mvm, tmp_path: Path, victim: tuple[Path, str]) -> None:
    vdir, token = victim
    hostdir, hosttmp = tmp_path / "host-usr", tmp_path / "host-tmp"
    hostdir.mkdir()
    host_file = f"host-file-{secrets.token_hex(8)}"
    (hostdir / "keep").write_text(host_file)
    hosttmp.mkdir(mode=0o700)
    shadow = Path("/etc/shadow")
    host_shadow = shadow.read_bytes()
    watched = modes(vdir, hostdir, hosttmp)
    etc = (Path("/etc").stat().st_mode, shadow.stat().st_mode, shadow.stat().st_mtime_ns)
    flake = tmp_path / "evil"
    _hostile(flake, ATTACKS, "", HOSTTMP=str(hosttmp), HOSTDIR=str(hostdir))
    nonce = (flake / "flake.nix").read_text().split("hostile-")[1][:12]
    (flake / "secrets.json").write_text(json.dumps({"api_key": token + "-own"}))
    mvm.ok("tenant", "create", "evil")
    mvm.ok("pool", "create", "evil/p", "--flake", str(flake), "--profile", "p")
    mvm.ok("pool", "build", "evil/p", "--builder", "vm")
    arts = mvm.home / "tenants/evil/pools/p/artifacts"
    good = os.readlink(arts / "current")
    image = arts / "current" / "rootfs.ext4"
    root = debugfs_ls(image, "/")
    tmp_line = next(ln for ln in root.splitlines() if ln.split()[-1:] == ["tmp"])
    assert tmp_line.split()[1] == "41777"  # mvm's own /tmp, a directory
    usr_line = next(ln for ln in root.splitlines() if ln.split()[-1:] == ["usr"])
    assert usr_line.split()[1].startswith("120")  # the profile's link, kept as a link
    # what the derivation could read: no /etc/shadow at all
    read = subprocess.run(["debugfs", "-R", "cat /read-shadow", str(image)], capture_output=True,
                          check=True).stdout
    assert read.endswith(b"no /etc/shadow\n") and host_shadow not in read, read

    for name, script in VM_REFUSED.items():
        _hostile(flake, script, "")
        r = mvm("pool", "build", "evil/p", "--builder", "vm")
        assert r.rc == 7 and len(r.errors) == 1, (name, r.err)
        assert "outside the build's closure (a profile's files must be in its own closure" \
            in r.errors[0] and "the builder failed" not in r.err, (name, r.errors)
        assert "Traceback" not in r.err, (name, r.err)
        assert os.readlink(arts / "current") == good, name
    # an input naming a host path (another tenant's directory, /etc): refused on the host, in
    # one line, before any builder boots (issue 16 item 4)
    for url in (f"path:{vdir}", "path:/etc"):
        _hostile(flake, INPUT_ATTACK, url)
        r = mvm("pool", "build", "evil/p", "--builder", "vm")
        assert r.rc != 0 and len(r.errors) == 1, r.err
        assert "names a host path outside the flake's directory" in r.errors[0], r.err
        assert os.readlink(arts / "current") == good
    assert [s for _, s in _builds(mvm, "evil/p")] == ["ok", "failed", "failed", "failed", "failed"]

    # no host file or mode changed, no process left, no byte of the host or the victim anywhere
    assert modes(vdir, hostdir, hosttmp) == watched
    assert (Path("/etc").stat().st_mode, shadow.stat().st_mode, shadow.stat().st_mtime_ns) == etc
    assert _leftovers(mvm, "evil", "p") == []
    assert not [p for p in filter(str.isdigit, os.listdir("/proc"))
                if nonce.encode() in _cmdline(p)]
    needles = [token.encode(), host_file.encode(), host_shadow]
    pool_dir = mvm.home / "tenants/evil/pools/p"
    for disk in [*arts.glob("revisions/*/*"), pool_dir / "builder" / "store.ext4"]:
        assert _data_holds(disk, needles) == [], disk
    logs = b"".join(p.read_bytes() for p in pool_dir.rglob("*.log"))
    assert all(n not in logs for n in needles)
    assert store_holds(token) == []  # the host's store: nothing of this tenant's reached it


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
