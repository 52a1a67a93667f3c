"""What the read commands print for a person: `pool info` (and the other `info`s) in readable
lines — local times, nested values on lines of their own, no Python reprs — with `--json`
unchanged; and a stopped instance's `observed` column, which no longer carries why it had
failed. The real CLI on the fake runtime (DOUBLE: tests/doubles/fake_runtime.py) through the
test seam MVM_TEST_RUNTIME (`FakeRuntime.seam`)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys

from mvm.lifecycle import specs
from mvm.model import State
from mvm.util import pids
from tests.conftest import REPO, Result
from tests.doubles.fake_runtime import FakeRuntime
from tests.test_lifecycle_faults import World, world  # noqa: F401 (a fixture)

# What printing a Python value shows: a dict or list repr, None, an epoch float.
PYTHON_REPR = re.compile(r"\{'|\['|\bNone\b|\b\d{10}\.\d+\b")


def cli(w: World, *args: str) -> Result:
    env = dict(os.environ, MVM_HOME=str(w.root / "home"), MVM_RUNTIME_DIR=str(w.root / "run"),
               MVM_TEST_RUNTIME=FakeRuntime.seam(w.ledger), COLUMNS="200", NO_COLOR="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]))
    p = subprocess.run([sys.executable, "-m", "mvm.cli.main", *args], capture_output=True, text=True,
                       env=env, timeout=300, stdin=subprocess.DEVNULL)
    return Result(p.returncode, p.stdout, p.stderr)


def local(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def test_pool_info_is_readable_and_its_json_unchanged(world: World) -> None:  # noqa: F811
    store = world.ctx.store
    ok = store.start_build("acme", "w", "/var/log/b1.log", "vm")
    store.finish_build(ok, "succeeded", "abc123", cache_hit=True)
    bad = store.start_build("acme", "w", "/var/log/b2.log", "host")
    store.finish_build(bad, "failed", error="nix build failed\nerror: attribute 'nope' missing")
    ref = world.new(State.RUNNING)

    r = cli(world, "pool", "info", "acme/w", "--json")
    assert r.rc == 0, r.err
    info = json.loads(r.out)  # the machine's view: the record as it is, epoch seconds
    assert isinstance(info["created"], float) and info["builds"][0]["status"] == "succeeded"
    assert info["instances"] == [{"id": ref.instance, "state": "running", "revision": "abc123"}]

    r = cli(world, "pool", "info", "acme/w")
    assert (r.rc, r.err) == (0, ""), r.err
    lines = r.out.splitlines()
    assert [ln for ln in lines if PYTHON_REPR.search(ln)] == []
    assert f"created: {local(info['created'])}" in lines
    assert "flake: path:/nonexistent" in lines and "current: abc123" in lines
    assert "desired: running=0 warm=0 sleeping=0" in lines and "idle policy: none" in lines
    b1, b2 = info["builds"]
    at = lines.index("builds:")
    assert lines[at + 1].startswith(f"  #{b1['id']} succeeded {local(b1['started'])}, took ")
    assert lines[at + 1].endswith("builder vm: revision abc123 (no change, cache hit)")
    assert lines[at + 2] == "    log: /var/log/b1.log"
    assert lines[at + 3].startswith(f"  #{b2['id']} failed {local(b2['started'])}, took ")
    # an error of several lines, each on its own line under its build
    assert lines[at + 4:at + 7] == ["    error: nix build failed", "      error: attribute 'nope' missing",
                                    "    log: /var/log/b2.log"]
    assert lines[at + 7:] == ["instances:", f"  {ref.instance}  running  revision abc123"]

    # the other `info`s: nested values on lines of their own, no Python reprs
    for args in (("tenant", "info", "acme"), ("instance", "info", str(ref))):
        r = cli(world, *args)
        assert r.rc == 0, r.err
        assert [ln for ln in r.out.splitlines() if PYTHON_REPR.search(ln)] == [], r.out
    tenant = cli(world, "tenant", "info", "acme").out.splitlines()
    assert tenant[tenant.index("quotas:") + 1].startswith("  max_")


def test_a_stopped_instance_no_longer_shows_why_it_had_failed(world: World) -> None:  # noqa: F811
    ref = world.new(State.RUNNING)
    pid = FakeRuntime(world.ledger).pid(specs.control_spec(world.ctx.layout, world.instance(ref)))
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # the hypervisor dies
    assert pids.wait_gone(pid, 30)
    assert cli(world, "instance", "observe", "acme/w").rc == 0
    failed = cli(world, "instance", "list", "acme/w").out.splitlines()[1].split(None, 4)
    assert failed[1] == "failed" and failed[4] == "hypervisor process exited unexpectedly"

    r = cli(world, "instance", "stop", str(ref))
    assert r.rc == 0, r.err
    row = cli(world, "instance", "list", "acme/w").out.splitlines()[1].split()
    assert row[:2] == [str(ref), "stopped"] and len(row) == 4, row  # nothing in `observed`
    assert json.loads(cli(world, "instance", "info", str(ref), "--json").out)["error"] is None
    # why it had failed stays where it happened: in its events
    r = cli(world, "events", "acme", "--json", "-n", "100")
    assert any(e["kind"] == "instance.failed" and e["cause"] == "hypervisor process exited unexpectedly"
               for e in json.loads(r.out))


def states(w: World) -> dict[str, str]:
    return {i.id: i.state.value for i in w.ctx.store.instances("acme", "w")}


def test_illegal_transitions_are_one_line_and_change_nothing(world: World) -> None:  # noqa: F811
    """(On real guests in test_instances before: the refusals are the lifecycle's and the line
    the CLI's, the same on any runtime; a real failed start is still there.)"""
    stopped, sleeping = world.new(State.STOPPED), world.new(State.SLEEPING)
    before = states(world)
    for args, words in [
        (("instance", "sleep", str(stopped)), "cannot sleep"),
        (("instance", "wake", str(stopped)), "cannot wake"),
        (("instance", "exec", str(sleeping), "--", "true"), "it is sleeping"),
        (("instance", "resume", str(sleeping)), "cannot resume"),
        (("pool", "scale", "acme/w", "--running", "9"), "quota"),
        (("pool", "scale", "acme/w", "--warm", "5"), "quota"),
        (("instance", "start", "acme/w/i-00000000"), "no instance"),
    ]:
        r = cli(world, *args)
        assert r.rc != 0, args
        assert len(r.lines) == 1, r.err
        assert words in r.err, r.err
        assert states(world) == before
    assert cli(world, "instance", "start", str(stopped)).rc == 0
    assert states(world)[stopped.instance] == "running"


def test_single_instance_commands_respect_quotas(world: World) -> None:  # noqa: F811
    """(On a real guest in test_instances before: admission is the lifecycle's, before any
    hypervisor runs.)"""
    from dataclasses import replace

    from mvm.model import Quotas

    t = world.ctx.store.tenant("acme")
    world.ctx.store.remove_tenant("acme")
    world.ctx.store.add_tenant(replace(t, quotas=Quotas(max_running=1, max_warm=0)))
    a = cli(world, "instance", "create", "acme/w").out.strip()
    b = cli(world, "instance", "create", "acme/w").out.strip()
    assert cli(world, "instance", "start", a).rc == 0
    before = states(world)
    for args in (("instance", "start", b), ("instance", "warm", a)):
        r = cli(world, *args)
        assert r.rc != 0 and len(r.lines) == 1 and "quota" in r.err, r.err
        assert states(world) == before
    assert cli(world, "instance", "stop", b).rc == 0
    assert cli(world, "instance", "stop", b).rc == 0  # stopping a stopped instance is fine
    ida, idb = a.split("/")[-1], b.split("/")[-1]
    assert states(world) == {ida: "running", idb: "stopped"}
