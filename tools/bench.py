"""`make bench`: speed as ratios measured in one run (never asserted in tests).

Runs in a throw-away MVM_HOME that borrows the host assets (kernel, flakes, offline nixpkgs).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

from mvm.config.paths import Layout

RUNS = 5


def median_of(fn: Callable[[], float], n: int = RUNS) -> float:
    return statistics.median(fn() for _ in range(n))


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Home:
    """A scratch MVM_HOME with the host's assets linked in; the real CLI runs against it."""

    def __init__(self) -> None:
        self.assets = Layout.from_env().home
        self.dir = Path(tempfile.mkdtemp(prefix="mvm-bench-"))
        self.flakes = Path(tempfile.mkdtemp(prefix="mvm-bench-flakes-"))  # outside mvm's state
        for name in ("kernel", "builtin-flake", "nixpkgs-offline", "kvm-probe.json", "config.json",
                     "builder"):
            src = self.assets / name
            if src.is_dir():
                (self.dir / name).symlink_to(src)
            elif src.is_file():
                shutil.copyfile(src, self.dir / name)
        # The sections but `builder` measure what they always did, with the host's Nix.
        cfg = self.dir / "config.json"
        config = json.loads(cfg.read_text()) if cfg.is_file() else {}
        cfg.write_text(json.dumps({**config, "builder": "host"}))
        self.env = dict(os.environ, MVM_HOME=str(self.dir))
        os.environ["MVM_HOME"] = str(self.dir)

    def mvm(self, *args: str) -> str:
        p = subprocess.run([sys.executable, "-m", "mvm.cli.main", *args], env=self.env,
                           capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise SystemExit(f"bench: mvm {' '.join(args)} failed:\n{p.stderr}")
        return p.stdout

    def close(self) -> None:
        for t in json.loads(self.mvm("tenant", "list", "--json")):
            self.mvm("tenant", "destroy", t["id"], "--force")  # guests, networks, runtime dirs
        os.environ["MVM_HOME"] = str(self.assets)
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.flakes, ignore_errors=True)


def line(name: str, value: str) -> None:
    print(f"  {name:<44} {value}", flush=True)


def bench_build(h: Home) -> None:
    from mvm.guest.layout import install_guest_files
    from mvm.image import nix, rootfs

    print("image pipeline")
    h.mvm("tenant", "create", "bench")
    h.mvm("pool", "create", "bench/py", "--profile", "python")
    cold = timed(lambda: h.mvm("pool", "build", "bench/py"))
    line("first build of a new pool (Nix outputs cached)", f"{cold:.2f} s")
    nochange = median_of(lambda: timed(lambda: h.mvm("pool", "build", "bench/py")))
    line("no-change rebuild (cache hit), median of 5", f"{nochange:.2f} s")
    line("no-change / first build", f"{nochange / cold:.3f}")

    manifest = json.loads((Layout.from_env().current_link("bench", "py") / "manifest.json").read_text())
    out = manifest["out_path"]
    closure = nix.closure(out)
    work = Path(tempfile.mkdtemp(prefix="mvm-bench-pack-", dir=h.dir))
    ours, plain = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        rootfs.pack_closure(out, closure, work / "ours.ext4", "bench", install_guest_files, work)
        ours.append(time.perf_counter() - t0)
        staging = work / "plain-tree"
        shutil.rmtree(staging, ignore_errors=True)
        rootfs.stage(out, closure, staging, install_guest_files)
        size, _ = rootfs.tree_size(staging)
        img = work / "plain.ext4"
        img.unlink(missing_ok=True)
        with img.open("wb") as f:
            f.truncate(int(size * 1.3) + 64 * 2**20)
        t0 = time.perf_counter()
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(staging), str(img)], check=True)
        plain.append(time.perf_counter() - t0)
    size = manifest["closure_size"]
    o, p = statistics.median(ours), statistics.median(plain)
    line("closure packed", f"{size / 2**20:.1f} MiB")
    line("pack_closure (stage + mkfs + pin times)", f"{o:.2f} s = {size / 2**20 / o:.0f} MiB/s")
    line("plain mkfs.ext4 -d on the same tree", f"{p:.2f} s = {size / 2**20 / p:.0f} MiB/s")
    line("packing throughput / plain mkfs.ext4 -d", f"{p / o:.2f}")
    shutil.rmtree(work, ignore_errors=True)


