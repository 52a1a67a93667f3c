"""`exec` racing a sleep on a real guest: every exec either ran its command once and says so
(its status), or says 125 and its command never ran — never "the hypervisor exited during
exec" (exit 9) for a command that ran, or runs after the wake (a retry would run it twice)."""

from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import Mvm, instances_by_state, needs_assets, sh

pytestmark = [pytest.mark.guest, pytest.mark.net, needs_assets("kernel", "nixpkgs-offline", "builtin-flake")]


def test_an_exec_racing_a_sleep_completes_or_never_starts(gmvm: Mvm) -> None:
    gmvm.ok("tenant", "create", "acme")
    gmvm.ok("pool", "create", "acme/w", "--profile", "minimal", "--mem", "256", "--data-disk", "16")
    gmvm.ok("pool", "build", "acme/w")
    gmvm.ok("pool", "scale", "acme/w", "--running", "1")
    [inst] = instances_by_state(gmvm, "acme/w")["running"]
    codes: dict[str, int] = {}

    def run(mark: str) -> None:
        codes[mark] = sh(gmvm, inst, f"echo {mark} >> /data/runs").rc

    for cycle in range(2):
        # execs launched before, during and after the sleep's own start
        execs = [threading.Thread(target=run, args=(f"c{cycle}-e{n}",)) for n in range(6)]
        for n, t in enumerate(execs):
            t.start()
            if n == 1:
                sleep = threading.Thread(target=lambda: gmvm.ok("instance", "sleep", inst))
                sleep.start()
            time.sleep(0.15)
        sleep.join()
        for t in execs:
            t.join()
        gmvm.ok("instance", "wake", inst)

    ran = sh(gmvm, inst, "cat /data/runs").out.split()  # (after every command a wake resumed)
    outcome = {mark: (rc, ran.count(mark)) for mark, rc in sorted(codes.items())}  # exit code, runs
    print(f"\nexit code and times run, per exec: {outcome}")
    assert all(o in ((0, 1), (125, 0)) for o in outcome.values()), outcome
