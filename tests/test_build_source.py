"""A tenant's flake source is checked and copied by mvm, never evaluated on the host, and names
no host path (fast: no Nix runs here; see test_build_hostile.py for real builds)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mvm.build import source
from mvm.config.paths import Layout
from tests.conftest import FIXTURES, Mvm

GOOD_INPUTS = [
    (FIXTURES / "guide-flake" / "flake.nix").read_text(),
    (FIXTURES / "services-flake" / "flake.nix").read_text(),
    (FIXTURES / "app-flake" / "flake.nix").read_text(),
    (Path(source.__file__).parent.parent / "data/builtin-flake/flake.nix").read_text(),
    (Path(source.__file__).parent.parent / "data/nixpkgs-offline/flake.nix").read_text(),
    '{ inputs = { sub = { url = "path:./sub"; flake = false; }; nixpkgs.url = "nixpkgs"; };'
    ' outputs = { self, ... }: { x = "${self}/a ${"nested { }"}"; }; }',
    '{ inputs.nixpkgs.url = "path:/var/lib/mvm/nixpkgs-offline";'
    ' inputs.u = { type = "github"; owner = "a"; repo = "b"; inputs.nixpkgs.follows = "nixpkgs"; };'
    " outputs = _: { s = ''a ''${b} '''c''; }; }",
    '# inputs.x.url = "path:/etc";\n{ /* inputs.y.url = "path:/etc"; */ outputs = _: { }; }',
]

BAD_INPUTS = {
    "absolute path:": '{ inputs.v = { url = "path:@VICTIM@"; flake = false; }; outputs = _: {}; }',
    "bare absolute": '{ inputs.v.url = "@VICTIM@"; outputs = _: {}; }',
    "attr path": '{ inputs.v = { type = "path"; path = "@VICTIM@"; flake = false; }; outputs = _: {}; }',
    "relative out": '{ inputs.v = { url = "path:../../victim"; flake = false; }; outputs = _: {}; }',
    "git+file": '{ inputs.v.url = "git+file://@VICTIM@"; outputs = _: {}; }',
    "file:": '{ inputs.v = { url = "file://@VICTIM@/secrets.json"; flake = false; }; outputs = _: {}; }',
    "tarball+file": '{ inputs = { v.url = "tarball+file:///tmp/x.tar"; }; outputs = _: {}; }',
    "home": '{ inputs.v.url = "path:~/x"; outputs = _: {}; }',
    "computed": '{ inputs.v.url = "pa" + "th:@VICTIM@"; outputs = _: {}; }',
    "interpolated": '{ inputs.v.url = "path:${"@VICTIM@"}"; outputs = _: {}; }',
    "variable": '{ inputs = import ./inputs.nix; outputs = _: {}; }',
    "inherit": '{ inherit (import ./i.nix) inputs; outputs = _: {}; }',
    "let around": 'let v = "path:@VICTIM@"; in { inputs.v.url = v; outputs = _: {}; }',
    "merged": '{ outputs = _: {}; } // import ./more.nix',
    "dynamic attr": '{ ${"inp" + "uts"}.v.url = "path:@VICTIM@"; outputs = _: {}; }',
    "quoted inputs": '{ "inputs".v.url = "path:@VICTIM@"; outputs = _: {}; }',
    "dir escape": '{ inputs.v.url = "github:a/b?dir=../.."; outputs = _: {}; }',
}


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    home = tmp_path / "home"
    (home / "tenants" / "victim").mkdir(parents=True)
    (home / "tenants" / "victim" / "secrets.json").write_text('{"k": "victim-token"}')
    return Layout(home, tmp_path / "run")


def flake(d: Path, text: str = '{ outputs = _: { }; }') -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "flake.nix").write_text(text)
    return d


@pytest.mark.parametrize("text", GOOD_INPUTS)
def test_inputs_of_ordinary_flakes_pass(tmp_path: Path, text: str) -> None:
    source.check_inputs(flake(tmp_path / "f", text), ["path:/var/lib/mvm/nixpkgs-offline"])


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_inputs_naming_host_paths_or_computed_are_refused(tmp_path: Path, layout: Layout, name: str) -> None:
    victim = layout.tenant_dir("victim")
    d = flake(tmp_path / "f", BAD_INPUTS[name].replace("@VICTIM@", str(victim)))
    with pytest.raises(source.SourceRefused) as e:
        source.check_inputs(d, ["path:/var/lib/mvm/nixpkgs-offline"])
    assert "\n" not in e.value.line()


@pytest.mark.parametrize("spec", [
    {"type": "path", "path": "/var/lib/mvm/tenants/victim"},
    {"type": "path", "path": "/nix/store/0000000000000000000000000000000a-source"},
    {"type": "path", "path": "./a/../../x"},
    {"type": "git", "url": "file:///srv/repo"},
    {"type": "git", "url": "/srv/repo"},
    {"type": "tarball", "url": "file:///tmp/x.tar.gz"},
])
def test_a_lock_file_naming_host_paths_is_refused(tmp_path: Path, spec: dict[str, str]) -> None:
    d = flake(tmp_path / "f")
    lock = {"nodes": {"root": {"inputs": {"v": "v"}}, "v": {"locked": spec, "original": spec}},
            "root": "root", "version": 7}
    (d / "flake.lock").write_text(json.dumps(lock))
    with pytest.raises(source.SourceRefused, match="names a host path"):
        source.check_inputs(d, [])
    lock["nodes"]["v"] = {"original": {"type": "path", "path": "./sub"},
                          "locked": {"type": "path", "path": "./sub"}}
    (d / "flake.lock").write_text(json.dumps(lock))
    source.check_inputs(d, [])  # inside the flake: fine


def test_the_copy_is_the_flake_directory_own_tree(tmp_path: Path, layout: Layout) -> None:
    d = flake(tmp_path / "f")
    (d / "secrets.json").write_text('{"api_key": "tenant-token"}')  # as the guide's commands leave it
    (d / "sub").mkdir()
    (d / "sub" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(d / "sub" / "run.sh", 0o755)
    (d / "link").symlink_to("sub/run.sh")
    (d / "sub" / "up").symlink_to("../flake.nix")
    (d / "result").symlink_to("/nix/store/0000000000000000000000000000000a-x")  # nix build's link
    dest = tmp_path / "copy"
    assert source.stage(str(d), dest, layout) == dest
    names = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    assert names == ["flake.nix", "link", "sub", "sub/run.sh", "sub/up"]
    assert os.stat(dest / "sub/run.sh").st_mode & 0o111 and os.readlink(dest / "link") == "sub/run.sh"


@pytest.mark.parametrize("target", ["/etc", "@VICTIM@/secrets.json", "../outside", "b/..", "b/../..",
                                    "sub/../../outside"])
def test_links_leaving_the_flake_directory_are_refused(tmp_path: Path, layout: Layout, target: str) -> None:
    d = flake(tmp_path / "f")
    (d / "sub").mkdir()
    (d / "b").symlink_to(".")  # `b/..` is the parent of the flake's directory, not the directory
    (d / "evil").symlink_to(target.replace("@VICTIM@", str(layout.tenant_dir("victim"))))
    with pytest.raises(source.SourceRefused, match="leaves the flake's directory") as e:
        source.stage(str(d), tmp_path / "copy", layout)
    assert "\n" not in e.value.line()


def test_a_fifo_in_the_source_is_refused(tmp_path: Path, layout: Layout) -> None:
    d = flake(tmp_path / "f")
    os.mkfifo(d / "pipe")
    with pytest.raises(source.SourceRefused, match="not a file, directory or link"):
        source.stage(str(d), tmp_path / "copy", layout)


def test_a_git_repository_gives_its_committed_tree(tmp_path: Path, layout: Layout) -> None:
    repo = tmp_path / "repo"
    flake(repo / "sub", '{ outputs = _: { v = 1; }; }')
    (repo / "sub" / "secrets.json").write_text("{}")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    (repo / "sub" / "flake.nix").write_text('{ outputs = _: { v = 2; }; }')  # not committed
    (repo / "sub" / "untracked").write_text("x")
    ref = source.check_ref(f"git+file://{repo}?dir=sub", layout)
    dest = tmp_path / "copy"
    got = source.stage(ref, dest, layout)
    assert (got / "flake.nix").read_text() == '{ outputs = _: { v = 1; }; }'
    assert sorted(p.name for p in got.iterdir()) == ["flake.nix"]


@pytest.mark.parametrize("ref", ["-L:x", "--impure", "file:///etc/passwd", "tarball+file:///tmp/x.tgz",
                                 "flake:nixpkgs", "/etc", "path:/etc?dir=x", "nonexistent-dir",
                                 "git+file://host/repo"])
def test_refs_refused_by_their_form(tmp_path: Path, layout: Layout, ref: str) -> None:
    with pytest.raises(source.SourceRefused) as e:
        source.check_ref(ref, layout, base=tmp_path)
    assert "\n" not in e.value.line()


def test_flake_directories_in_mvm_state_are_refused(tmp_path: Path, layout: Layout) -> None:
    victim = flake(layout.tenant_dir("victim"))  # even with a flake.nix planted there
    (tmp_path / "innocent").symlink_to(victim)
    for ref in (str(victim), f"path:{victim}", str(tmp_path / "innocent"), str(layout.home)):
        with pytest.raises(source.SourceRefused, match=r"inside mvm's state|no flake"):
            source.check_ref(ref, layout)
    builtin = flake(layout.builtin_flake_dir())
    assert source.check_ref(str(builtin), layout) == str(builtin.resolve())  # mvm's own


def test_pool_create_checks_the_form_and_evaluates_nothing(mvm: Mvm, tmp_path: Path) -> None:
    mvm.ok("tenant", "create", "acme")
    mvm.ok("tenant", "create", "victim")
    secrets = tmp_path / "s.json"
    secrets.write_text('{"k": "v"}')
    mvm.ok("tenant", "secrets", "set", "victim", "--from-file", str(secrets))
    before = mvm.ok("pool", "list", "--json").out
    for ref in ("-L:x", f"path:{mvm.home}/tenants/victim", "/etc", "file:///etc/shadow"):
        r = mvm("pool", "create", "acme/p", f"--flake={ref}")
        assert r.rc != 0 and len(r.lines) == 1 and r.lines[0].startswith("error: "), (ref, r.err)
    r = mvm("pool", "create", "acme/p", "--flake", str(FIXTURES / "guide-flake"), "--profile", "x#y")
    assert r.rc == 2 and len(r.lines) == 1 and "not a name" in r.err
    assert mvm.ok("pool", "list", "--json").out == before
    # no evaluation: a flake that does not even parse is accepted; its first build says so
    broken = flake(tmp_path / "broken", "{ this is not nix")
    nix = tmp_path / "no-nix"
    nix.mkdir()
    (nix / "nix").write_text("#!/bin/sh\necho nix ran >&2; exit 99\n")
    os.chmod(nix / "nix", 0o755)
    mvm.env["PATH"] = f"{nix}:{os.environ['PATH']}"
    r = mvm.ok("pool", "create", "acme/p", "--flake", str(broken), "--profile", "nope")
    assert str(broken) in r.out
    shutil.rmtree(broken)