def bench_runtime(h: Home) -> dict[str, float]:
    from mvm.context.compose import compose
    from mvm.lifecycle import apply, create, netops, specs
    from mvm.model import Action, PoolRef
    from mvm.runtime.base import CHECKSUM, SnapshotInfo, checksum
    from mvm.services import instances

    ctx = compose()
    rt = ctx.runtime()
    print(f"instances ({rt.name}, accelerator {getattr(rt, 'accel', '?')})")
    store = ctx.store
    h.mvm("tenant", "create", "rt")
    h.mvm("pool", "create", "rt/vm", "--profile", "minimal", "--mem", "256")
    h.mvm("pool", "build", "rt/vm")
    ref = PoolRef("rt", "vm")
    cold, resume, qmp_resume, wake, snap, used = [], [], [], [], [], []
    sleep, hashing, wake_unchecked = [], [], []
    for _ in range(RUNS):
        i = create(ctx, ref)
        cold.append(timed(partial(apply, ctx, i.ref, Action.START)))
        i = store.instance("rt", "vm", i.id)
        spec = specs.spec_for(ctx, i, i.revision or "")
        meminfo = instances.exec_(ctx, i.ref, ["cat", "/proc/meminfo"]).stdout.decode()
        fields = {ln.split(":")[0]: int(ln.split()[1]) for ln in meminfo.splitlines()}
        # touched by the guest: its RAM less what its kernel reports free (kernel image included)
        used.append(256 * 2**20 - fields["MemFree"] * 1024)
        apply(ctx, i.ref, Action.WARM)
        resume.append(timed(partial(apply, ctx, i.ref, Action.RESUME)))
        rt.pause(spec)
        qmp_resume.append(timed(partial(rt.resume, spec)))
        # each wake twice: checked, and unchecked (a manifest without checksums, as an older
        # mvm wrote it), each first in turn (neither gains from its place)
        for checked in (True, False) if len(cold) % 2 else (False, True):
            t0 = time.perf_counter()
            i = apply(ctx, i.ref, Action.SLEEP)
            took = time.perf_counter() - t0
            assert i.snapshot
            d = specs.snapshot_dir(ctx.layout, i, i.snapshot)
            if not checked:
                replace(SnapshotInfo.load(d), checksums={}).write(d)
                wake_unchecked.append(timed(partial(apply, ctx, i.ref, Action.WAKE)))
                continue
            sleep.append(took)
            snap.append(sum(f.stat().st_size for f in d.iterdir()))
            # one pass over the file: what a wake checks before it restores, a sleep at commit
            hashing.append(median_of(lambda d=d: timed(  # type: ignore[misc]
                partial(checksum, d / SnapshotInfo.load(d).memory_file)), 3))
            wake.append(timed(partial(apply, ctx, i.ref, Action.WAKE)))

        apply(ctx, i.ref, Action.DESTROY)
    # network set-up: a tenant's first instance (bridge + rules + TAP), then a further one (TAP)
    first, further = [], []
    for _ in range(RUNS):
        a, b = create(ctx, ref), create(ctx, ref)
        first.append(timed(partial(netops.instance_up, ctx, a)))
        further.append(timed(partial(netops.instance_up, ctx, b)))
        apply(ctx, b.ref, Action.DESTROY)
        apply(ctx, a.ref, Action.DESTROY)  # the tenant's last: its network goes with it
    c, r, q, w = (statistics.median(x) for x in (cold, resume, qmp_resume, wake))
    line("cold boot to agent-ready, median of 5", f"{c:.3f} s")
    line("warm -> running resume (mvm), median of 5", f"{r * 1000:.1f} ms")
    line("warm -> running resume (QMP cont only)", f"{q * 1000:.2f} ms")
    line("sleeping -> running wake, median of 5", f"{w:.3f} s")
    line("snapshot size, median", f"{statistics.median(snap) / 2**20:.1f} MiB")
    line("guest memory in use before sleep (RAM - MemFree)", f"{statistics.median(used) / 2**20:.1f} MiB")
    line("snapshot / memory in use", f"{statistics.median(snap) / statistics.median(used):.2f}")
    line("resume / cold boot", f"{r / c:.4f}")
    line("wake / cold boot", f"{w / c:.3f}")
    hs, wu, sl = (statistics.median(x) for x in (hashing, wake_unchecked, sleep))
    line(f"snapshot checksum, one pass ({CHECKSUM}), median", f"{hs * 1000:.1f} ms")
    line("checksum pass / wake (verify before restoring)", f"{hs / w:.3f}")
    paired = statistics.median(a / b for a, b in zip(wake, wake_unchecked, strict=True))
    line("wake checked / unchecked, median of pairs", f"{paired:.3f} (medians {w:.3f} s / {wu:.3f} s)")
    line("checksum at commit / sleep", f"{hs / sl:.3f} (sleep {sl:.3f} s)")
    n1, n2 = statistics.median(first), statistics.median(further)
    line("network set-up, tenant's first instance", f"{n1 * 1000:.1f} ms (bridge + rules + TAP)")
    line("network set-up, further instance", f"{n2 * 1000:.1f} ms (TAP)")
    line("network set-up / cold boot (first, further)", f"{n1 / c:.4f}, {n2 / c:.4f}")
    return {"cold": c}


