"""The build job inside the builder microVM: `python3 -m mvm.builder.in_guest <input dir>`.

The builder's /mvm/init unpacks the input disk (made by the host: the flake, the offline
package set, this code, mvm's guest files, job.json) and runs this (through the entry point
`mvm.build.vm_job`, the name its images know it by: `on_host.JOB_ENTRY`). It evaluates and builds
the flake with the builder's own Nix into the pool's store disk, packs the rootfs exactly as
the host builder does (the same `rootfs` and `guest.layout` code, the host's BusyBox), and
writes result.json and the image files onto the output disk (`archive.write_archive`).

Standard library and the mvm modules copied with it only. Progress goes to the console as
`@mvm <step> <message>` lines, Nix's log as plain lines, bounded to job["log_limit"] bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

from mvm.errors import MvmError
from mvm.guest import layout
from mvm.image import archive, outputs, revision, rootfs
from mvm.util.hashing import file_sha256

SYSTEM = "x86_64-linux"
NIX_ENV = {"NIX_REMOTE": "local", "HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/.cache"}
WORK = Path("/nix/.mvm-work")
#: Collect the pool's store when less than this share of it is free.
GC_BELOW = 0.3
#: The binary cache a networked builder may substitute from without the offline package set
#: (signatures checked against nix.conf's trusted-public-keys).
CACHE = "https://cache.nixos.org"


class JobFailed(Exception):
    """A failure to report to the user as it is (Nix's own error, most often)."""


class Console:
    def __init__(self, limit: int) -> None:
        self.left = limit
        self.truncated = False

    def line(self, text: str) -> None:
        data = text.rstrip("\n") + "\n"
        if len(data) > self.left:
            if not self.truncated:
                self.truncated = True
                sys.stdout.write("@mvm log truncated (the build log limit was reached)\n")
                sys.stdout.flush()
            return
        self.left -= len(data)
        sys.stdout.write(data)
        sys.stdout.flush()

    def step(self, name: str, message: str) -> None:
        sys.stdout.write(f"@mvm {name} {message}\n")  # steps are not counted against the limit
        sys.stdout.flush()


def _run(console: Console, argv: list[str], *, stdin: Any = subprocess.DEVNULL,
         stream: bool = True) -> tuple[str, str]:
    """Run argv; Nix's stderr streams to the console; on failure JobFailed with Nix's error."""
    env = dict(os.environ, **NIX_ENV)
    p = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env, text=True, errors="replace")
    err: list[str] = []
    assert p.stderr is not None and p.stdout is not None
    for ln in p.stderr:
        if len(err) < 2000:
            err.append(ln)
        if stream:
            console.line(ln)
    out = p.stdout.read()
    if p.wait() != 0:
        from mvm.image import nix  # (the error filter only)

        raise JobFailed(nix.error_text("".join(err), f"{argv[0]} failed ({p.returncode})"))
    return out, "".join(err)


BUSYBOX = "/mvm/busybox"


def network(net: dict[str, Any], console: Console) -> None:
    """The builder's egress-only network: eth0 at its tenant's builder address, the tenant's
    gateway as default route, and the host's nameservers (none when all are host-local)."""
    console.step("network", "…")
    for argv in (["ip", "link", "set", "lo", "up"], ["ip", "link", "set", "eth0", "up"],
                 ["ip", "addr", "add", net["address"], "dev", "eth0"],
                 ["ip", "route", "add", "default", "via", net["gateway"]]):
        p = subprocess.run([BUSYBOX, *argv], capture_output=True, text=True)
        if p.returncode != 0:
            raise JobFailed(f"the builder cannot set up its network ({' '.join(argv)}): "
                            f"{p.stderr.strip()}")
    # The image is read-only: its /etc is copied to a tmpfs with this resolv.conf in it.
    etc = Path("/tmp/etc")
    subprocess.run([BUSYBOX, "cp", "-a", "/etc", str(etc)], check=True)
    (etc / "resolv.conf").unlink(missing_ok=True)
    (etc / "resolv.conf").write_text("".join(f"nameserver {d}\n" for d in net["dns"]))
    subprocess.run([BUSYBOX, "mount", "--bind", str(etc), "/etc"], check=True)
    dns = ", ".join(net["dns"]) or "none (the host's nameservers are host-local)"
    console.step("network", f"{net['address']} via {net['gateway']}, DNS {dns}")


