"""Crash safety on real guests (QEMU under TCG here), driven through the CLI as a user would.

The command is killed with SIGKILL right after a step of sleep, wake or scale is recorded
(MVM_TEST_CRASH_AFTER); the next command must find a consistent state: no hidden QEMU, the
state matching what runs, no snapshot restored twice, and every line the guest synced before
the command still on its data disk.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from tests.conftest import Mvm, instances_by_state, needs_assets, sh

pytestmark = [pytest.mark.guest, pytest.mark.nix, needs_assets("kernel", "nixpkgs-offline")]


def qemus(inst: str) -> list[int]:
    """Every QEMU process of this instance, found through /proc (never via mvm's files)."""
    iid = inst.split("/")[-1]
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"qemu-system" in cmd and f"/{iid}/".encode() in cmd and state != "Z":
            out.append(int(pid))
    return out


def info(m: Mvm, inst: str) -> dict[str, object]:
    data: dict[str, object] = json.loads(m.ok("instance", "info", inst, "--json").out)
    return data


def crash(m: Mvm, at: str, *args: str) -> None:
    env = dict(m.env, MVM_TEST_CRASH_AFTER=at)
    saved, m.env = m.env, env
    try:
        r = m(*args)
    finally:
        m.env = saved
    assert r.rc == -9, f"{' '.join(args)} was not killed at {at}: rc={r.rc} {r.err}"


def consistent(m: Mvm, inst: str) -> str:
    """The state after the next command looked, checked against what really runs."""
    i = info(m, inst)
    assert i["transition"] is None and i["observed"] == "", i
    live = i["state"] in ("running", "warm")
    assert bool(qemus(inst)) == live, f"{i['state']} but QEMUs {qemus(inst)}"
    assert len(qemus(inst)) <= 1
    assert not list(Path("/dev/shm").glob(f"mvm-*/{inst.split('/')[-1]}.img"))
    return str(i["state"])


def back_to_running(m: Mvm, inst: str) -> None:
    state = str(info(m, inst)["state"])
    action = {"sleeping": "wake", "warm": "resume", "running": None}.get(state, "start")
    if action:
        m.ok("instance", action, inst)


# A sleep killed after its `prep` step, then execs, sleep and wake: the same path on a real
# guest is test_guest_agent_clock's test_cli_wake_after_a_killed_sleep (killed mid-snapshot);
# every sleep step on the fake runtime is test_lifecycle_faults'.
@pytest.mark.parametrize("step", ["snapshot"])
def test_sleep_killed_after_each_step(gmvm: Mvm, app_pool: None, step: str) -> None:
    gmvm.ok("pool", "scale", "acme/workers", "--running", "1")
    inst = instances_by_state(gmvm, "acme/workers")["running"][0]
    assert sh(gmvm, inst, "echo before-sleep >> /data/log && sync").rc == 0
    crash(gmvm, f"sleep:{step}", "instance", "sleep", inst)
    listed = info(gmvm, inst)
    assert listed["transition"] == "sleep" and "interrupted" in str(listed["observed"])
    r = gmvm.ok("instance", "observe", "acme/workers")
    assert "finished an interrupted sleep" in r.out
    want = "sleeping" if step == "snapshot" else "running"
    assert consistent(gmvm, inst) == want
    # the deterministic repro of lost wakes: a sleep killed after sleep-prep, then work, then
    # sleep and wake again — the guest must take exactly one clock setting
    back_to_running(gmvm, inst)
    for _ in range(2):
        assert sh(gmvm, inst, "echo exec").out == "exec\n"
    gmvm.ok("instance", "sleep", inst)
    gmvm.ok("instance", "wake", inst)
    assert consistent(gmvm, inst) == "running"
    assert sh(gmvm, inst, "cat /data/log").out == "before-sleep\n"
    assert abs(int(sh(gmvm, inst, "date +%s").out) - int(__import__("time").time())) <= 3


def test_wake_killed_after_each_step(gmvm: Mvm, app_pool: None) -> None:
    gmvm.ok("pool", "scale", "acme/workers", "--sleeping", "1")
    inst = instances_by_state(gmvm, "acme/workers")["sleeping"][0]
    lines: list[str] = []
    # One step before the snapshot is consumed (a real QEMU killed while it restores) and one
    # after (the guest runs on); every wake step is test_lifecycle_faults', on the fake runtime.
    for n, step in enumerate(["restore", "resume"]):
        snapshot = info(gmvm, inst)["snapshot"]
        crash(gmvm, f"wake:{step}", "instance", "wake", inst)
        gmvm.ok("instance", "observe", "acme/workers")
        state = consistent(gmvm, inst)
        if step == "restore":
            # the restored guest never ran: the same snapshot waits for the next wake
            assert state == "sleeping" and info(gmvm, inst)["snapshot"] == snapshot
            gmvm.ok("instance", "wake", inst)
        else:
            # consumed before the guest ran: never restored again; the guest runs on
            assert state == "running" and info(gmvm, inst)["snapshot"] is None
        assert consistent(gmvm, inst) == "running"
        assert sh(gmvm, inst, "cat /data/log 2>/dev/null").out.split() == lines
        lines.append(f"line-{n}")
        assert sh(gmvm, inst, f"echo line-{n} >> /data/log && sync").rc == 0
        gmvm.ok("instance", "sleep", inst)
    gmvm.ok("instance", "wake", inst)
    assert sh(gmvm, inst, "cat /data/log").out.split() == lines  # no write lost, none undone


@pytest.mark.net
def test_wake_killed_while_mkfs_makes_the_secrets_disk_leaves_no_secrets(
        gmvm: Mvm, app_pool: None, tmp_path: Path) -> None:
    from mvm.config.paths import Layout
    from mvm.util.retry import until
    from tests.conftest import SECRETS
    from tests.test_lifecycle_faults import killing_mkfs

    gmvm.ok("pool", "scale", "acme/workers", "--sleeping", "1")
    inst = instances_by_state(gmvm, "acme/workers")["sleeping"][0]
    shm = Layout(gmvm.home).secrets_runtime_dir()
    secret = SECRETS["API_KEY"].encode()
    bin_dir, done = killing_mkfs(tmp_path)
    # (a start killed there is test_lifecycle_faults', on the fake runtime, with the wake)
    for action, before in (("wake", "sleeping"),):
        saved = gmvm.env
        gmvm.env = dict(saved, PATH=f"{bin_dir}:{saved['PATH']}")
        try:
            r = gmvm("instance", action, inst)
        finally:
            gmvm.env = saved
        assert r.rc == -9, f"{action} was not killed while mkfs ran: rc={r.rc} {r.err}"
        until(lambda: done.exists() or None, 30, what="the orphaned mkfs")
        done.unlink()
        assert [p for p in shm.rglob("*") if p.is_file() and secret in p.read_bytes()] == []
        gmvm.ok("instance", "observe", "acme/workers")
        assert consistent(gmvm, inst) == before
        gmvm.ok("instance", action, inst)
        assert consistent(gmvm, inst) == "running"
        assert SECRETS["API_KEY"] in sh(gmvm, inst, "cat /run/secrets/secrets.json").out
        assert os.listdir(shm) == []  # the running hypervisor holds its image unlinked


@pytest.mark.net
def test_a_damaged_snapshot_is_refused_and_kept_and_the_instance_stays_sleeping(
        gmvm: Mvm, app_pool: None) -> None:
    from mvm.config.paths import Layout

    gmvm.ok("pool", "scale", "acme/workers", "--running", "1")
    inst = instances_by_state(gmvm, "acme/workers")["running"][0]
    assert sh(gmvm, inst, "echo before-sleep >> /data/log && sync").rc == 0
    # a file in the guest's RAM (tmpfs) whose pages are easy to find in the snapshot
    assert sh(gmvm, inst, "yes MVMPATTERN | head -c 1048576 > /run/pattern").rc == 0
    gmvm.ok("instance", "sleep", inst)
    name = info(gmvm, inst)["snapshot"]
    snap = Layout(gmvm.home).instance_dir("acme", "workers", inst.split("/")[-1]) / "snapshot" / str(name)
    memory = snap / "memory"
    # 10 x 512 bytes of guest pages, QEMU's stream around them intact: without the checksum,
    # this woke a guest whose /run/pattern is damaged
    data = bytearray(memory.read_bytes())
    run, at = b"MVMPATTERN\n" * 50, 0
    for _ in range(10):
        at = data.index(run, at + 8192)
        data[at:at + 512] = bytes(b ^ 0xFF for b in data[at:at + 512])
    memory.write_bytes(data)
    kept = bytes(data)
    r = gmvm("instance", "wake", inst)
    assert r.rc == 9 and len(r.errors) == 1 and r.lines[-1] == r.errors[0], r.err
    assert "is damaged" in r.errors[0] and "kept for inspection" in r.errors[0]
    assert consistent(gmvm, inst) == "sleeping"  # no QEMU left, nothing in flight
    i = info(gmvm, inst)
    assert i["snapshot"] == name and "is damaged" in str(i["error"])
    assert memory.read_bytes() == kept  # kept for inspection
    events = json.loads(gmvm.ok("events", "acme", "--json").out)
    assert events[-1]["kind"] == "instance.wake-failed" and "is damaged" in events[-1]["cause"]
    # what the hint says: stop discards it, a cold start keeps the data disk
    gmvm.ok("instance", "stop", inst)
    assert not snap.exists()
    gmvm.ok("instance", "start", inst)
    assert sh(gmvm, inst, "cat /data/log").out == "before-sleep\n"


def test_scale_killed_mid_boot_hides_nothing(gmvm: Mvm, app_pool: None) -> None:
    crash(gmvm, "start:boot", "pool", "scale", "acme/workers", "--running", "2")
    # a listing shows what runs without recording it; scale to 0 ends it all
    r = gmvm.ok("pool", "scale", "acme/workers", "--running", "0")
    assert "finished an interrupted start" in r.err
    for i in json.loads(gmvm.ok("instance", "list", "acme/workers", "--json").out):
        assert consistent(gmvm, i["address"]) in ("created", "stopped")
        assert qemus(i["address"]) == []
    crash(gmvm, "start:agent", "pool", "scale", "acme/workers", "--running", "2")
    gmvm.ok("pool", "scale", "acme/workers", "--running", "2")
    states = instances_by_state(gmvm, "acme/workers")
    assert len(states["running"]) == 2
    for inst in states["running"]:
        assert consistent(gmvm, inst) == "running" and sh(gmvm, inst, "echo ok").out == "ok\n"


def test_a_guest_that_dies_at_boot_fails_at_once_with_its_console(gmvm: Mvm, app_pool: None) -> None:
    rootfs = gmvm.home / "tenants/acme/pools/workers/artifacts/current/rootfs.ext4"
    rootfs.chmod(0o644)
    with open(rootfs, "r+b") as f:  # no ext4 superblock: the kernel cannot mount its root
        f.seek(1024)
        f.write(b"\0" * 4096)
    inst = gmvm.ok("instance", "create", "acme/workers").out.strip()
    r = gmvm("instance", "start", inst)
    assert r.rc != 0 and "the hypervisor exited while waiting for the guest agent" in r.err, r.err
    assert "console:" in r.err and ("panic" in r.err.lower() or "mount" in r.err.lower())
    assert consistent(gmvm, inst) == "created"


def test_runtime_dir_removed_under_running_guests(gmvm: Mvm, app_pool: None) -> None:
    gmvm.ok("pool", "scale", "acme/workers", "--running", "2")
    a, b = instances_by_state(gmvm, "acme/workers")["running"]
    assert sh(gmvm, a, "echo kept >> /data/log && sync").rc == 0
    run = Path(os.readlink(gmvm.home / f"tenants/acme/pools/workers/instances/{a.split('/')[-1]}/run")).parent
    shutil.rmtree(run)
    # the guests still run: nothing is failed or torn down under them
    gmvm.ok("instance", "observe", "acme/workers")
    for inst in (a, b):
        i = info(gmvm, inst)
        assert i["state"] == "running" and str(i["observed"]).startswith("unresponsive: ") and qemus(inst)
    gmvm.ok("instance", "stop", b)
    assert qemus(b) == [] and info(gmvm, b)["state"] == "stopped"
    r = gmvm.ok("instance", "destroy", a, "--keep-data")
    assert qemus(a) == [] and "data disk kept" in r.out
    gmvm.ok("instance", "start", b)
    assert consistent(gmvm, b) == "running"


CYCLES = 5  # (fifty, where they cost milliseconds: test_lifecycle_faults, on the fake runtime)


def test_sleep_wake_cycles_under_concurrent_exec_and_list(gmvm: Mvm, app_pool: None) -> None:
    gmvm.ok("pool", "scale", "acme/workers", "--running", "1")
    inst = instances_by_state(gmvm, "acme/workers")["running"][0]
    stop = threading.Event()
    seen = {"exec-ok": 0, "exec-refused": 0, "list": 0, "other": []}

    def pester() -> None:
        while not stop.is_set():
            r = sh(gmvm, inst, "echo hi")
            if r.rc == 0 and r.out == "hi\n":
                seen["exec-ok"] += 1  # type: ignore[operator]
            elif r.rc == 125 and ("it is sleeping" in r.err or "in flight" in r.err):
                seen["exec-refused"] += 1  # type: ignore[operator]  (the command did not start)
            else:
                seen["other"].append(r.err.strip())  # type: ignore[attr-defined]
            gmvm.ok("instance", "list", "acme/workers", "--json")
            seen["list"] += 1  # type: ignore[operator]

    t = threading.Thread(target=pester)
    t.start()
    failed_wakes = []
    try:
        for n in range(CYCLES):
            gmvm.ok("instance", "sleep", inst)
            r = gmvm("instance", "wake", inst)
            if r.rc != 0:
                failed_wakes.append((n, r.err.strip()))
                break
    finally:
        stop.set()
        t.join()
    print(f"\n{CYCLES} cycles: failed wakes {len(failed_wakes)}, concurrent execs ok {seen['exec-ok']}, "
          f"refused {seen['exec-refused']}, lists {seen['list']}")
    assert failed_wakes == []
    assert consistent(gmvm, inst) == "running"
    assert seen["exec-ok"] > 0 and seen["list"] > 0
    assert seen["other"] == []  # (before: "the hypervisor exited during exec", exit 9, for 2 in 51)
