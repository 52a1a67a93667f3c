"""A hostile guest floods its agent channel and its console (real guests, QEMU under TCG).

The tenant is root in its VM: here it kills mvm's agent and writes /dev/zero into the agent's
virtio-serial port and /dev/urandom into its serial console, without end. The host's
commands on it and on its neighbour still complete, each mvm process stays small, and the
console on disk stays within its cap. (Before: `exec` grew mvm to 250 MB at 100% CPU, `stop`
and `sleep` took 30 s, `sleep` failed, and the console log grew ~1 MB/s without bound.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mvm.runtime import console
from tests.conftest import Mvm, Result, instances_by_state, needs_assets, sh
from tests.test_instances import wait_for
from tests.test_lifecycle_real import qemus

pytestmark = [pytest.mark.guest, pytest.mark.nix, needs_assets("kernel", "nixpkgs-offline")]

#: mvm's own memory stays under this whatever a guest sends (idle it is ~30-40 MiB; the
#: unbounded reads of before reached 200-250 MiB on this flood).
MAX_RSS_KIB = 100 << 10

# Run in the guest (tools/flood-guest.sh says what it does).
FLOOD = (Path(__file__).resolve().parent.parent / "tools" / "flood-guest.sh").read_text()


# Runs a command and writes the most memory its process held (ru_maxrss, KiB) to a file. A
# small process of its own: a child's ru_maxrss counts the memory of the process it was forked
# from (up to its exec), so it must not be forked from this test's process.
MAXRSS = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measured(m: Mvm, *args: str) -> tuple[Result, int]:
    """Run the CLI like `m(...)`; also return the most memory (RSS, KiB) its process held."""
    argv = [sys.executable, "-m", "mvm.cli.main", *args]
    if m.ns:
        argv = ["ip", "netns", "exec", m.ns, *argv]  # (ip execs python: the same process)
    with tempfile.NamedTemporaryFile() as rss:
        p = subprocess.run([sys.executable, "-I", "-S", "-c", MAXRSS, rss.name, *argv], env=m.env,
                           capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
        return Result(p.returncode, p.stdout, p.stderr), int(Path(rss.name).read_text())


def run_dir(m: Mvm, inst: str) -> Path:
    t, p, i = inst.split("/")
    return m.home / f"tenants/{t}/pools/{p}/instances/{i}/run"


def flood(m: Mvm, inst: str, rotated: bool) -> None:
    assert sh(m, inst, FLOOD).out.startswith("flooding /dev/vport")
    log = run_dir(m, inst) / "console.log"
    # the floods have begun (both at once), and with `rotated` filled the log and moved it aside
    try:
        wait_for(lambda: log.stat().st_size > 64 << 10, 120, "the console flood")
    except AssertionError as e:  # what the host saw, to tell a slow guest from a dead logger
        d = run_dir(m, inst)
        seen = {f.name: f.stat().st_size for f in d.iterdir() if f.is_file()}
        loggers = subprocess.run(["pgrep", "-af", "console_logger"], capture_output=True,
                                 text=True).stdout
        tail = log.read_bytes()[-300:] if log.exists() else b""
        raise AssertionError(f"{e}: files {seen}; loggers {loggers!r}; console tail {tail!r}; "
                             f"instance {m('instance', 'info', inst).out[:400]}") from None
    if rotated:
        wait_for(lambda: console.old_log(log).exists(), 120, "the console log to rotate")


def console_within_cap(m: Mvm, inst: str) -> None:
    log = run_dir(m, inst) / "console.log"
    for f in (log, console.old_log(log)):
        if f.exists():
            assert f.stat().st_size <= console.CAP, f


def test_a_guest_flooding_its_channels_cannot_stall_or_bloat_the_host(gmvm: Mvm, app_pool: None) -> None:
    gmvm.ok("pool", "scale", "acme/workers", "--running", "2")
    bad, quiet = instances_by_state(gmvm, "acme/workers")["running"]

    # What a guest writes to its console reaches the operator's terminal escaped.
    sh(gmvm, bad, r"printf '\033]0;owned\007\033[2Jafter\n' >/dev/ttyS0")
    def shown() -> str:
        out = gmvm.ok("instance", "logs", bad).out
        return out if "after" in out else ""

    logs = wait_for(shown, 30, "the console line")
    assert "\x1b" not in logs and "\x07" not in logs and "\\x1b]0;owned\\x07\\x1b[2Jafter" in logs
    raw = subprocess.run([sys.executable, "-m", "mvm.cli.main", "instance", "logs", "--raw", bad],
                         env=gmvm.env, capture_output=True, check=True).stdout
    assert b"\x1b]0;owned\x07\x1b[2Jafter" in raw

    flood(gmvm, bad, rotated=True)
    for args in (("instance", "list", "acme/workers"), ("instance", "exec", bad, "--", "true"),
                 ("instance", "exec", quiet, "--", "echo", "unaffected"),
                 ("instance", "stop", bad)):
        r, rss = measured(gmvm, *args)
        assert rss < MAX_RSS_KIB, (args, rss)
        console_within_cap(gmvm, bad)
        if args[2] == bad and args[1] == "exec":
            # one clear line, at once (not after the exec's timeout)
            assert r.rc != 0 and len(r.errors) == 1 and "not protocol lines" in r.err, r.err
        else:
            assert r.rc == 0, (args, r.err)
    assert "unaffected" in measured(gmvm, "instance", "exec", quiet, "--", "echo", "unaffected")[0].out
    # exec output beyond the limit is cut, and the user is told
    r = gmvm.ok("instance", "exec", quiet, "--max-output", "1K", "--json", "--",
                "sh", "-c", "head -c 5000 /dev/zero | tr '\\0' x")
    assert json.loads(r.out) == {"exit_code": 0, "started": True, "timed_out": False, "stdout": "x" * 1024,
                                 "stderr": "", "truncated": {"stdout": 5000}}
    assert r.lines == ["warning: stdout cut at 1024 bytes of the 5000 the command wrote "
                       "(--max-output keeps more)"]
    assert instances_by_state(gmvm, "acme/workers") == {"running": [quiet], "stopped": [bad]}

    # Again from a fresh boot, for a sleep: it completes (snapshotted unprepared) and frees the RAM.
    gmvm.ok("instance", "start", bad)
    flood(gmvm, bad, rotated=False)
    r, rss = measured(gmvm, "instance", "sleep", bad)
    assert r.rc == 0 and rss < MAX_RSS_KIB, (r.err, rss)
    assert instances_by_state(gmvm, "acme/workers") == {"running": [quiet], "sleeping": [bad]}
    assert qemus(bad) == []  # its RAM is the host's again
    console_within_cap(gmvm, bad)
    assert sh(gmvm, quiet, "echo still").out == "still\n"
