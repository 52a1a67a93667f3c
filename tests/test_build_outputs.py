"""A build's output is a tenant's: packing it follows no link out of its closure and writes
through none (fast: hostile outputs laid out in a stand-in store, packed by the real code)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mvm.guest.layout import install_guest_files
from mvm.image import outputs, rootfs


def snapshot(*dirs: Path) -> dict[str, tuple[int, int, bytes | str | None]]:
    """Mode, mtime and content of everything under the given host directories."""
    out: dict[str, tuple[int, int, bytes | str | None]] = {}
    for d in dirs:
        for p in [d, *d.rglob("*")]:
            st = p.lstat()
            body: bytes | str | None = (p.read_bytes() if p.is_file() and not p.is_symlink()
                                        else os.readlink(p) if p.is_symlink() else None)
            out[str(p)] = (st.st_mode, st.st_mtime_ns, body)
    return out


@pytest.fixture
def host(tmp_path: Path) -> dict[str, Path]:
    """A stand-in Nix store, another tenant's directory with secrets, and host directories."""
    victim = tmp_path / "home/tenants/victim"
    victim.mkdir(parents=True)
    (victim / "secrets.json").write_text('{"api_key": "victim-secret-bytes"}')
    hostdir = tmp_path / "host/usr-like"
    hostdir.mkdir(parents=True)
    (hostdir / "keep").write_text("host file")
    hosttmp = tmp_path / "host/tmp-like"
    hosttmp.mkdir()
    hosttmp.chmod(0o700)
    store = tmp_path / "nix/store"
    store.mkdir(parents=True)
    return {"victim": victim, "hostdir": hostdir, "hosttmp": hosttmp, "store": store,
            "staging": tmp_path / "staging"}


def out_path(store: Path, name: str = "aaaa-profile") -> Path:
    p = store / name
    (p / "bin").mkdir(parents=True)
    (p / "bin" / "hello").write_text("#!/bin/sh\necho hi\n")
    return p


