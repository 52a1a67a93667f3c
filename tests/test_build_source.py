"""A tenant's flake source is checked and copied by mvm, never evaluated on the host, and names
no host path (fast: no Nix runs here; see test_build_hostile.py for real builds)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from mvm.config.paths import Layout
from mvm.image import source
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


# -- the directory recorded at pool create, swapped afterwards (issue 16 item 2) ----------------

def _root_only(d: Path, secret: str) -> Path:
    """A directory only root reads, holding a flake and a private file."""
    flake(d)
    (d / "private.key").write_text(secret)
    os.chmod(d, 0o700)
    return d


@pytest.mark.parametrize("swap", ["flake-dir-link", "parent-link", "other-dir-moved-in"])
def test_a_flake_directory_swapped_after_create_is_refused(tmp_path: Path, layout: Layout,
                                                           swap: str) -> None:
    user = tmp_path / "user"  # a directory a local user owns, holding the flake
    flake(user / "f")
    (user / "f" / "mine").write_text("the tenant's own file")
    ref = source.check_ref(str(user / "f"), layout)
    recorded = source.identity(ref)
    victim = _root_only(tmp_path / "root-only" / "f", "root's private key")
    if swap == "flake-dir-link":  # the flake's directory replaced by a link to a root-only one
        os.rename(user / "f", user / "f.old")
        (user / "f").symlink_to(victim)
    elif swap == "parent-link":  # a directory above it replaced by a link
        os.rename(user, tmp_path / "user.old")
        user.symlink_to(victim.parent)
    else:  # another real directory moved into its place
        os.rename(user / "f", user / "f.old")
        flake(user / "f")
        (user / "f" / "other").write_text("x")
    dest = tmp_path / "copy"
    for expect in (recorded, ""):  # "": a pool made before the record (its path is still opened
        with pytest.raises(source.SourceRefused) as e:  # without following any link)
            source.stage(ref, dest, layout, expect=expect)
        assert "not the one recorded at pool create" in e.value.line() and "\n" not in e.value.line()
        assert not dest.exists()
        if swap == "other-dir-moved-in":
            break  # (without a record, a real directory there is the flake's directory)
    # put back: built as before, the tenant's own files only
    if swap == "parent-link":
        user.unlink()
        os.rename(tmp_path / "user.old", user)
    else:
        shutil.rmtree(user / "f") if not (user / "f").is_symlink() else (user / "f").unlink()
        os.rename(user / "f.old", user / "f")
    assert source.stage(ref, dest, layout, expect=recorded) == dest
    assert sorted(p.name for p in dest.iterdir()) == ["flake.nix", "mine"]


def test_a_git_repository_swapped_after_create_is_refused(tmp_path: Path, layout: Layout) -> None:
    def repo(d: Path, text: str) -> Path:
        flake(d, text)
        git = ["git", "-C", str(d), "-c", "user.name=t", "-c", "user.email=t@t"]
        subprocess.run(["git", "init", "-q", str(d)], check=True)
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-qm", "one"], check=True)
        return d

    (tmp_path / "user").mkdir()
    repo(tmp_path / "user" / "repo", "{ outputs = _: { mine = 1; }; }")
    (tmp_path / "user" / "link").symlink_to("repo")
    ref = source.check_ref(f"git+file://{tmp_path}/user/link?dir=", layout)
    assert ref == f"git+file://{tmp_path}/user/repo?dir="  # recorded resolved
    recorded = source.identity(ref)
    victim = repo(tmp_path / "root-only", "{ outputs = _: { roots = 1; }; }")
    os.chmod(victim, 0o700)
    os.rename(tmp_path / "user" / "repo", tmp_path / "user" / "repo.old")
    (tmp_path / "user" / "repo").symlink_to(victim)
    with pytest.raises(source.SourceRefused, match="not the one recorded at pool create"):
        source.stage(ref, tmp_path / "copy", layout, expect=recorded)
    assert not (tmp_path / "copy").exists()


def test_a_git_repository_is_read_as_its_owner(tmp_path: Path, layout: Layout) -> None:
    """A repository's `.git` may name any directory (a `gitdir:` file, linked objects or refs):
    git reads it as the repository directory's owner, so a local user's repository leading to a
    root-only one yields nothing of it."""
    uid = 4242
    victim = tmp_path / "root-only"
    flake(victim, "{ outputs = _: { roots = 1; }; }")
    (victim / "private.key").write_text("root's private key")
    subprocess.run(["git", "init", "-q", str(victim)], check=True)
    git = ["git", "-C", str(victim), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "root"], check=True)
    os.chmod(victim, 0o700)
    user = tmp_path / "user"
    os.chmod(tmp_path, 0o755)
    user.mkdir(mode=0o755)
    mine = user / "repo"
    flake(mine, "{ outputs = _: { mine = 1; }; }")
    subprocess.run(["git", "init", "-q", str(mine)], check=True)
    subprocess.run(["git", "-C", str(mine), "-c", "user.name=u", "-c", "user.email=u@u", "add", "-A"],
                   check=True)
    subprocess.run(["git", "-C", str(mine), "-c", "user.name=u", "-c", "user.email=u@u", "commit",
                    "-qm", "mine"], check=True)
    subprocess.run(["chown", "-R", f"{uid}:{uid}", str(user)], check=True)
    ref = source.check_ref(f"git+file://{mine}", layout)
    got = source.stage(ref, tmp_path / "copy", layout, expect=source.identity(ref))
    assert (got / "flake.nix").read_text() == "{ outputs = _: { mine = 1; }; }"  # its own: fine
    shutil.rmtree(mine / ".git")
    (mine / ".git").write_text(f"gitdir: {victim}/.git\n")  # the user's .git names root's
    with pytest.raises(source.SourceRefused) as e:
        source.stage(ref, tmp_path / "copy2", layout, expect=source.identity(ref))
    assert "\n" not in e.value.line()
    assert not (tmp_path / "copy2").exists()


def test_pool_build_refuses_a_flake_directory_swapped_after_create(mvm: Mvm, tmp_path: Path) -> None:
    nix = tmp_path / "no-nix"  # no real build: whatever reaches Nix is recorded, and fails
    nix.mkdir()
    ran = tmp_path / "nix-ran"
    (nix / "nix").write_text(f"#!/bin/sh\necho \"$@\" >> {ran}\nexit 99\n")
    os.chmod(nix / "nix", 0o755)
    mvm.env["PATH"] = f"{nix}:{os.environ['PATH']}"
    user = tmp_path / "user"
    flake(user / "f")
    victim = _root_only(tmp_path / "root-only", "root's private key")
    mvm.ok("tenant", "create", "acme")
    mvm.ok("pool", "create", "acme/p", "--flake", str(user / "f"), "--profile", "minimal")
    mvm.ok("pool", "create", "acme/old", "--flake", str(user / "f"), "--profile", "minimal")
    pools = {p["id"]: p for p in json.loads(mvm.ok("pool", "list", "acme", "--json").out)}
    st = os.stat(user / "f")
    assert pools["p"]["flake_id"] == f"{st.st_dev}:{st.st_ino}"
    # acme/old: made before mvm recorded the directory
    with contextlib.closing(sqlite3.connect(mvm.home / "mvm.db")) as db, db:
        db.execute("UPDATE pools SET flake_id='' WHERE id='old'")
    os.rename(user / "f", user / "f.old")
    (user / "f").symlink_to(victim)
    for pool in ("acme/p", "acme/old"):
        r = mvm("pool", "build", pool)
        assert r.rc != 0 and len(r.errors) == 1, r.err
        assert f"flake directory {user / 'f'} is not the one recorded at pool create" in r.errors[0]
        assert not ran.exists()  # refused before Nix saw anything
        info = json.loads(mvm.ok("pool", "info", pool, "--json").out)
        assert info["current"] is None and info["builds"][-1]["status"] == "failed"
    assert not any(b"root's private key" in p.read_bytes() for p in mvm.home.rglob("*")
                   if p.is_file() and not p.is_symlink())
    # put back: both pools build their own directory again (acme/old records it now)
    (user / "f").unlink()
    os.rename(user / "f.old", user / "f")
    for pool in ("acme/p", "acme/old"):
        r = mvm("pool", "build", pool)
        assert r.rc != 0 and ran.exists(), r.err  # (this time the fake Nix is reached)
        ran.unlink()
    pools = {p["id"]: p for p in json.loads(mvm.ok("pool", "list", "acme", "--json").out)}
    assert pools["old"]["flake_id"] == pools["p"]["flake_id"]


@pytest.mark.parametrize("name", ["absolute path:", "git+file", "computed"])
def test_the_builder_vm_gets_a_local_flake_only_after_its_inputs_are_checked(
        tmp_path: Path, layout: Layout, name: str) -> None:
    """The builder microVM's input disk is made from a flake whose inputs the host checked
    first, as for the host builder (issue 16 item 4): no disk is made for one naming a host path."""
    from mvm.builder import on_host, vm_image
    from mvm.model import Pool

    (layout.kernel_dir()).mkdir(parents=True)
    (layout.kernel_dir() / "vmlinux").write_bytes(b"\x7fELF\x02")
    image = vm_image.BuilderInfo(tmp_path / "img", "v1", "", {}, 0, "", 0.0)
    net = {"address": "10.0.0.2/24", "gateway": "10.0.0.1", "dns": []}
    victim = layout.tenant_dir("victim")
    d = flake(tmp_path / "f", BAD_INPUTS[name].replace("@VICTIM@", str(victim)))
    ref = source.check_ref(str(d), layout)
    pool = Pool("acme", "w", ref, "p", 1, 256, flake_id=source.identity(ref))
    with pytest.raises(source.SourceRefused) as e:
        on_host.prepare(layout, "", pool, image, net)
    assert "\n" not in e.value.line()
    assert not list(on_host.workdir(layout, pool).glob("run-*"))  # nothing of it stays
    (d / "flake.nix").write_text(GOOD_INPUTS[0])  # the guide's flake: its input disk is made
    prep = on_host.prepare(layout, "", pool, image, net)
    assert prep.input.is_file() and prep.source is not None
