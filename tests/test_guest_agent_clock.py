"""The guest agent's clock setter, against real guests (QEMU, TCG).

sleep-prep forks a clock setter before the snapshot (so that a wake needs no fork right
after a restore, when every fork is slow under TCG) and wake hands it the host's time.
These tests drive the protocol the way mvm's commands do, including the host going away
between sleep-prep and wake (a killed `instance sleep`, then `resume`, `exec`s, `sleep`,
`wake`), and check what matters: the wake succeeds, the guest clock is right, and there
is never more than one setter in the guest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mvm.errors import GuestError
from mvm.image.kernel import KernelInfo
from tests.conftest import Mvm, instances_by_state, needs_assets, sh
from tests.doubles import agent_protocol as proto
from tests.doubles.agent_protocol import Answer
from tests.test_guest_boot import SECRETS, Guest, make_rootfs, make_secrets, mkfs, wait_for

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU"),
]

CLOCK_FIFO = "/run/mvm/agent/clock"
# Every process: pid|ppid|state|wchan|open fds on the clock FIFO|cmdline
PROCS = r"""
for p in /proc/[0-9]*; do
	read -r pid _ st ppid _ <"$p/stat" 2>/dev/null || continue
	w=$(cat "$p/wchan" 2>/dev/null)
	n=$(ls -l "$p/fd" 2>/dev/null | grep -cE "CLOCK_FIFO( \(deleted\))?$")
	a=$(tr '\0\n' '  ' <"$p/cmdline" 2>/dev/null)
	echo "$pid|$ppid|$st|$w|$n|$a"
