"""Text from outside (errors, paths, flake refs, report and progress lines, table cells) is
printed literally: never read as Rich markup or emoji codes, and never a crash."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import pytest
import typer

from mvm.cli import main as cli
from mvm.cli import output
from tests.conftest import Mvm

# Rich would read these as closing tags, styles and an emoji code.
MARKUP = "[/bold]x[red]y[/]z:smile:[/x]"


def fake_pool(mvm: Mvm, profile: str = "minimal", flake: str = "path:/tmp/flake",
              data_disk: int = 0) -> str:
    """A tenant and a pool whose current revision has a rootfs but no kernel, recorded
    directly in the store (no Nix): starting one of its instances fails at the boot check."""
    from mvm.config.paths import Layout
    from mvm.model import Pool
    from mvm.store import SqliteStore

    mvm.ok("tenant", "create", "acme")
    mvm.ok("config", "set", "accel", "tcg")  # no KVM probe
    layout = Layout(mvm.home)
    store = SqliteStore(layout.db_path())
    try:
        store.add_pool(Pool("acme", "web", flake, profile, 1, 256, data_disk, "none"))
        rev = "a" * 12
        rdir = layout.revision_dir("acme", "web", rev)
        rdir.mkdir(parents=True)
        (rdir / "rootfs.ext4").write_bytes(b"")
        store.set_pool_current("acme", "web", rev)
    finally:
        store.close()
    return "acme/web"


def one_error(r_err: str) -> str:
    lines = [ln for ln in r_err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r_err
    return lines[0]


# -- the real CLI ----------------------------------------------------------------------

@pytest.mark.parametrize("flake", ["/tmp/x[/bold]y", "./[red]nope", f"/tmp/{MARKUP}"])
def test_flake_path_in_error_is_literal(mvm: Mvm, tmp_path: Path, flake: str) -> None:
    mvm.ok("tenant", "create", "acme")
    r = mvm("pool", "create", "acme/web", "--flake", flake, cwd=tmp_path)
    assert (r.rc, r.out) == (2, ""), (r.rc, r.err)
    line = one_error(r.err)
    assert line.startswith(f"error: no flake at '{flake}': ")
    shown = flake if flake.startswith("/") else str(tmp_path / flake[2:])
    assert f"{shown}/flake.nix does not exist" in line


def test_secrets_file_path_in_error_is_literal(mvm: Mvm, tmp_path: Path) -> None:
    mvm.ok("tenant", "create", "acme")
    missing = tmp_path / f"s{MARKUP}.json"
    r = mvm("tenant", "secrets", "set", "acme", "--from-file", str(missing))
    assert (r.rc, r.out) == (2, "")
    assert one_error(r.err) == (f"error: cannot read {missing}: No such file or directory "
                                "(check the file's path)")
    bad = tmp_path / "a[/x]b.json"  # a directory `a[` holding `x]b.json`
    bad.parent.mkdir()
    bad.write_text("[not json")
    r = mvm("tenant", "secrets", "set", "acme", "--from-file", str(bad))
    assert r.rc == 2
    assert one_error(r.err).startswith(f"error: {bad} is not valid JSON (JSONDecodeError)")


def test_unknown_option_is_literal(mvm: Mvm) -> None:
    r = mvm("tenant", "create", f"--{MARKUP}")
    assert r.rc == 2
    assert one_error(r.err) == (f"error: No such option '--{MARKUP}'. "
                                "(see `mvm tenant create --help`)")


def test_config_value_in_table_is_literal(mvm: Mvm) -> None:
    ref = f"path:/tmp/{MARKUP}"
    mvm.ok("config", "set", "nixpkgs", ref)
    r = mvm("config", "list")
    assert (r.rc, r.err) == (0, ""), (r.rc, r.err)
    row = next(ln for ln in r.out.splitlines() if ln.startswith("nixpkgs"))
    assert ref in row


def test_pool_fields_in_table_are_literal(mvm: Mvm) -> None:
    pool = fake_pool(mvm, profile=MARKUP, flake=f"path:/tmp/{MARKUP}")
    r = mvm("pool", "list")
    assert (r.rc, r.err) == (0, ""), (r.rc, r.err)
    assert MARKUP in r.out.splitlines()[1]
    assert f"flake: path:/tmp/{MARKUP}" in mvm.ok("pool", "info", pool).out


def test_pool_scale_reports_markup_error_literally(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The tracker's case: an instance fails with an error holding `[/…]`; scale reports it
    and exits with the error's own code instead of `internal error: MarkupError`, 70."""
    home = tmp_path / f"home{MARKUP}"
    monkeypatch.setenv("MVM_HOME", str(home))
    mvm = Mvm(home)
    mvm.env["MVM_RUNTIME_DIR"] = str(tmp_path / "run")
    pool = fake_pool(mvm)
    r = mvm("pool", "scale", pool, "--running", "1")
    assert r.rc == 9, (r.rc, r.err)  # RuntimeFailure, not 70
    kernel = f"{home}/tenants/acme/pools/web/artifacts/revisions/{'a' * 12}/vmlinux"
    assert len(r.errors) == 1 and r.lines[-1] == r.errors[0], r.err
    assert r.errors[0].startswith("error: i-") and f"kernel {kernel} does not exist" in r.errors[0]
    failed = [ln for ln in r.lines if ": failed: " in ln]
    assert len(failed) == 1 and f"kernel {kernel} does not exist" in failed[0], r.err
    assert any(ln.endswith(": created") for ln in r.lines)
    # progress lines name the step literally too
    assert any(" secrets: " in ln for ln in r.lines), r.err