def staged_bytes(staging: Path) -> bytes:
    return b"".join(p.read_bytes() for p in staging.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.mark.parametrize("target", ["victim", "/etc"])
def test_an_output_that_is_a_link_out_of_the_closure_is_refused(host: dict[str, Path], target: str) -> None:
    store = host["store"]
    dest = str(host["victim"]) if target == "victim" else "/etc"
    (store / "bbbb-evil").symlink_to(dest)
    before = snapshot(host["victim"])
    with pytest.raises(outputs.OutsideClosure) as e:
        rootfs.stage(str(store / "bbbb-evil"), [str(store / "bbbb-evil")], host["staging"],
                     install_guest_files, store)
    assert dest in e.value.line() and "outside the build's closure" in e.value.line()
    assert "\n" not in e.value.line()
    assert not host["staging"].exists() or b"victim-secret-bytes" not in staged_bytes(host["staging"])
    assert snapshot(host["victim"]) == before


def test_tmp_and_usr_linked_to_host_directories_are_never_written_through(host: dict[str, Path]) -> None:
    store, staging = host["store"], host["staging"]
    out = out_path(store)
    (out / "tmp").symlink_to(host["hosttmp"])
    (out / "usr").symlink_to(host["hostdir"])
    (out / "mvm").mkdir()  # mvm's own directory, with a link where mvm writes its files
    (out / "mvm" / ".busybox.tmp").symlink_to(host["hostdir"] / "keep")
    (out / "etc").symlink_to(host["hostdir"])  # resolv.conf must not be made in it
    before = snapshot(host["hostdir"], host["hosttmp"])
    rootfs.stage(str(out), [str(out)], staging, install_guest_files, store)
    assert snapshot(host["hostdir"], host["hosttmp"]) == before  # no mode, file or link changed
    tmp = os.lstat(staging / "tmp")
    assert stat.S_ISDIR(tmp.st_mode) and stat.S_IMODE(tmp.st_mode) == 0o1777  # mvm's own /tmp
    assert os.readlink(staging / "usr") == str(host["hostdir"])  # kept as the profile made it
    assert os.readlink(staging / "etc") == str(host["hostdir"])
    assert (staging / "mvm" / "init").is_file() and not (staging / "mvm" / ".busybox.tmp").exists()
    assert (staging / "bin" / "hello").is_file() and not (staging / "bin" / "hello").is_symlink()


def test_a_normal_profile_is_laid_out_as_before(host: dict[str, Path]) -> None:
    store, staging = host["store"], host["staging"]
    lib = store / "cccc-lib"
    (lib / "lib64").mkdir(parents=True)
    (lib / "lib64" / "ld.so").write_bytes(b"\x7fELF")
    out = out_path(store)
    (out / "lib64").symlink_to(lib / "lib64")  # buildEnv's links into the closure
    closure = [str(lib), str(out)]
    rootfs.stage(str(out), closure, staging, install_guest_files, store)
    assert os.readlink(staging / "lib64") == str(lib / "lib64")
    assert (staging / "nix/store/cccc-lib/lib64/ld.so").read_bytes() == b"\x7fELF"
    assert os.readlink(staging / "usr/bin") == "../bin" and os.readlink(staging / "usr/lib64") == "../lib64"
    for d in ("proc", "sys", "dev", "run", "data", "etc", "root", "var"):
        assert stat.S_ISDIR(os.lstat(staging / d).st_mode), d
    assert os.readlink(staging / "etc/resolv.conf") == "/run/mvm/resolv.conf"


def test_an_output_linked_inside_its_closure_is_followed(host: dict[str, Path]) -> None:
    store, staging = host["store"], host["staging"]
    real = out_path(store, "dddd-real")
    (store / "eeee-alias").symlink_to("dddd-real")
    closure = [str(real), str(store / "eeee-alias")]
    assert outputs.resolve(store / "eeee-alias", closure, store) == real
    rootfs.stage(str(store / "eeee-alias"), closure, staging, install_guest_files, store)
    assert (staging / "bin/hello").is_file()


def test_kernel_and_initrd_must_be_regular_files_inside_the_closure(host: dict[str, Path]) -> None:
    store = host["store"]
    secrets = host["victim"] / "secrets.json"
    out = out_path(store)
    other = store / "ffff-not-in-closure"
    other.mkdir()
    (other / "vmlinux").write_bytes(b"\x7fELF")
    k = store / "9999-kernel"
    k.mkdir()
    (k / "vmlinux").write_bytes(b"\x7fELF\x02" + b"\0" * 600)
    (k / "b").symlink_to(".")
    closure = [str(out), str(k)]

    def check(name: str, target: str) -> str:
        link = out / name
        if os.path.lexists(link):
            link.unlink()
        link.symlink_to(target)
        with pytest.raises(outputs.OutsideClosure) as e:
            outputs.regular_file(link, closure, "initrd", store)
        assert "\n" not in e.value.line()
        return e.value.line()

    assert str(secrets) in check("initrd", str(secrets))  # absolute, to a tenant's secrets
    assert "outside the build's closure" in check("initrd", "../../../home/tenants/victim/secrets.json")
    assert "ffff-not-in-closure" in check("initrd", str(other / "vmlinux"))  # a store path not its own
    check("initrd", "../9999-kernel/b/../../..")  # `..` after a link to `.`: above the store
    assert "not a regular file" in check("initrd", "../9999-kernel")
    (out / "initrd").unlink()
    (out / "vmlinux").symlink_to("../9999-kernel/b/vmlinux")  # inside the closure: fine
    assert outputs.regular_file(out / "vmlinux", closure, "kernel", store) == k / "vmlinux"
    assert outputs.regular_file(out / "initrd", closure, "initrd", store) is None
    outputs.check_kernel(k / "vmlinux")
    with pytest.raises(outputs.OutsideClosure, match="neither an ELF"):
        outputs.check_kernel(out / "bin" / "hello")