done
""".replace("CLOCK_FIFO", CLOCK_FIFO)


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    wchan: str
    clock_fds: int
    cmdline: str

    @property
    def is_clock_setter(self) -> bool:
        """Waiting to open the clock FIFO, holding it, or already running `date`."""
        return (self.wchan == "wait_for_partner" or self.clock_fds > 0
                or self.cmdline.startswith("date "))


def procs(g: Guest) -> list[Proc]:
    out = []
    for line in g.sh(PROCS).splitlines():
        pid, ppid, state, wchan, fds, cmd = line.split("|", 5)
        out.append(Proc(int(pid), int(ppid), state, wchan, int(fds or 0), cmd.strip()))
    return out


def setters(g: Guest) -> list[Proc]:
    return [p for p in procs(g) if p.is_clock_setter]


def skew(g: Guest) -> float:
    """Guest clock minus host clock, in seconds (the guest's to the second)."""
    return int(g.sh("date +%s")) - time.time()


def set_guest_clock(g: Guest, offset: float) -> None:
    """Set the guest clock to the host's plus offset, with the guest's own date."""
    g.sh(f"date -s @{int(time.time() + offset)} >/dev/null")


def last_pid(g: Guest) -> int:
    """The last pid the guest kernel handed out (a counter of forks)."""
    return int(g.agent.exec(["cat", "/proc/loadavg"], timeout=10).stdout.split()[4])


def reader(g: Guest) -> int:
    """The pid of the agent's `cat` on the port: a new one each time its read loop starts."""
    cats = [p.pid for p in procs(g) if p.cmdline == "cat" and p.wchan == "port_fops_read"]
    assert len(cats) == 1, cats
    return cats[0]


def reconnect(g: Guest) -> None:
    """The host goes away (a CLI command ends, or is killed) and a new one connects, late
    enough that the guest saw it go: the agent's read loop starts over. (A quick
    reconnect can go unnoticed by the guest.)"""
    before = reader(g)
    for pause in (0.5, 1, 2, 4, 8):
        g.agent.close()
        time.sleep(pause)
        if reader(g) != before:
            return
    pytest.fail("the agent's read loop did not start over after the host went away")


def alone(g: Guest, verb: str, *args: str) -> tuple[bool, Answer]:
    """One request on a connection of its own, as each mvm command makes one, a second after
    the last one ended (so that the guest saw the host go). Returns whether the agent said
    `* hello` first (it does when its read loop starts over) and the answer. A wake without
    arguments gets the time it goes out."""
    g.agent.close()
    time.sleep(1)
    with contextlib.closing(g.agent.channel.connect(10)) as s:
        s.settimeout(30)
        if verb == "wake" and not args:
            args = (f"{time.time():.6f}",)
        s.sendall(proto.RESYNC + proto.request("r1", verb, *args).encode() + b"\n")
        hello = False
        for line in proto.lines(s):
            answer = Answer.parse(line)
            if answer is None:
                hello = True
            elif answer.rid == "r1":
                return hello, answer
        pytest.fail(f"the agent hung up on {verb}")


def last_pid_alone(g: Guest) -> int:
    """last_pid, asked on a connection of its own that the agent saw as new."""
    hello, answer = alone(g, "exec", "10", proto.b64("cat"), proto.b64("/proc/loadavg"))
    assert hello, "the agent did not see the host go"
    assert answer.ok and answer.exit_code == 0, answer
    return int(answer.stdout.split()[4])


def assert_wake_sets_the_clock(g: Guest) -> None:
    try:
        g.agent.wake()
    except GuestError as e:
        pytest.fail(f"wake failed: {e}; clock setters in the guest: {setters(g)}")
    assert abs(skew(g)) <= 2, "the wake did not set the guest clock"
    left = setters(g)
    assert not left, f"clock setters left after the wake: {left}"


# ---------------------------------------------------------------------------- fixtures


def make_guest(kernel: KernelInfo, d: Path) -> Guest:
    root = make_rootfs(d / "root.ext4", d / "root-staging")
    data = d / "data.ext4"
    mkfs(data, "mvm-data", "64M")
    secrets = make_secrets(d / "secrets.ext4", d / "secrets-staging", SECRETS)
    return Guest(kernel, d, [(root, True), (data, False), (secrets, True)])


@pytest.fixture(scope="module")
def guest(kernel: KernelInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    g = make_guest(kernel, tmp_path_factory.mktemp("guest"))
    g.start()
    yield g
    g.kill()


@pytest.fixture
def restorable(kernel: KernelInfo, tmp_path: Path) -> Iterator[Guest]:
    g = make_guest(kernel, tmp_path)
    yield g
    g.kill()


# ---------------------------------------------------------------------------- tests


def test_sleep_prep_across_reconnects_keeps_one_setter(guest: Guest) -> None:
    """sleep-prep, the host goes away, sleep-prep again (three times over): one setter,
    and the wake gets the time to it."""
    g = guest
    set_guest_clock(g, -1000)
    for _ in range(3):
        g.agent.sleep_prep()
        reconnect(g)
    g.agent.sleep_prep()
    armed = setters(g)
    assert len(armed) <= 1, f"more than one clock setter: {armed}"
    assert_wake_sets_the_clock(g)


def test_wake_with_an_armed_setter_forks_nothing(guest: Guest) -> None:
    g = guest
    set_guest_clock(g, -100)
    # Forks of one `exec cat /proc/loadavg`, when nothing else happens in between.
    a = last_pid(g)
    base = last_pid(g) - a
    g.agent.sleep_prep()
    before = last_pid(g)
    g.agent.wake()
    forks = last_pid(g) - before - base
    assert forks == 0, f"the wake forked {forks} processes"
    assert abs(skew(g)) <= 2


def test_connections_without_an_exec_fork_nothing(guest: Guest) -> None:
    """Every mvm command connects anew, and a wake always does (the restored VM's QEMU is
    new): the agent serves ping, sleep-prep and wake on a new connection without a fork,
    because right after a restore every fork is slow under TCG (the reader pipeline the
    agent started for each connection cost a wake ~0.1 s). Only an exec starts it."""
    g = guest
    wait_for(lambda: "flaky.service exited (0)" in g.console(), 30, "the services to settle")
    g.agent.wake()  # no setter armed: the sleep-prep below forks one
    set_guest_clock(g, -100)
    a = last_pid_alone(g)
    per_exec = last_pid_alone(g) - a  # forks of an exec on a connection of its own
    before = last_pid_alone(g)
    for verb, args in (("ping", ["n0nce"]), ("sleep-prep", []), ("wake", []),
                       ("ping", ["n0nce"])):
        hello, answer = alone(g, verb, *args)
        assert hello, f"{verb}: the agent did not see the host go"
        assert answer.ok and answer.fields == args, (verb, answer)
    # less sleep-prep's `sync` and clock setter (before a snapshot: no hurry there)
    forks = last_pid_alone(g) - before - per_exec - 2
    assert forks == 0, f"four connections without an exec forked {forks} processes"
    assert abs(skew(g)) <= 2
    assert not setters(g)


def test_a_late_wake_never_steps_the_clock_back(guest: Guest) -> None:
    """A wake whose time is older than the guest clock (it waited behind other requests,
    e.g. the wake after a failed sleep) leaves the clock alone; a newer time is set."""
    g = guest
    set_guest_clock(g, 0)
    g.agent.sleep_prep()
    g.agent.wake(now=time.time() - 19)
    assert skew(g) > -2, "a late wake set the guest clock back"
    g.agent.wake(now=time.time() - 19)  # the same without an armed setter
    assert skew(g) > -2, "a late wake set the guest clock back"
    assert not setters(g)
    # forward it goes, through the setter and without one
    g.agent.sleep_prep()
    g.agent.wake(now=time.time() + 3600)
    assert abs(skew(g) - 3600) <= 2
    g.agent.wake(now=time.time() + 7200)
    assert abs(skew(g) - 7200) <= 2
    set_guest_clock(g, 0)


def test_a_wake_after_its_setter_died_still_sets_the_clock(guest: Guest) -> None:
    """The setter killed in the guest (OOM killer, a tenant's `kill -9 -1`): the wake
    sets the clock another way, rather than failing or hanging. Last: the agent before
    the fix hung here for good."""
    g = guest
    g.agent.sleep_prep()
    armed = setters(g)
    assert len(armed) == 1, armed
    g.sh(f"kill -KILL {armed[0].pid}")
    set_guest_clock(g, -1000)
    assert_wake_sets_the_clock(g)
    # and the next sleep-prep arms a new one
    g.agent.sleep_prep()
    assert len(setters(g)) == 1
    assert_wake_sets_the_clock(g)


def test_a_restarted_agent_ends_the_setter_of_the_one_before(guest: Guest) -> None:
    """The agent dies with a setter armed and init starts another: that one ends the
    orphaned setter (or it could race its own for the time) and works as before."""
    g = guest
    g.agent.sleep_prep()
    ps = procs(g)
    agents = {p.pid: p for p in ps if p.cmdline == "/mvm/busybox sh /mvm/agent"}
    main = [p for p in agents.values() if p.ppid not in agents]
    assert len(main) == 1, main
    old = main[0].pid
    setter = [p for p in ps if p.is_clock_setter]
    assert len(setter) == 1 and setter[0].ppid == old, setter
    # The agent and its reader (which holds the port) die; the setter is left over.
    cat = [p for p in ps if p.cmdline == "cat" and p.wchan == "port_fops_read"]
    awk = [p for p in agents.values() if p.ppid == old and p.wchan == "pipe_read"]
    assert len(cat) == 1 and len(awk) == 1, (cat, awk)
    victims = [old, cat[0].ppid, cat[0].pid, awk[0].pid]
    g.sh(f"setsid sh -c 'sleep 1; kill -KILL {' '.join(map(str, victims))}' "
         ">/dev/null 2>&1 </dev/null &")
    time.sleep(4)  # init restarts the agent a second after it died
    g.agent.close()
    g.agent.wait_ready(30)
    assert "agent exited (137), restarting" in g.console()
    left = setters(g)
    assert not left, f"the setter of the agent before is still there: {left}"
    g.agent.sleep_prep()
    assert len(setters(g)) == 1
    set_guest_clock(g, -1000)
    assert_wake_sets_the_clock(g)


def test_wake_after_an_aborted_sleep_resume_and_execs(restorable: Guest, tmp_path: Path) -> None:
    """The issue's repro at the protocol level: `instance sleep` killed once the memory
    file is written (sleep-prep done, VM stopped, snapshot taken, host gone), `resume`,
    two `exec`s (each its own connection), `sleep`, `wake`; then more clean cycles."""
    g = restorable
    g.start()
    g.agent.sleep_prep()
    g.qmp("stop")
    g.qmp("migrate", uri=f"exec:cat > {tmp_path / 'memory.tmp'}")
    g._wait_qmp_status("query-migrate", {"completed"}, {"failed", "cancelled"})
    g.agent.close()  # the killed `instance sleep`
    g.qmp("cont")  # `instance resume`
    for _ in range(2):  # two `instance exec`s
        reconnect(g)
    for cycle in range(3):
        g.agent.sleep_prep()
        armed = setters(g)
        g.snapshot(tmp_path / "vm.state")
        time.sleep(2)
        g.restore(tmp_path / "vm.state")
        assert skew(g) < -1.5, "the guest clock should be behind after a restore"
        base = -last_pid(g) + last_pid(g)
        before = last_pid(g)
        try:
            g.agent.wake()
        except GuestError as e:  # the issue: `date -s @… failed (1)`
            pytest.fail(f"cycle {cycle}: wake failed: {e}; clock setters before it: {armed}")
        forks = last_pid(g) - before - base
        assert abs(skew(g)) <= 2, "the wake did not set the guest clock"
        assert len(armed) <= 1, f"cycle {cycle}: more than one clock setter: {armed}"
        assert not setters(g), "a clock setter is left after the wake"
        assert forks == 0, f"cycle {cycle}: the wake after a restore forked {forks} processes"
        reconnect(g)


@pytest.mark.nix
@needs_assets("kernel", "nixpkgs-offline")
def test_cli_wake_after_a_killed_sleep(gmvm: Mvm, app_pool: None) -> None:
    """The issue's repro through mvm itself: SIGKILL `instance sleep` once
    snapshot/<name>/memory.tmp exists, the next command (which finds the sleep interrupted
    and lets the VM run on), two `exec`s, `sleep`, `wake`."""
    gmvm.ok("pool", "scale", "acme/workers", "--running", "1")
    inst = instances_by_state(gmvm, "acme/workers")["running"][0]
    info = json.loads(gmvm.ok("instance", "info", inst, "--json").out)
    snapshots = Path(info["data_disk"]).parent / "snapshot"
    assert gmvm.ns
    sleeper = subprocess.Popen(
        ["ip", "netns", "exec", gmvm.ns, sys.executable, "-m", "mvm.cli.main", "instance",
         "sleep", inst], env=gmvm.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(snapshots.glob("*/memory.tmp")):
            assert sleeper.poll() is None, "`instance sleep` ended before memory.tmp appeared"
            assert time.monotonic() < deadline, "no snapshot/memory.tmp"
            time.sleep(0.005)
    finally:
        os.killpg(sleeper.pid, signal.SIGKILL)
        sleeper.wait()
    r = gmvm.ok("instance", "observe", "acme/workers")
    assert "finished an interrupted sleep (now running)" in r.out, gmvm("instance", "info", inst, "--json").out
    for _ in range(2):
        time.sleep(1.5)  # the guest sees the host go: its agent's read loop starts over
        r = sh(gmvm, inst, "echo hi")
        assert (r.rc, r.out) == (0, "hi\n"), r.err
    waiting = "grep -l wait_for_partner /proc/[0-9]*/wchan 2>/dev/null | wc -l"
    assert int(sh(gmvm, inst, waiting).out) <= 1, "more than one clock setter"
    gmvm.ok("instance", "sleep", inst)
    time.sleep(2)
    r = gmvm("instance", "wake", inst)
    assert r.rc == 0, r.err  # the issue: `guest agent refused wake: date -s @… failed (1)`
    assert instances_by_state(gmvm, "acme/workers") == {"running": [inst]}
    assert abs(int(sh(gmvm, inst, "date +%s").out) - time.time()) <= 2
    assert int(sh(gmvm, inst, waiting).out) == 0, "a clock setter is left after the wake"