def bench_flood(h: Home) -> None:
    """Stop and sleep beside a guest flooding its agent channel and console, and of that guest
    itself, each against the same with a quiet guest, in one run."""
    from mvm.context.compose import compose
    from mvm.lifecycle import apply, create, specs
    from mvm.model import Action, Instance, PoolRef
    from mvm.runtime import console
    from mvm.services import instances

    ctx = compose()
    print("a hostile guest: agent killed, /dev/zero into its port, /dev/urandom into its console")
    h.mvm("tenant", "create", "fl")
    h.mvm("pool", "create", "fl/vm", "--profile", "minimal", "--mem", "256")
    h.mvm("pool", "build", "fl/vm")
    ref = PoolRef("fl", "vm")
    script = (Path(__file__).resolve().parent / "flood-guest.sh").read_text()

    def flood(i: Instance) -> None:
        instances.exec_(ctx, i.ref, ["sh", "-c", script])
        time.sleep(2)  # (it starts 1 s after the exec returns)

    def stop_and_sleep(i: Instance, flooding: bool) -> tuple[float, float]:
        apply(ctx, i.ref, Action.START)
        if flooding:
            flood(i)
        stop = timed(partial(apply, ctx, i.ref, Action.STOP))
        apply(ctx, i.ref, Action.START)
        if flooding:
            flood(i)
        sleep = timed(partial(apply, ctx, i.ref, Action.SLEEP))
        apply(ctx, i.ref, Action.STOP)  # (drops the snapshot)
        return stop, sleep

    def medians(pairs: list[tuple[float, float]]) -> tuple[float, float]:
        return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)

    neighbour, x = create(ctx, ref), create(ctx, ref)
    apply(ctx, neighbour.ref, Action.START)
    quiet = medians([stop_and_sleep(x, False) for _ in range(RUNS)])
    flood(neighbour)
    beside = medians([stop_and_sleep(x, False) for _ in range(RUNS)])
    log = ctx.runtime().console_log(specs.control_spec(ctx.layout, neighbour))
    kept = sum(f.stat().st_size for f in (log, console.old_log(log)) if f.exists())
    apply(ctx, neighbour.ref, Action.STOP)
    itself = medians([stop_and_sleep(x, True) for _ in range(3)])
    for n, what in enumerate(("stop", "sleep")):
        line(f"{what} beside a quiet guest, median of 5", f"{quiet[n]:.3f} s")
        line(f"{what} beside a flooding guest, median of 5", f"{beside[n]:.3f} s")
        line(f"{what} of the flooding guest, median of 3", f"{itself[n]:.3f} s")
        line(f"{what}: beside a flooding / a quiet guest", f"{beside[n] / quiet[n]:.2f}")
        line(f"{what}: of a flooding / a quiet guest", f"{itself[n] / quiet[n]:.2f}")
    line("console kept of the flooding guest", f"{kept / 2**20:.2f} MiB (cap 2 x 1 MiB)")