def _net_devices() -> list[str]:
    try:
        lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    except OSError:
        return ["?"]
    return sorted(ln.split(":", 1)[0].strip() for ln in lines if ":" in ln)


def fetch(ref: str, console: Console) -> tuple[str, dict[str, str]]:
    """Fetch the URL ref with the builder's own Nix, check its inputs as the host checks a
    local flake's (no `path:` input outside the flake), and return the fetched flake as a
    `path:` ref into the builder's store."""
    from urllib.parse import parse_qs, urlparse

    from mvm.image import source

    console.step("fetch", "…")
    registry = Path("/tmp/flake-registry.json")  # none: no indirect refs, no registry download
    registry.write_text('{"flakes": [], "version": 2}\n')
    out, _ = _run(console, ["nix", "flake", "prefetch", "--json",
                            "--option", "flake-registry", str(registry), ref])
    data = json.loads(out)
    store_path = str(data["storePath"])
    sub = parse_qs(urlparse(ref).query).get("dir", [""])[0]
    flake_dir = Path(os.path.normpath(Path(store_path) / sub))
    if not str(flake_dir).startswith(store_path) or not (flake_dir / "flake.nix").is_file():
        raise JobFailed(f"no flake.nix in what {ref} names" + (f" (dir={sub})" if sub else ""))
    try:
        source.check_inputs(flake_dir)
    except source.SourceRefused as e:
        raise JobFailed(f"{e.message} (in {ref})") from None
    console.step("fetch", f"{store_path} ({data.get('hash', '?')})")
    return f"path:{flake_dir}", {"ref": ref, "store_path": store_path,
                                  "nar_hash": str(data.get("hash", ""))}


def dev_shm(shm: Path = Path("/dev/shm")) -> None:
    """A /dev/shm for the builds: Nix gives a build a fresh one only where the machine has
    one, and the builder's init mounts none (Python's multiprocessing needs it, e.g. the
    offline package set's python3 compiles its bytecode with `compileall -j`)."""
    if os.path.ismount(shm):
        return
    shm.mkdir(mode=0o1777, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev,noexec", "tmpfs",
                    str(shm)], check=True, stdin=subprocess.DEVNULL, timeout=60)


