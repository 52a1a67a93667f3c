"""Shared fixtures: an isolated MVM_HOME per test, and the real `mvm` CLI run as a user would."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# Host assets installed by `make setup` (`mvm setup`): kernel, built-in flake, offline nixpkgs.
ASSETS_HOME = Path(os.environ.get("MVM_ASSETS_HOME", "/var/lib/mvm"))


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def errors(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.startswith("error:")]

    @property
    def lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.strip()]


class Mvm:
    """Runs the real `mvm` CLI in a subprocess against one MVM_HOME."""

    def __init__(self, home: Path, ns: str | None = None) -> None:
        self.home = home
        self.ns = ns
        self.env = dict(os.environ, MVM_HOME=str(home), COLUMNS="200", NO_COLOR="1")

    def __call__(self, *args: str, check: bool = False, timeout: float = 900,
                 cwd: Path | None = None, ns: str | None = None) -> Result:
        argv = [sys.executable, "-m", "mvm.cli.main", *args]
        ns = ns or self.ns
        if ns:
            argv = ["ip", "netns", "exec", ns, *argv]
        p = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout,
                           cwd=cwd, stdin=subprocess.DEVNULL)
        r = Result(p.returncode, p.stdout, p.stderr)
        if check and r.rc != 0:
            raise AssertionError(f"mvm {' '.join(args)} failed ({r.rc}):\n{r.out}\n{r.err}")
        return r

    def ok(self, *args: str, **kw: object) -> Result:
        return self(*args, check=True, **kw)  # type: ignore[arg-type]


def _link_assets(home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    for name in ("kernel", "builtin-flake", "nixpkgs-offline", "kvm-probe.json", "builder"):
        src = ASSETS_HOME / name
        if src.exists():
            (home / name).symlink_to(src)
    cfg = ASSETS_HOME / "config.json"
    config = json.loads(cfg.read_text()) if cfg.exists() else {}
    # Most build tests use the host's Nix (fast); the builder microVM's own tests ask for it.
    config["builder"] = "host"
    (home / "config.json").write_text(json.dumps(config))


@pytest.fixture
def mvm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Mvm:
    home = tmp_path / "home"
    _link_assets(home)
    monkeypatch.setenv("MVM_HOME", str(home))
    return Mvm(home)


@pytest.fixture(scope="session")
def kernel(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """mvm's default guest kernel and initrd, once for the whole session: a copy of what
    `mvm setup` installed, brought up to date (installed afresh when it is not current)."""
    from mvm.image.kernel import install_default_kernel

    dest = tmp_path_factory.mktemp("kernel")
    if (ASSETS_HOME / "kernel").is_dir():
        shutil.copytree(ASSETS_HOME / "kernel", dest, dirs_exist_ok=True)
    return install_default_kernel(dest)


def needs_assets(*names: str) -> pytest.MarkDecorator:
    missing = [n for n in names if not (ASSETS_HOME / n).exists()]
    return pytest.mark.skipif(bool(missing), reason=f"run `make setup` first: missing {missing}")


@pytest.fixture
def flake_copy(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Copy a fixture flake into a fresh directory (outside any git tree)."""

    def make(name: str) -> Path:
        dest = tmp_path / "flakes" / name
        shutil.copytree(FIXTURES / name, dest)
        return dest

    return make


def _kill_guests_of(home: Path) -> None:
    """Safety net: no hypervisor of a test's MVM_HOME outlives the test."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(home).encode() in cmd and b"qemu" in cmd:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of the test's own, so the host's network is never touched."""
    name = f"mvmtest-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def gmvm(tmp_path: Path, netns: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Mvm]:
    """The CLI inside a test namespace, for tests that boot guests; everything torn down after."""
    home = tmp_path / "home"
    _link_assets(home)
    monkeypatch.setenv("MVM_HOME", str(home))
    m = Mvm(home, ns=netns)
    try:
        yield m
    finally:
        for t in json.loads(m("tenant", "list", "--json").out or "[]"):
            m("tenant", "destroy", t["id"], "--force")
        _kill_guests_of(home)