def bench_jail(h: Home) -> None:
    """The jail's cost: cold boot and wake of the same pool with the jail and without,
    alternated in one run."""
    from dataclasses import replace

    from mvm.config.settings import Jail
    from mvm.context.compose import compose
    from mvm.lifecycle import apply, create
    from mvm.model import Action, PoolRef
    from mvm.runtime import select

    jailed = compose()
    plain_settings = replace(jailed.settings, jail=Jail.OFF)
    plain = replace(jailed, settings=plain_settings,
                    runtime_factory=lambda: select.runtime(plain_settings, jailed.layout))
    on = getattr(jailed.runtime(), "jailed", lambda: False)()
    print(f"hypervisor jail ({'on' if on else 'UNAVAILABLE: both runs unjailed'})")
    h.mvm("tenant", "create", "jail")
    h.mvm("pool", "create", "jail/vm", "--profile", "minimal", "--mem", "256")
    h.mvm("pool", "build", "jail/vm")
    ref = PoolRef("jail", "vm")
    times: dict[str, list[float]] = {"cold-jail": [], "cold-plain": [], "wake-jail": [], "wake-plain": []}
    for _ in range(RUNS):
        for name, ctx in (("jail", jailed), ("plain", plain)):
            i = create(ctx, ref)
            times[f"cold-{name}"].append(timed(partial(apply, ctx, i.ref, Action.START)))
            apply(ctx, i.ref, Action.SLEEP)
            times[f"wake-{name}"].append(timed(partial(apply, ctx, i.ref, Action.WAKE)))
            apply(ctx, i.ref, Action.DESTROY)
    m = {k: statistics.median(v) for k, v in times.items()}
    line("cold boot to agent-ready, jailed / not", f"{m['cold-jail']:.3f} s / {m['cold-plain']:.3f} s")
    line("wake, jailed / not", f"{m['wake-jail']:.3f} s / {m['wake-plain']:.3f} s")
    line("cold boot with the jail / without", f"{m['cold-jail'] / m['cold-plain']:.3f}")
    line("wake with the jail / without", f"{m['wake-jail'] / m['wake-plain']:.3f}")


def bench_builder(h: Home) -> None:
    """The builder microVM against the host's Nix on the guide's minimal flake."""
    print("builder microVM")
    flake = h.flakes / "guide"  # (mvm refuses a flake inside its state directory)
    shutil.copytree(Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "guide-flake",
                    flake)
    h.mvm("tenant", "create", "bb")
    for pool in ("vm", "host"):
        h.mvm("pool", "create", f"bb/{pool}", "--flake", str(flake), "--profile", "minimal")
    first = timed(lambda: h.mvm("pool", "build", "bb/vm", "--builder", "vm"))
    host = timed(lambda: h.mvm("pool", "build", "bb/host", "--builder", "host", "--force"))
    line("first build of a new pool, builder VM", f"{first:.2f} s")
    line("same flake, host builder (--force)", f"{host:.2f} s")
    line("builder VM / host build", f"{first / host:.1f}")
    text = (flake / "flake.nix").read_text()
    (flake / "flake.nix").write_text(text.replace('name = "mvm-minimal";', 'name = "mvm-minimal2";'))
    again = timed(lambda: h.mvm("pool", "build", "bb/vm", "--builder", "vm"))
    line("rebuild after a one-line change, builder VM", f"{again:.2f} s")
    line("one-line-change rebuild / first build", f"{again / first:.2f}")
    hit = median_of(lambda: timed(lambda: h.mvm("pool", "build", "bb/vm", "--builder", "vm")))
    line("no-change build (cache hit, no VM), median of 5", f"{hit:.2f} s")


