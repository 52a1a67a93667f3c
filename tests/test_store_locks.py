"""The store and its locks as a user meets them: no lock files left by destroyed tenants and
pools, reads that work on a full disk. (What every Store and Locks must do — compare-and-set,
events in the change's transaction, fencing, waits that say who is waited for — is the
contract suite, tests/test_store_contract.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mvm.store import SqliteStore
from tests.conftest import Mvm


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
