"""A guest's console kept within its cap by the per-instance logger, and shown escaped.

The logger is the real one (`runtime/console_logger.py`, a process of its own); the
hypervisor is played by this test, which writes the console FIFO as QEMU does (after mvm
opened its read end). The real guest flooding its console is in tests/test_guest_flood.py.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mvm.errors import GuestError
from mvm.runtime import console
from mvm.runtime.base import Disk, UndoSteps, VmSpec
from mvm.runtime.qemu import QemuRuntime
from mvm.util.text import printable


def loggers_of(log: Path) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            # (not `setsid --fork` itself, nor its child before it has called setsid() and exec'd)
            if str(log).encode() in cmd and any(b"console_logger" in a for a in cmd) \
                    and not cmd[0].endswith(b"setsid"):
                out.append(int(pid))
    return out


@pytest.fixture
def log(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "run" / "console.log"
    path.parent.mkdir()
    yield path
    for pid in loggers_of(path):
        os.kill(pid, signal.SIGKILL)


def start(log: Path, cap: int) -> int:
    """What QemuRuntime._spawn does around QEMU; returns the hypervisor's end (write)."""
    reader = console.open_pipe(log)
    writer = os.open(console.pipe_path(log), os.O_WRONLY)  # QEMU's `-chardev file,path=…`
    console.start_logger(reader, log, cap)
    return writer


def test_the_console_stays_within_twice_its_cap_keeping_the_latest(log: Path) -> None:
    cap = 64 << 10
    stream = os.urandom(1 << 20)  # 16 caps' worth, in pieces of every size
    w = start(log, cap)
    for i in range(0, len(stream), 7919):
        os.write(w, stream[i:i + 7919])
    os.close(w)  # the hypervisor exits
    console.settle(log, timeout=30)
    assert loggers_of(log) == []  # it ended with its hypervisor
    assert console.old_log(log).stat().st_size == cap
    assert 0 < log.stat().st_size <= cap
    kept = console.read(log)
    assert kept == stream[-len(kept):]  # in order, nothing lost but the oldest
    assert console.tail(log, 100_000) == stream[-100_000:]  # reaching into console.log.1
    assert oct(log.stat().st_mode & 0o777) == "0o600"


def test_the_logger_outlives_its_command_and_appends_after_a_restore(log: Path) -> None:
    w = start(log, 1 << 20)
    os.write(w, b"boot\n")
    deadline = time.monotonic() + 30
    while len(pids := loggers_of(log)) != 1 and time.monotonic() < deadline:
        time.sleep(0.01)  # (`setsid --fork` returns as soon as it forked)
    assert len(pids) == 1
    stat = Path(f"/proc/{pids[0]}/stat").read_text().rsplit(")", 1)[1].split()
    assert int(stat[1]) != os.getpid()  # not our child: reparented at once
    assert int(stat[3]) != os.getsid(0)  # a session of its own: no terminal's signals
    os.close(w)
    console.settle(log, timeout=30)
    w = start(log, 1 << 20)  # a wake: a new hypervisor, the same console
    os.write(w, b"woken\n")
    os.close(w)
    console.settle(log, timeout=30)
    assert console.read(log) == b"boot\nwoken\n"


def test_what_a_hypervisor_wrote_before_dying_at_once_is_kept(log: Path) -> None:
    """A guest that panics right away: its last lines are there for the error message."""
    reader = console.open_pipe(log)
    w = os.open(console.pipe_path(log), os.O_WRONLY)
    os.write(w, b"Kernel panic - not syncing\n")
    os.close(w)  # gone before the logger even started
    console.start_logger(reader, log)
    console.settle(log, timeout=30)
    assert console.tail(log) == b"Kernel panic - not syncing\n"
    assert loggers_of(log) == []


def hypervisor_writes(log: Path, data: bytes, cap: int = console.CAP) -> None:
    """A hypervisor that writes `data` on its console and exits, its logger done with it."""
    w = start(log, cap)
    os.write(w, data)
    os.close(w)
    console.settle(log, timeout=30)


def test_tail_reads_only_what_followed_the_mark_even_across_a_rotation(log: Path) -> None:
    hypervisor_writes(log, b"earlier boot: login:\n")
    console.mark(log)  # a restore starts its hypervisor on the same console
    woken = b"".join(b"woken %02d\n" % n for n in range(10))  # 90 bytes: rotates at 64
    hypervisor_writes(log, woken, cap=64)
    assert console.old_log(log).read_bytes().startswith(b"earlier boot")  # all kept for `logs`
    assert console.tail(log) == woken
    assert console.tail(log, 20) == woken[-20:]
    console.remove(log)  # a cold boot: a new console, all of it this boot's
    hypervisor_writes(log, b"booted\n")
    assert console.tail(log) == b"booted\n"


def test_a_failed_wake_shows_its_own_console_and_the_hint_on_a_line_of_its_own(tmp_path: Path) -> None:
    """The wake's restore prepares the run dir as it does (QemuRuntime's own step), a new
    hypervisor appends to the console of the boot before the sleep and dies: the error shows
    what this one's guest said, not the earlier boot's last lines, and its hint after them."""
    rt = QemuRuntime("tcg")
    spec = VmSpec(name="acme/w/i-1", vcpus=1, mem_mib=128, kernel=tmp_path / "vmlinux", initrd=None,
                  cmdline="", disks=(Disk("rootfs", tmp_path / "rootfs.ext4", True),), net=None,
                  run_dir=tmp_path / "run")
    log = rt.console_log(spec)
    spec.run_dir.mkdir()
    hypervisor_writes(log, b"".join(b"boot line %d\n" % n for n in range(8)) + b"login:\n")
    with UndoSteps("restore", None) as steps:
        rt._prepare_run_dir(spec, steps, fresh=False)
    hypervisor_writes(log, b"restored: clocksource unstable\n")
    with pytest.raises(GuestError) as e:
        rt.agent(spec).wake(timeout=1)  # its hypervisor is gone
    assert e.value.line() == ("the hypervisor exited during wake\n"
                              "console:\n"
                              "restored: clocksource unstable\n"
                              "(look at `mvm instance logs` for the guest's console)")


@pytest.mark.parametrize(("raw", "shown"), [
    (b"plain text\tand tabs\r\n", "plain text\tand tabs\n"),
    (b"\x1b]0;owned\x07\x1b[2J", "\\x1b]0;owned\\x07\\x1b[2J"),  # retitle, clear screen
    (b"caf\xc3\xa9 \xff\xfe", "café \\xff\\xfe"),  # UTF-8 kept, invalid bytes escaped
    ("\x9b31m\u202eevil".encode(), "\\x9b31m\\u202eevil"),  # C1 CSI, bidi override
    (b"lone\rcarriage\x00nul\x7f", "lone\\x0dcarriage\\x00nul\\x7f"),
])
def test_printable_escapes_what_would_act_on_a_terminal(raw: bytes, shown: str) -> None:
    assert printable(raw) == shown
