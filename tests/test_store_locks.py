"""The store and its locks as a user meets them: waits that say who is waited for, no lock
files left by destroyed tenants and pools, reads that work on a full disk, compare-and-set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mvm.errors import Conflict
from mvm.model import Action, Event, Instance, Op, Reason, State
from mvm.store import FileLocks, SqliteStore
from tests.conftest import Mvm

HOLD = """
import sys, time
from pathlib import Path
sys.argv = ["mvm", "pool", "scale"]
from mvm.store import FileLocks
with FileLocks(Path({dir!r})).lock({name!r}):
    Path({ready!r}).write_text("held")
    time.sleep({seconds})
"""


def hold(tmp: Path, locks: Path, name: str, seconds: float) -> subprocess.Popen[bytes]:
    ready = tmp / f"{name}.{time.monotonic_ns()}.ready"
    code = HOLD.format(dir=str(locks), name=name, ready=str(ready), seconds=seconds)
    p = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 10
    while not ready.exists():
        assert time.monotonic() < deadline, "the holder never got the lock"
        time.sleep(0.02)
    return p


def test_a_wait_says_who_holds_the_lock(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    holder = hold(tmp_path, locks, "pool-acme--w", 1.5)
    told: list[str] = []
    t0 = time.monotonic()
    with FileLocks(locks).lock("pool-acme--w", timeout=30, waiting=told.append):
        waited = time.monotonic() - t0
    holder.wait()
    assert told == [f"waiting for pool-acme--w: pid {holder.pid} (mvm pool scale) holds it"]
    assert waited >= 1.0  # it really waited for the holder
    with pytest.raises(Conflict, match=r"pool-acme--w is busy: pid \d+ \(mvm pool scale\) holds its lock"):
        h2 = hold(tmp_path, locks, "pool-acme--w", 3)
        try:
            with FileLocks(locks).lock("pool-acme--w", timeout=0.3):
                pass
        finally:
            h2.kill()
            h2.wait()


def test_a_removed_lock_is_not_shared_by_two_holders(tmp_path: Path) -> None:
    locks = FileLocks(tmp_path / "locks")
    order: list[str] = []
    with locks.lock("tenant-acme"):
        waiter = subprocess.Popen([sys.executable, "-c", f"""
import time
from pathlib import Path
from mvm.store import FileLocks
with FileLocks(Path({str(tmp_path / 'locks')!r})).lock("tenant-acme"):
    Path({str(tmp_path / 'got')!r}).write_text(str(time.monotonic()))
    time.sleep(1.0)
"""])
        time.sleep(0.5)  # the waiter now waits on the old file
        locks.remove("tenant-acme")  # its tenant was destroyed
    while not (tmp_path / "got").exists():
        time.sleep(0.02)
    # the waiter got the lock on a new file; a newcomer must wait for it, not share it
    t0 = time.monotonic()
    with locks.lock("tenant-acme", timeout=10):
        order.append(f"{time.monotonic() - t0:.1f}")
    waiter.wait()
    assert float(order[0]) >= 0.3


def test_destroyed_tenants_and_pools_leave_no_lock_files(mvm: Mvm) -> None:
    from mvm.model import Pool

    mvm.ok("tenant", "create", "acme")
    store = SqliteStore(mvm.home / "mvm.db")  # (no Nix here: pools go straight into the store)
    for name in ("w", "v"):
        store.add_pool(Pool("acme", name, "path:/x", "minimal", 1, 128))
    mvm.ok("instance", "create", "acme/w")
    mvm.ok("pool", "destroy", "acme/v")
    assert not (mvm.home / "locks" / "pool-acme--v.lock").exists()
    mvm.ok("tenant", "destroy", "acme", "--force")
    left = sorted(p.name for p in (mvm.home / "locks").glob("*acme*"))
    assert left == []


def test_compare_and_set_and_events_in_one_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mvm.model import Pool
    from mvm.services import context, tenants

    monkeypatch.setenv("MVM_HOME", str(tmp_path))
    store = SqliteStore(tmp_path / "mvm.db")
    tenants.create(context.host(store), "acme")

    store.add_pool(Pool("acme", "w", "x", "p", 1, 128))
    store.add_instance(Instance("i-00000001", "acme", "w", State.CREATED, None))
    op = Op(Action.START, State.RUNNING, State.CREATED, owner="pid 1 (test)")
    store.begin_op("i-00000001", op, Event("instance.start-begin", "booting", Reason.SCALE, "acme", "w", "i-00000001"))
    with pytest.raises(Conflict, match="in the middle of start"):
        store.begin_op("i-00000001", op)
    store.op_step("i-00000001", "boot")
    up = Event("instance.start", "up", Reason.SCALE, "acme", "w", "i-00000001")
    i = store.end_op("i-00000001", State.RUNNING, up)
    assert i.state is State.RUNNING and i.op is None
    with pytest.raises(Conflict, match="is running, not created"):
        store.begin_op("i-00000001", op)
    with pytest.raises(Conflict, match="is running, not warm"):
        store.update_instance("i-00000001", expect=State.WARM, state=State.SLEEPING)
    kinds = [(e["kind"], e["reason"]) for e in store.events("acme")]
    assert kinds[:2] == [("instance.start", "scale"), ("instance.start-begin", "scale")]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
def test_list_and_info_work_on_a_full_disk(tmp_path: Path) -> None:
    home = tmp_path / "full"
    home.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(home)], check=True)
    try:
        env = dict(os.environ, MVM_HOME=str(home), COLUMNS="200", NO_COLOR="1")

        def mvm(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "mvm.cli.main", *args], env=env,
                                  capture_output=True, text=True, stdin=subprocess.DEVNULL)

        assert mvm("tenant", "create", "acme").returncode == 0
        from mvm.model import Pool  # (no Nix here: the pool goes straight into the store)

        SqliteStore(home / "mvm.db").add_pool(Pool("acme", "w", "path:/x", "minimal", 1, 128))
        inst = mvm("instance", "create", "acme/w").stdout.strip()
        assert inst.startswith("acme/w/i-")
        fd = os.open(home / "filler", os.O_WRONLY | os.O_CREAT)  # fill the disk to the last byte
        try:
            for size in (65536, 4096, 1):
                while True:
                    try:
                        os.write(fd, b"\0" * size)
                    except OSError:
                        break
        finally:
            os.close(fd)
        with pytest.raises(OSError):
            (home / "probe").write_bytes(b"x" * 4096)
        r = mvm("instance", "list", "acme/w", "--json")
        assert r.returncode == 0, r.stderr
        assert [i["state"] for i in json.loads(r.stdout)] == ["created"]
        r = mvm("instance", "info", inst, "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["state"] == "created", r.stderr
        assert mvm("pool", "info", "acme/w", "--json").returncode == 0
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)