def bench_agent(h: Home) -> None:
    """The agent: a reconcile pass at rest for 1 and for 20 pools, and a hypervisor's death to
    its replacement being ready (agent-ready: the `instance.replaced` event is written after
    the start ends), as a ratio to a cold boot. Real QEMU; the 19 further pools have no
    instances (20 pools of running guests do not fit this host), the first has 2 running
    guests under an idle policy, so each pass measures them too."""
    import os
    import signal
    import threading

    from mvm.context.compose import compose
    from mvm.lifecycle import apply, create, specs
    from mvm.model import Action, PoolRef
    from mvm.services.agent import Agent

    print("agent")
    h.mvm("tenant", "create", "ag", "--max-pools", "20")
    h.mvm("pool", "create", "ag/p0", "--profile", "minimal", "--mem", "256", "--idle-warm", "1h")
    h.mvm("pool", "build", "ag/p0")
    ctx = compose()
    ref = PoolRef("ag", "p0")
    cold = []
    for _ in range(3):
        i = create(ctx, ref)
        cold.append(timed(partial(apply, ctx, i.ref, Action.START)))
        apply(ctx, i.ref, Action.DESTROY)
    h.mvm("pool", "scale", "ag/p0", "--running", "2")
    agent = Agent(ctx, 10.0)
    agent.run_pass()  # (first samples)
    one = median_of(lambda: timed(agent.run_pass), 10)
    for n in range(1, 20):
        h.mvm("pool", "create", f"ag/p{n}", "--profile", "minimal")
    agent.run_pass()
    twenty = median_of(lambda: timed(agent.run_pass), 10)
    line("reconcile pass at rest, 1 pool (2 running)", f"{one * 1000:.1f} ms")
    line("reconcile pass at rest, 20 pools", f"{twenty * 1000:.1f} ms")
    stop = threading.Event()
    loop = threading.Thread(target=Agent(ctx, 1.0).run, args=(stop,))
    loop.start()
    gaps = []
    try:
        for _ in range(3):
            seen = len(ctx.store.events(limit=10_000))
            victim = ctx.store.instances("ag", "p0")[0]
            pid = ctx.runtime().pid(specs.control_spec(ctx.layout, victim))
            assert pid is not None
            t0 = time.time()
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                new = ctx.store.events(limit=10_000)[:-seen or None]
                done = [e for e in new if e["kind"] == "instance.replaced"]
                if done:
                    gaps.append(float(done[0]["ts"]) - t0)  # type: ignore[arg-type]
                    break
                time.sleep(0.05)
            else:
                raise SystemExit("bench: the agent did not replace a killed hypervisor in 300 s")
    finally:
        stop.set()
        loop.join()
    c, g = statistics.median(cold), statistics.median(gaps)
    line("cold boot to agent-ready, median of 3", f"{c:.3f} s")
    line("death -> replacement ready (interval 1 s)", f"{g:.3f} s")
    line("death -> replacement ready / cold boot", f"{g / c:.2f}")


SECTIONS: dict[str, Callable[[Home], object]] = {"build": bench_build, "runtime": bench_runtime,
                                                 "jail": bench_jail, "builder": bench_builder,
                                                 "flood": bench_flood, "agent": bench_agent}


def main(argv: list[str] | None = None) -> int:
    wanted = (argv if argv is not None else sys.argv[1:]) or list(SECTIONS)
    if os.environ.get("MVM_BENCH_NETNS") is None and os.geteuid() == 0:
        # Run inside a namespace of our own: bridges, TAPs and rules never touch the host's.
        ns = f"mvmbench-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
            env = dict(os.environ, MVM_BENCH_NETNS=ns)
            return subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, *wanted],
                                  env=env).returncode
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    h = Home()
    try:
        for name in wanted:
            SECTIONS[name](h)
    finally:
        h.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