SECRETS = {"API_KEY": "s3cr3t-value", "DB_URL": "postgres://db/acme"}


def setup_pool(m: Mvm, flake: Path, tmp: Path, pool: str = "acme/workers", *extra: str) -> None:
    """A tenant with secrets and a built pool of the app flake, as a user makes them."""
    m.ok("tenant", "create", "acme")
    (tmp / "secrets.json").write_text(json.dumps(SECRETS))
    m.ok("tenant", "secrets", "set", "acme", "--from-file", str(tmp / "secrets.json"))
    m.ok("pool", "create", pool, "--flake", str(flake), "--profile", "baseline", "--cpus", "1",
         "--mem", "256", "--data-disk", "64", *extra)
    m.ok("pool", "build", pool)


class Templates:
    """Homes made once per session, each by its `setup(m, root)` (real commands: tenants, pools,
    real `pool build`s), inside a namespace of its own as the tests that copy them run in one.
    A test starts from a copy (`clone`) instead of building the same pools again."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory = factory
        self.homes: dict[str, Path] = {}

    def home(self, key: str, setup: Callable[[Mvm, Path], None]) -> Path:
        if key not in self.homes:
            root = self.factory.mktemp(f"template-{key}")
            home = root / "home"
            _link_assets(home)
            name = f"mvmtest-{secrets.token_hex(3)}"
            subprocess.run(["ip", "netns", "add", name], check=True)
            try:
                setup(Mvm(home, ns=name), root)
            finally:
                subprocess.run(["ip", "netns", "del", name], check=False)
            self.homes[key] = home
        return self.homes[key]

    def clone(self, m: Mvm, key: str, setup: Callable[[Mvm, Path], None]) -> None:
        """`m`'s home becomes a copy of the template `key` (made first if need be)."""
        clone_home(self.home(key, setup), m.home)


@pytest.fixture(scope="session")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Templates:
    return Templates(tmp_path_factory)


def _app_pool(m: Mvm, root: Path) -> None:
    flake = root / "flakes" / "app-flake"
    shutil.copytree(FIXTURES / "app-flake", flake)
    setup_pool(m, flake, root)


def clone_home(template: Path, home: Path) -> None:
    """`home` becomes a copy of `template` (no guest of it ever ran): its own database, files
    and revision images; the asset links and the flake it was built from are shared."""
    shutil.rmtree(home)
    shutil.copytree(template, home, symlinks=True)
    db = sqlite3.connect(home / "mvm.db")
    with db:
        db.execute("UPDATE builds SET log = replace(log, ?, ?)", (str(template), str(home)))
    db.close()


@pytest.fixture
def app_pool(gmvm: Mvm, templates: Templates) -> None:
    """`gmvm`'s home holds what `setup_pool(gmvm, <app flake>, tmp)` makes: tenant `acme` with
    SECRETS, pool `acme/workers` built and current. The build ran once per session."""
    templates.clone(gmvm, "app", _app_pool)


def instances_by_state(m: Mvm, pool: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for i in json.loads(m.ok("instance", "list", pool, "--json").out):
        out.setdefault(i["state"], []).append(i["address"])
    return out


def sh(m: Mvm, inst: str, script: str, **kw: object) -> Result:
    """Run a shell script in a guest through `mvm instance exec`."""
    return m("instance", "exec", inst, "--", "sh", "-c", script, **kw)  # type: ignore[arg-type]


def corrupt(path: Path, blocks: int = 10, size: int = 512) -> None:
    """Flip every bit of `blocks` runs of `size` bytes spread inside the file, as a failing
    disk might (the size stays)."""
    total = path.stat().st_size
    assert total >= blocks * size
    with open(path, "r+b") as f:
        for k in range(blocks):
            f.seek((k + 1) * (total - size) // (blocks + 1))
            run = f.read(size)
            f.seek(-len(run), os.SEEK_CUR)
            f.write(bytes(b ^ 0xFF for b in run))
