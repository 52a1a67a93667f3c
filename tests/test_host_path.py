"""mvm runs as root from cron or a minimal service, whose PATH may lack the sbin directories:
the tools it needs there (mkfs.ext4, debugfs, nft, ip, useradd, …) are still found."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from mvm.errors import CommandFailed
from mvm.util import proc
from tests.conftest import Mvm

MINIMAL_PATH = "/usr/bin:/bin"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

pytestmark = pytest.mark.skipif(
    shutil.which("mkfs.ext4", path=MINIMAL_PATH) is not None
    or shutil.which("mkfs.ext4", path=SYSTEM_PATH) is None,
    reason="needs mkfs.ext4 in an sbin directory (as on Debian and Ubuntu)")


@pytest.fixture
def minimal_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", MINIMAL_PATH)


@pytest.mark.usefixtures("minimal_path")
def test_run_finds_sbin_tool_off_path() -> None:
    assert shutil.which("mkfs.ext4") is None  # what the bug report saw
    r = proc.run(["mkfs.ext4", "-V"], timeout=10)
    assert r.returncode == 0 and b"mke2fs" in r.stderr
    assert proc.run(["debugfs", "-V"], timeout=10).returncode == 0
    found = proc.which("mkfs.ext4")
    assert found is not None and os.path.dirname(found) in SYSTEM_PATH.split(":")
    assert proc.which("debugfs") is not None


@pytest.mark.usefixtures("minimal_path")
def test_run_falls_back_with_explicit_env_too() -> None:
    r = proc.run(["mkfs.ext4", "-V"], env={"PATH": "/nonexistent", "LC_ALL": "C"}, timeout=10)
    assert r.returncode == 0


def test_child_environment_and_argv0_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               minimal_path: None) -> None:
    """A program found only in a system dir runs with the caller's PATH, argv[0] as given."""
    sysdir = tmp_path / "sbin"
    sysdir.mkdir()
    tool = sysdir / "mvmtest-tool"
    tool.write_text('#!/bin/sh\necho "PATH=$PATH"\necho "args=$*"\n')
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(proc, "SYSTEM_DIRS", (str(sysdir),))
    assert proc.which("mvmtest-tool") == str(tool)
    out = proc.output(["mvmtest-tool", "a b", "c"])
    assert out == f"PATH={MINIMAL_PATH}\nargs=a b c\n"


def test_on_path_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A program on PATH is used as before; system dirs are only the fallback."""
    own = tmp_path / "bin"
    own.mkdir()
    tool = own / "mkfs.ext4"
    tool.write_text("#!/bin/sh\necho mine\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{own}:{MINIMAL_PATH}")
    assert proc.output(["mkfs.ext4"]) == "mine\n"
    assert proc.which("mkfs.ext4") == str(tool)


@pytest.mark.usefixtures("minimal_path")
def test_missing_everywhere_is_one_clear_error() -> None:
    with pytest.raises(CommandFailed) as e:
        proc.run(["mvm-no-such-tool-anywhere"])
    assert e.value.message == "mvm-no-such-tool-anywhere: not found"
    assert e.value.returncode == 127
    assert proc.which("mvm-no-such-tool-anywhere") is None


def test_secrets_image_built_without_sbin_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  minimal_path: None) -> None:
    """The step `wake` and `start` failed on: the secrets disk (mkfs.ext4 + debugfs)."""
    from mvm.config.paths import Layout
    from mvm.lifecycle import secrets_disk

    layout = Layout(tmp_path / "home", tmp_path / "run")
    layout.secrets_file("acme").parent.mkdir(parents=True)
    layout.secrets_file("acme").write_text('{"API_KEY": "k"}\n')
    image = secrets_disk.build(layout, "acme", "i-1a2b3c4d")
    data = image.read_bytes()
    assert len(data) == secrets_disk.SIZE_MIB * 2**20
    assert data[1024 + 56:1024 + 58] == b"\x53\xef"  # ext4 superblock magic
    assert data[1024 + 120:1024 + 136].rstrip(b"\0") == secrets_disk.LABEL.encode()
    again = secrets_disk.build(layout, "acme", "i-1a2b3c4d").read_bytes()
    assert again == data  # still reproducible (debugfs pinned the times)


def test_cli_with_minimal_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the CLI: creating an instance with a data disk (mkfs.ext4) succeeds, and
    `instance start` gets past its secrets disk to the boot (which fails: no kernel here)."""
    from tests.test_cli_markup import fake_pool

    home = tmp_path / "home"
    monkeypatch.setenv("MVM_HOME", str(home))
    mvm = Mvm(home)
    mvm.env["MVM_RUNTIME_DIR"] = str(tmp_path / "run")
    mvm.env["PATH"] = MINIMAL_PATH
    pool = fake_pool(mvm, data_disk=8)
    r = mvm("instance", "create", pool)
    assert r.rc == 0, r.err
    inst = r.out.strip()
    iid = inst.split("/")[-1]
    disk = home / "tenants/acme/pools/web/instances" / iid / "data.ext4"
    assert disk.read_bytes()[1024 + 56:1024 + 58] == b"\x53\xef"
    r = mvm("instance", "start", inst)
    assert r.rc == 9, r.err  # RuntimeFailure at boot, not 8 (mkfs.ext4: not found)
    assert any(ln.startswith(f"start {inst} secrets: ") for ln in r.lines), r.err
    assert "vmlinux does not exist" in r.errors[0] and "not found" not in r.err
