"""Shared fixtures: an isolated MVM_HOME per test, and the real `mvm` CLI run as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
    def lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.strip()]


class Mvm:
    """Runs the real `mvm` CLI in a subprocess against one MVM_HOME."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = dict(os.environ, MVM_HOME=str(home), COLUMNS="200", NO_COLOR="1")

    def __call__(self, *args: str, check: bool = False, timeout: float = 900,
                 cwd: Path | None = None, ns: str | None = None) -> Result:
        argv = [sys.executable, "-m", "mvm.cli.main", *args]
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
    for name in ("kernel", "builtin-flake", "nixpkgs-offline", "kvm-probe.json"):
        src = ASSETS_HOME / name
        if src.exists():
            (home / name).symlink_to(src)
    cfg = ASSETS_HOME / "config.json"
    if cfg.exists():
        shutil.copyfile(cfg, home / "config.json")


@pytest.fixture
def mvm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Mvm:
    home = tmp_path / "home"
    _link_assets(home)
    monkeypatch.setenv("MVM_HOME", str(home))
    return Mvm(home)


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
