"""The guest agent's clock setter, against real guests (QEMU, TCG).

sleep-prep forks a clock setter before the snapshot (so that a wake needs no fork right
after a restore, when every fork is slow under TCG) and wake hands it the host's time.
These tests drive the protocol the way mvm's commands do, including the host going away
between sleep-prep and wake (a killed `instance sleep`, then `resume`, `exec`s, `sleep`,
`wake`), and check what matters: the wake succeeds, the guest clock is right, and there
is never more than one setter in the guest.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mvm.build.kernel import KernelInfo, install_default_kernel
from mvm.errors import GuestError
from tests.test_guest_boot import SECRETS, Guest, make_rootfs, make_secrets, mkfs

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
	n=$(ls -l "$p/fd" 2>/dev/null | grep -c "CLOCK_FIFO")
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


def reconnect(g: Guest) -> None:
    """The host goes away (a CLI command ends, or is killed) and a new one connects: the
    agent's read loop starts over."""
    g.agent.close()
    assert g.agent.exec(["true"], timeout=20).ok


def assert_wake_sets_the_clock(g: Guest) -> None:
    try:
        g.agent.wake()
    except GuestError as e:
        pytest.fail(f"wake failed: {e}; clock setters in the guest: {setters(g)}")
    assert abs(skew(g)) <= 2, "the wake did not set the guest clock"
    left = setters(g)
    assert not left, f"clock setters left after the wake: {left}"


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> KernelInfo:
    return install_default_kernel(tmp_path_factory.mktemp("kernel"))


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
        assert len(armed) <= 1, f"cycle {cycle}: more than one clock setter: {armed}"
        g.snapshot(tmp_path / "vm.state")
        time.sleep(2)
        g.restore(tmp_path / "vm.state")
        assert skew(g) < -1.5, "the guest clock should be behind after a restore"
        assert_wake_sets_the_clock(g)
        reconnect(g)
