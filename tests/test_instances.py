"""Instances for real: guests booted under QEMU (TCG here), driven through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import SECRETS, Mvm, instances_by_state, needs_assets, setup_pool, sh

pytestmark = [pytest.mark.guest, pytest.mark.nix, needs_assets("kernel", "nixpkgs-offline")]

def wait_for(fn, timeout: float = 30.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def checksum(m: Mvm, inst: str) -> str:
    r = sh(m, inst, "sha256sum /data/blob")
    assert r.rc == 0, r.err
    return r.out.split()[0]


def test_guide_flow_scale_data_secrets_and_service(gmvm: Mvm, app_pool: None) -> None:
    r = gmvm.ok("pool", "scale", "acme/workers", "--running", "2", "--warm", "1", "--sleeping", "1")
    assert "created" in r.err  # each action is reported
    states = instances_by_state(gmvm, "acme/workers")
    assert {k: len(v) for k, v in states.items()} == {"running": 2, "warm": 1, "sleeping": 1}
    listing = json.loads(gmvm.ok("instance", "list", "acme/workers", "--json").out)
    assert all({"id", "pool", "state", "revision"} <= set(i) for i in listing)

    inst = states["running"][0]
    mounts = sh(gmvm, inst, "cat /proc/mounts").out
    data = [ln.split() for ln in mounts.splitlines() if ln.split()[1] == "/data"]
    assert data and data[0][2] == "ext4" and data[0][3].startswith("rw")
    sec = [ln.split() for ln in mounts.splitlines() if ln.split()[1] == "/run/secrets"]
    assert sec and sec[0][3].startswith("ro")
    assert json.loads(sh(gmvm, inst, "cat /run/secrets/secrets.json").out) == SECRETS
    assert sh(gmvm, inst, "stat -c %a /run/secrets/secrets.json").out.strip() == "400"
    r = sh(gmvm, inst, "echo x > /run/secrets/new")
    assert r.rc != 0  # read-only

    # The guide's "Adding Services" unit runs after boot, and Restart=always restarts it.
    pid = wait_for(lambda: sh(gmvm, inst, "cat /run/my-app.pid").out.strip(), what="my-app")
    assert sh(gmvm, inst, f"kill -9 {pid}").rc == 0
    new = wait_for(lambda: (p := sh(gmvm, inst, "cat /run/my-app.pid").out.strip()) != pid and p,
                   what="my-app restarted")
    assert new != pid
    assert sh(gmvm, inst, "wc -l < /run/my-app.log").out.strip() == "2"

    # exec: the guest's exit code, stdout and stderr kept apart
    r = gmvm("instance", "exec", inst, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.rc, r.out, r.err.strip()) == (7, "out\n", "err")

    # the same counts again change nothing
    r = gmvm.ok("pool", "scale", "acme/workers", "--running", "2", "--warm", "1", "--sleeping", "1")
    assert "already at" in r.err
    assert instances_by_state(gmvm, "acme/workers") == states


def test_data_survives_warm_sleep_and_stop(gmvm: Mvm, app_pool: None) -> None:
    gmvm.ok("pool", "scale", "acme/workers", "--running", "1")
    inst = instances_by_state(gmvm, "acme/workers")["running"][0]
    assert sh(gmvm, inst, "head -c 1048576 /dev/urandom > /data/blob").rc == 0
    want = checksum(gmvm, inst)
    for down, up in (("warm", "resume"), ("sleep", "wake"), ("stop", "start")):
        gmvm.ok("instance", down, inst)
        gmvm.ok("instance", up, inst)
        assert checksum(gmvm, inst) == want, f"after {down}/{up}"
    info = json.loads(gmvm.ok("instance", "info", inst, "--json").out)
    assert Path(info["data_disk"]).exists()


def test_wake_restores_memory_and_resyncs_the_clock(gmvm: Mvm, app_pool: None) -> None:
    gmvm.ok("pool", "scale", "acme/workers", "--running", "1")
    inst = instances_by_state(gmvm, "acme/workers")["running"][0]
    sh(gmvm, inst, "(i=0; while :; do i=$((i+1)); echo $i > /run/count; sleep 0.2; done) >/dev/null 2>&1 &")
    before = int(wait_for(lambda: sh(gmvm, inst, "cat /run/count").out.strip(), what="counter"))
    boot_id = sh(gmvm, inst, "cat /proc/sys/kernel/random/boot_id").out
    gmvm.ok("instance", "sleep", inst)
    assert instances_by_state(gmvm, "acme/workers") == {"sleeping": [inst]}
    time.sleep(3)  # the guest's clock stands still while it sleeps
    gmvm.ok("instance", "wake", inst)
    after = int(sh(gmvm, inst, "cat /run/count").out.strip())
    assert after >= before  # kept its count: memory restored, not a reboot
    assert sh(gmvm, inst, "cat /proc/sys/kernel/random/boot_id").out == boot_id
    guest = int(sh(gmvm, inst, "date +%s").out.strip())
    assert abs(guest - time.time()) <= 2


def test_updating_images_and_rollback(gmvm: Mvm, flake_copy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    flake = flake_copy("app-flake")
    setup_pool(gmvm, flake, tmp_path)
    gmvm.ok("pool", "scale", "acme/workers", "--running", "1")
    old = instances_by_state(gmvm, "acme/workers")["running"][0]
    rev1 = json.loads(gmvm.ok("instance", "info", old, "--json").out)["revision"]
    text = (flake / "flake.nix").read_text()
    (flake / "flake.nix").write_text(text.replace("bash coreutils curl\n", "bash coreutils curl wget\n", 1))
    gmvm.ok("pool", "build", "acme/workers")  # while the instance runs
    rev2 = json.loads(gmvm.ok("pool", "info", "acme/workers", "--json").out)["current"]
    assert rev2 != rev1
    assert json.loads(gmvm.ok("instance", "info", old, "--json").out)["revision"] == rev1
    assert sh(gmvm, old, "test -e /bin/wget").rc == 1
    gmvm.ok("pool", "scale", "acme/workers", "--running", "2")
    new = next(i for i in instances_by_state(gmvm, "acme/workers")["running"] if i != old)
    assert json.loads(gmvm.ok("instance", "info", new, "--json").out)["revision"] == rev2
    assert sh(gmvm, new, "test -e /bin/wget").rc == 0
    gmvm.ok("pool", "rollback", "acme/workers", "--revision", rev1)
    gmvm.ok("instance", "stop", new)
    gmvm.ok("instance", "start", new)
    assert json.loads(gmvm.ok("instance", "info", new, "--json").out)["revision"] == rev1
    assert sh(gmvm, new, "test -e /bin/wget").rc == 1
    # gc keeps every revision an instance uses
    gmvm.ok("pool", "gc", "acme/workers", "--keep", "0")
    revs = {r["revision"] for r in json.loads(gmvm.ok("pool", "revisions", "acme/workers", "--json").out)}
    assert rev1 in revs


def running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def qemu_pid(m: Mvm, inst: str) -> int:
    t, p, i = inst.split("/")
    return int((m.home / f"tenants/{t}/pools/{p}/instances/{i}/run/qemu.pid").read_text())


def test_killed_hypervisor_is_failed_and_scale_restores(gmvm: Mvm, app_pool: None) -> None:
    gmvm.ok("pool", "scale", "acme/workers", "--running", "1")
    victim = instances_by_state(gmvm, "acme/workers")["running"][0]
    os.kill(qemu_pid(gmvm, victim), signal.SIGKILL)
    time.sleep(0.5)
    # a listing only looks: it shows what the hypervisor says and changes nothing
    listed = {i["address"]: i for i in json.loads(gmvm.ok("instance", "list", "acme/workers", "--json").out)}
    assert listed[victim]["state"] == "running" and listed[victim]["observed"] == "hypervisor gone"
    assert "hypervisor gone" in gmvm.ok("instance", "list", "acme/workers").out
    r = gmvm.ok("instance", "observe", "acme/workers")  # observing is explicit
    assert f"{victim.split('/')[-1]}: failed: hypervisor process exited unexpectedly" in r.out
    states = instances_by_state(gmvm, "acme/workers")
    assert victim not in states.get("running", []) and victim in states.get("failed", [])
    gmvm.ok("pool", "scale", "acme/workers", "--running", "1")
    states = instances_by_state(gmvm, "acme/workers")
    assert states == {"running": [victim]}
    assert sh(gmvm, victim, "echo alive").out == "alive\n"
    # (a hypervisor left behind a `stopped` row by a command that crashed after booting: ended
    # by the next command, on the fake runtime in test_lifecycle_faults'
    # test_a_hidden_hypervisor_is_ended_and_scale_sees_it, on a real one in test_lifecycle_real's
    # test_scale_killed_mid_boot_hides_nothing)


def leftovers(m: Mvm, inst: str) -> list[str]:
    t, p, i = inst.split("/")
    run = m.home / f"tenants/{t}/pools/{p}/instances/{i}/run"
    kept = ("console.log", "console.log.1", "qemu.log")
    found = [str(f) for f in run.glob("*") if f.name not in kept] if run.exists() else []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if str(run).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(f"process {pid}")
            except OSError:
                pass
    found += [str(f) for f in Path("/dev/shm").glob(f"mvm-*/{i}.img")]
    links = subprocess.run(["ip", "-n", m.ns or "", "-o", "link"], capture_output=True, text=True).stdout
    found += [f"tap {ln.split(':')[1].strip()}" for ln in links.splitlines() if f"mvt{i[2:]}" in ln]
    return found


def test_a_failed_start_changes_nothing_and_leaves_nothing(gmvm: Mvm, app_pool: None) -> None:
    """(The refusals of illegal transitions, once here too, are test_cli_show's, on the fake
    runtime: they are the lifecycle's, the same on any runtime. What a real hypervisor that
    refuses its kernel leaves behind is this test's.)"""
    running = gmvm.ok("instance", "create", "acme/workers").out.strip()
    before = instances_by_state(gmvm, "acme/workers")
    # a start that fails half-way (the hypervisor refuses the kernel) leaves nothing behind
    cur = gmvm.home / "tenants/acme/pools/workers/artifacts/current"
    kernel = cur / "vmlinux"
    good = kernel.read_bytes()
    kernel.write_bytes(b"not a kernel")
    try:
        r = gmvm("instance", "start", running)
        assert r.rc != 0 and len(r.errors) == 1, r.err  # (step progress lines come before it)
        assert instances_by_state(gmvm, "acme/workers") == before == {"created": [running]}
        assert leftovers(gmvm, running) == []
    finally:
        kernel.write_bytes(good)
    gmvm.ok("instance", "start", running)
    assert sh(gmvm, running, "echo ok").out == "ok\n"


def test_destroy_keep_data_and_secret_rotation(gmvm: Mvm, app_pool: None, tmp_path: Path) -> None:
    gmvm.ok("pool", "scale", "acme/workers", "--running", "1", "--sleeping", "1")
    states = instances_by_state(gmvm, "acme/workers")
    running, sleeping = states["running"][0], states["sleeping"][0]
    (tmp_path / "new.json").write_text(json.dumps({"API_KEY": "rotated"}))
    gmvm.ok("tenant", "secrets", "set", "acme", "--from-file", str(tmp_path / "new.json"))
    # the running instance keeps what it had until restarted or woken
    assert json.loads(sh(gmvm, running, "cat /run/secrets/secrets.json").out) == SECRETS
    r = gmvm.ok("tenant", "secrets", "rotate", "acme")
    assert running in r.out and sleeping in r.out and "rotated" not in r.out
    gmvm.ok("instance", "wake", sleeping)
    assert json.loads(sh(gmvm, sleeping, "cat /run/secrets/secrets.json").out) == {"API_KEY": "rotated"}
    gmvm.ok("tenant", "secrets", "rotate", "acme", "--restart")
    assert json.loads(sh(gmvm, running, "cat /run/secrets/secrets.json").out) == {"API_KEY": "rotated"}
    assert gmvm.ok("tenant", "secrets", "rotate", "acme").out.startswith("every instance")

    sh(gmvm, running, "echo keep-me > /data/note")
    r = gmvm.ok("instance", "destroy", running, "--keep-data")
    kept = Path(r.out.split("kept at ")[1].strip())
    assert kept.exists()
    assert "keep-me" in subprocess.run(["debugfs", "-R", "cat /note", str(kept)], capture_output=True,
                                       text=True).stdout
    gmvm.ok("instance", "destroy", sleeping)
    assert instances_by_state(gmvm, "acme/workers") == {}
    t, p, i = sleeping.split("/")
    assert not (gmvm.home / f"tenants/{t}/pools/{p}/instances/{i}").exists()