def build(indir: Path, job: dict[str, Any], console: Console) -> tuple[dict[str, Any], list[tuple[str, Path]]]:
    flake = f"path:{indir / 'src'}"
    common = ["--no-write-lock-file"]
    nixpkgs = job.get("nixpkgs", "offline")
    if nixpkgs == "offline":  # mvm's offline package set, copied in
        common += ["--override-input", "nixpkgs", f"path:{indir / 'nixpkgs'}"]
    else:  # fetched through the builder's network: the setting's ref, or the flake's own
        common += ["--option", "substituters", CACHE]
        if nixpkgs:
            common += ["--override-input", "nixpkgs", nixpkgs]
    if job.get("net"):
        network(job["net"], console)
    elif job["profile"] is not None:  # what the guest sees: no network device but loopback
        console.step("network", f"none (devices: {', '.join(_net_devices()) or '-'})")

    st = os.statvfs("/nix")
    if st.f_bavail < st.f_blocks * GC_BELOW:
        # The pool's store holds only this pool's builds; nothing in it is a root.
        console.step("gc", "…")
        _run(console, ["nix-store", "--gc"], stream=False)
        console.step("gc", "the pool's store was nearly full: collected")

    imports: list[str] = job["imports"]
    console.step("import", "…")
    invalid, _ = _run(console, ["nix-store", "--check-validity", "--print-invalid", *imports],
                      stream=False) if imports else ("", "")
    if imports and invalid.split():
        with open(job["imports_device"], "rb") as dev:
            _run(console, ["nix-store", "--import"], stdin=dev, stream=False)
        console.step("import", f"{len(invalid.split())} package set paths into the pool's store")
    elif imports:
        console.step("import", "package set already in the pool's store")
    else:
        console.step("import", "no offline package set: nixpkgs is fetched")

    if job["profile"] is None:  # seeding a store: the package set is all it holds
        return {"ok": True, "seed": True}, []

    dev_shm()
    fetched: dict[str, str] | None = None
    if job.get("flake"):
        flake, fetched = fetch(job["flake"], console)

    console.step("nix-build", "…")
    out, _ = _run(console, ["nix", "build", "--no-link", "--json", "-L", *common,
                            f"{flake}#packages.{SYSTEM}.{job['profile']}"])
    built = json.loads(out)[0]
    out_path: str = built["outputs"]["out"]
    console.step("nix-build", out_path)

    closure_out, _ = _run(console, ["nix-store", "--query", "--requisites", out_path], stream=False)
    closure = sorted(ln for ln in closure_out.splitlines() if ln)
    console.step("closure", f"{len(closure)} store paths")

    files: list[tuple[str, Path]] = []
    kernel_sha, initrd_sha, source = job["kernel_sha256"], job["initrd_sha256"], "default"
    shipped = outputs.profile_kernel(out_path, closure)  # the host builder's rules
    if shipped is not None:
        source, (kernel, initrd) = "profile", shipped
        kernel_sha = file_sha256(kernel)
        files.append(("vmlinux", kernel))
        initrd_sha = file_sha256(initrd) if initrd else ""
        if initrd:
            files.append(("initrd", initrd))
    console.step("kernel", source)

    layout.BUSYBOX = indir / "busybox"  # the host's: the revision hash names its bytes
    mkfs_version = rootfs.mkfs_version()
    parts = {
        "out_path": out_path, "kernel_sha256": kernel_sha, "initrd_sha256": initrd_sha,
        "guest_hash": revision.guest_files_hash(), "busybox_sha256": file_sha256(layout.BUSYBOX),
        "mkfs_version": mkfs_version, "packer_version": rootfs.PACKER_VERSION,
    }
    rev = revision.revision_hash(**parts)
    console.step("revision", rev)

    console.step("pack", "…")
    if WORK.exists():
        _rmtree(WORK)
    WORK.mkdir()
    image = WORK / "rootfs.ext4"
    closure_size = rootfs.pack_closure(out_path, closure, image, rev,
                                       layout.install_guest_files, WORK)
    console.step("pack", f"rootfs.ext4 {image.stat().st_size // 2**20} MiB"
                         f" from {closure_size // 2**20} MiB closure")
    result = {
        "ok": True, "revision": rev, "parts": parts, "drv_path": built["drvPath"],
        "closure_paths": len(closure),
        "closure_size": closure_size, "kernel_source": source,
    }
    if fetched is not None:
        result["fetched"] = fetched
    return result, [("rootfs.ext4", image), *files]


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def main(indir: Path) -> int:
    job: dict[str, Any] = json.loads((indir / "job.json").read_text())
    console = Console(int(job["log_limit"]))
    files: list[tuple[str, Path]] = []
    try:
        result, files = build(indir, job, console)
    except JobFailed as e:
        result = {"ok": False, "error": str(e)[-16384:]}
    except MvmError as e:  # a profile mvm refuses (a link out of its closure, …): as the host says it
        result = {"ok": False, "error": e.line()[-16384:]}
    except Exception as e:  # a bug of this job or an OS error: still a result, with the cause
        console.line(traceback.format_exc(limit=5))
        result = {"ok": False, "error": f"the builder failed: {e}"[-16384:]}
    console.step("output", "…")
    with open(job["output_device"], "r+b") as dev:
        archive.write_archive(dev, result, files)
        os.fsync(dev.fileno())
    _rmtree(WORK)
    console.step("output", "written")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