def command_paths() -> list[list[str]]:
    """Every command and group of the CLI, as the words that name it."""
    out: list[list[str]] = []
    todo: list[tuple[click.Command, list[str]]] = [(typer.main.get_command(cli.app), [])]
    while todo:
        cmd, path = todo.pop()
        out.append(path)
        if isinstance(cmd, click.Group):
            todo += [(sub, [*path, name]) for name, sub in cmd.commands.items()]
    return out


def test_no_help_shows_a_markup_escape(capsys: pytest.CaptureFixture[str]) -> None:
    """Typer escapes `[required]`, `[default: …]` and `[env var: …]` for Rich even when Rich
    does not print the help: every command's --help shows them as they are."""
    umask = os.umask(0o022)
    os.umask(umask)
    helps: dict[str, str] = {}
    try:
        for path in command_paths():
            assert cli.main([*path, "--help"]) == 0, path
            helps[" ".join(path)] = capsys.readouterr().out
    finally:
        os.umask(umask)  # (main sets mvm's own)
    assert len(helps) >= 40
    escaped = {cmd: [ln for ln in text.splitlines() if "\\[" in ln] for cmd, text in helps.items()}
    assert {cmd: lines for cmd, lines in escaped.items() if lines} == {}
    create = [ln.split() for ln in helps["pool create"].splitlines()]
    assert ["POOL", "[required]"] in create
    assert ["--profile", "TEXT", "the", "flake's", "package", "to", "build", "[default:", "minimal]"] in create
    assert "[env var: MVM_AGENT]" in " ".join(helps[""].split())


# -- the error edge and the output helpers, in process ---------------------------------

def test_internal_error_is_literal(monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from mvm.config import settings

    def boom(layout: object) -> dict[str, str]:
        raise RuntimeError(f"boom {MARKUP}")

    monkeypatch.setattr(settings, "raw", boom)
    assert cli.main(["config", "list"]) == 70
    cap = capsys.readouterr()
    assert cap.out == ""
    assert cap.err == (f"error: internal error: RuntimeError: boom {MARKUP} "
                       "(rerun with --debug for a traceback)\n")


def test_error_helper(capsys: pytest.CaptureFixture[str]) -> None:
    output.error(MARKUP)
    assert capsys.readouterr().err == f"error: {MARKUP}\n"


def test_note_helper(capsys: pytest.CaptureFixture[str]) -> None:
    output.note(f"i-1: failed: {MARKUP}")
    cap = capsys.readouterr()
    assert (cap.out, cap.err) == ("", f"i-1: failed: {MARKUP}\n")


def test_steps_helper(capsys: pytest.CaptureFixture[str]) -> None:
    steps = output.StepPrinter(f"build {MARKUP}")
    steps(MARKUP, "…")
    steps(MARKUP, f"done {MARKUP}")
    steps("kernel", f"/nix/store/{MARKUP}")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"build {MARKUP} {MARKUP} …"
    assert lines[1].startswith(f"build {MARKUP} {MARKUP}: done {MARKUP} (")
    assert lines[1].endswith("s)")
    assert lines[2] == f"build {MARKUP} kernel: /nix/store/{MARKUP}"


def test_table_helper(capsys: pytest.CaptureFixture[str]) -> None:
    output.table(["a", MARKUP], [(MARKUP, None), ("x", 1)])
    lines = [ln.rstrip() for ln in capsys.readouterr().out.splitlines()]
    assert lines[0].split() == ["a", MARKUP]
    assert lines[1] == MARKUP
    assert lines[2].split() == ["x", "1"]


def test_json_is_unaffected(capsys: pytest.CaptureFixture[str]) -> None:
    output.emit_json({"k": MARKUP})
    assert json.loads(capsys.readouterr().out) == {"k": MARKUP}
