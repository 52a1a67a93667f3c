"""The offline nixpkgs package set: a local flake that stands in for `github:NixOS/nixpkgs`.

This machine cannot fetch nixpkgs, so mvm ships a small flake (`mvm/data/nixpkgs-offline`)
whose `legacyPackages.x86_64-linux` has the attributes users' flakes use (`buildEnv`,
`writeTextDir`, `busybox`, `curl`, `bash`, `coreutils`, `wget`, `openssl`, `python3`,
`python3Packages.pip`, ...). Its packages are not compiled: each one copies the host's Debian
binaries, every shared library they load (found here with `ldd`) and the ELF interpreter into
its store path, laid out like a root file system (`bin/`, `lib/x86_64-linux-gnu/`, `lib64/`),
so a profile made with `buildEnv` runs once it is laid out at `/` of a guest.

`install(dest)` writes the flake to `dest` together with `versions.json`, which this module
generates: for every package the exact host files to copy and the version of every Debian
package they come from. The derivations take that data as input, so upgrading a Debian
package changes the store paths of exactly the packages that contain its files, and the same
host state always gives the same paths. A user's flake is then built with
`nix build --override-input nixpkgs path:<dest> <flake>#<profile>` (see `ref`).
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

from mvm.errors import CommandFailed, HostUnsupported, InvalidInput, MvmError
from mvm.image import nix
from mvm.util import proc
from mvm.util.hashing import file_sha256

# apt packages whose files the set copies (and `libc-bin` for `ldd`, `dpkg` for dpkg-query).
DEBIAN_PACKAGES: tuple[str, ...] = (
    "busybox-static",
    "bash",
    "coreutils",
    "curl",
    "wget",
    "openssl",
    "ca-certificates",
    "python3",
    "python3-pip",
    "libc-bin",
    "dpkg",
)

FORMAT = 1
GENERATED = "versions.json"
TEMPLATE = "nixpkgs-offline"
SYSTEM = "x86_64-linux"
MULTIARCH = "x86_64-linux-gnu"
INTERPRETER = "/lib64/ld-linux-x86-64.so.2"
LIBDIR = f"lib/{MULTIARCH}"

GCROOTS = Path("/nix/var/nix/gcroots/mvm-offline-nixpkgs")
_FIX = "apt-get install -y " + " ".join(DEBIAN_PACKAGES)
_MERGED_DIRS = ("bin", "sbin", "lib", "lib64", "lib32", "libx32")
_NAME_OK = re.compile(r"[^A-Za-z0-9+._?=-]")


class OfflineNixpkgsError(HostUnsupported):
    """The host lacks what the offline package set is made from."""


@dataclass
class _Spec:
    """What one package copies from the host. Paths are host paths; `dst` is relative to $out."""

    main: str  # the Debian package whose version names the derivation
    files: list[tuple[str, str]] = field(default_factory=list)  # (src, dst), symlinks followed
    trees: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (src, dst, excludes)
    elves: list[str] = field(default_factory=list)  # ELF files whose libraries are needed
    debs: set[str] = field(default_factory=set)  # packages known to own the copied files


def ref(dest: Path) -> str:
    """The flake reference for an installed set, for `--override-input nixpkgs <ref>`."""
    return f"path:{Path(dest).resolve()}"


def install(dest: Path) -> Path:
    """(Re)write the offline set at `dest` from the template and this host's Debian packages,
    importing the host files each package copies into the Nix store (see `import_host_files`).

    Idempotent: when nothing changed on the host, the files are left as they are. Returns `dest`.
    """
    dest = Path(dest)
    _check_dest(dest)
    files = _template_files()
    data = generate()
    import_host_files(data, previous=_previous(dest))
    files[GENERATED] = (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()
    _write_tree(dest, files)
    return dest


def import_host_files(data: dict[str, Any], previous: dict[str, Any] | None = None) -> None:
    """Put each package's host files into the Nix store as a content-addressed path and record
    it (`files`: name, NAR hash, path) in `data`.

    Nix's build sandbox shows a builder nothing of the host, so the derivations read only these
    store paths; their fixed-output hashes pin exactly the bytes that were imported. A package
    whose file list and Debian versions are unchanged since `previous` (the last versions.json)
    and whose path is still in the store is not imported again. Each path is a GC root under
    GCROOTS, so garbage collection does not take it away.
    """
    packages: dict[str, dict[str, Any]] = data["packages"]
    old: dict[str, Any] = (previous or {}).get("packages", {})
    for name, entry in packages.items():
        prev = old.get(name, {})
        same = all(prev.get(k) == entry.get(k) for k in ("version", "debian", "copy", "trees", "unowned"))
        files = prev.get("files") if same else None
        if not files or _invalid([files["path"]]):
            with tempfile.TemporaryDirectory(prefix="mvm-offline-") as tmp:
                staged = _stage(Path(tmp) / f"{name}-{entry['version']}-debian-files", entry)
                files = _add_fixed(staged)
        entry["files"] = files
        _add_root(files["path"])


def ensure_imported(ref: str) -> None:
    """For a flake ref naming an installed offline set: re-import host files that left the store
    (a new /nix, a path deleted by hand); refuse when the host's files changed since `install`,
    since the set's hashes would no longer match. Other refs are left alone."""
    if not ref.startswith("path:"):
        return
    data = _previous(Path(ref.removeprefix("path:")))
    if not data:
        return
    entries: dict[str, dict[str, Any]] = data["packages"]
    if any("files" not in e for e in entries.values()):
        raise OfflineNixpkgsError(f"the offline nixpkgs set at {ref} predates host file imports",
                                  "run `mvm setup`")
    missing = _invalid([e["files"]["path"] for e in entries.values()])
    for name, entry in entries.items():
        if entry["files"]["path"] not in missing:
            continue
        with tempfile.TemporaryDirectory(prefix="mvm-offline-") as tmp:
            got = _add_fixed(_stage(Path(tmp) / entry["files"]["name"], entry))
        if got != entry["files"]:
            raise OfflineNixpkgsError(
                f"the host files of offline package {name} changed since the set was installed",
                "run `mvm setup` to record the host's current Debian packages")
        _add_root(got["path"])


def _previous(dest: Path) -> dict[str, Any] | None:
    try:
        prev: dict[str, Any] = json.loads((dest / GENERATED).read_text())
    except (OSError, ValueError):
        return None
    return prev if isinstance(prev.get("packages"), dict) else None


def _stage(root: Path, entry: dict[str, Any]) -> Path:
    """Lay out one package's host files under `root`: single files with symlinks followed,
    trees minus their excluded names, absolute symlinks (which would point into the guest's
    empty /usr) replaced by copies of their targets, dangling ones dropped."""
    root.mkdir()
    for src, dst in entry["copy"]:
        target = root / dst
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, target)  # follows symlinks, keeps the mode bits
    for src, dst, excl in entry["trees"]:
        shutil.copytree(src, root / dst, symlinks=True, ignore=shutil.ignore_patterns(*excl),
                        dirs_exist_ok=True)
    for link in [p for p in root.rglob("*") if p.is_symlink()]:
        target = os.readlink(link)
        if target.startswith("/"):
            link.unlink()
            if os.path.isfile(target):
                shutil.copy(target, link)
    return root


def _add_fixed(staged: Path) -> dict[str, str]:
    path = proc.output(["nix-store", "--add-fixed", "--recursive", "sha256", staged],
                       env=nix.env(), timeout=600).strip()
    nar = proc.output(["nix", "hash", "path", "--type", "sha256", staged],
                      env=nix.env(), timeout=600).strip()
    return {"name": staged.name, "sha256": nar, "path": path}


def _add_root(path: str) -> None:
    """A GC root named like the store path (hash and name), so one per content."""
    GCROOTS.mkdir(parents=True, exist_ok=True)
    root = GCROOTS / os.path.basename(path)
    if not root.is_symlink():
        root.symlink_to(path)


def _invalid(paths: list[str]) -> set[str]:
    """Those of `paths` that are not valid in the Nix store (one call for all)."""
    if not paths:
        return set()
    res = proc.run(["nix-store", "--check-validity", "--print-invalid", *paths],
                   env=nix.env(), timeout=60)
    return set(res.stdout.decode().split())


def generate() -> dict[str, Any]:
    """The content of versions.json for this host."""
    _require_tools()
    _require_packages(DEBIAN_PACKAGES)
    py = _python_version()
    specs = _specs(py)
    versions: dict[str, str] = {}
    packages: dict[str, Any] = {}
    for name, spec in specs.items():
        packages[name] = _resolve(name, spec, versions)
    return {
        "format": FORMAT,
        "generator": "mvm.build.offline_nixpkgs",
        "system": SYSTEM,
        "multiarch": MULTIARCH,
        "interpreter": INTERPRETER,
        "python": {"version": py},
        "debian": dict(sorted(versions.items())),
        "packages": packages,
    }


# --- what each package is made of ---------------------------------------------------------


def _specs(py: str) -> dict[str, _Spec]:
    busybox = _Spec("busybox-static", files=[("/bin/busybox", "bin/busybox")])
    bash = _Spec("bash", files=[("/bin/bash", "bin/bash")])
    coreutils = _Spec("coreutils", files=_package_programs("coreutils"))
    curl = _Spec("curl", files=[("/usr/bin/curl", "bin/curl")])
    wget = _Spec("wget", files=[("/usr/bin/wget", "bin/wget")])
    openssl = _Spec(
        "openssl",
        files=[("/usr/bin/openssl", "bin/openssl"),
               ("/etc/ssl/openssl.cnf", "usr/lib/ssl/openssl.cnf")],
    )
    cacert = _Spec(
        "ca-certificates",
        files=[("/etc/ssl/certs/ca-certificates.crt", "etc/ssl/certs/ca-certificates.crt")],
        debs={"ca-certificates"},
    )
    stdlib = f"/usr/lib/python{py}"
    python3 = _Spec(
        f"python{py}",
        files=[(f"/usr/bin/python{py}", f"bin/python{py}")],
        trees=[(stdlib, f"lib/python{py}",
                # bytecode is regenerated for the store; the rest is Debian-specific or dev-only
                ["__pycache__", "config-*", "sitecustomize.py", "EXTERNALLY-MANAGED"])],
        elves=sorted(glob.glob(f"{stdlib}/lib-dynload/*.so")),
    )
    pip_dir = "/usr/lib/python3/dist-packages"
    pip_info = sorted(glob.glob(f"{pip_dir}/pip-*.dist-info"))
    if not pip_info:
        raise OfflineNixpkgsError(f"{pip_dir}/pip-*.dist-info not found",
                                  "apt-get install -y python3-pip")
    pip = _Spec(
        "python3-pip",
        trees=[(f"{pip_dir}/pip", "lib/python3/dist-packages/pip", ["__pycache__"]),
               (pip_info[-1], f"lib/python3/dist-packages/{Path(pip_info[-1]).name}", [])],
        debs={"python3-pip"},
    )
    return {"busybox": busybox, "bash": bash, "coreutils": coreutils, "curl": curl,
            "wget": wget, "openssl": openssl, "cacert": cacert, "python3": python3, "pip": pip}


def _package_programs(pkg: str) -> list[tuple[str, str]]:
    """Every program a Debian package installs in a bin/sbin dir, as (host path, bin/<name>)."""
    listing = proc.output(["dpkg-query", "-L", pkg]).splitlines()
    out: dict[str, str] = {}
    for path in listing:
        parts = path.strip().split("/")
        if len(parts) < 3 or parts[-2] not in ("bin", "sbin") or not parts[-1]:
            continue
        if os.path.isfile(path) and os.access(path, os.X_OK):
            out.setdefault(parts[-1], path)
    if not out:
        raise OfflineNixpkgsError(f"Debian package {pkg} installs no programs",
                                  f"apt-get install --reinstall -y {pkg}")
    return [(src, f"bin/{name}") for name, src in sorted(out.items())]


def _python_version() -> str:
    real = os.path.realpath("/usr/bin/python3")
    m = re.fullmatch(r"python(3\.\d+)", os.path.basename(real))
    if not m:
        raise OfflineNixpkgsError(f"/usr/bin/python3 resolves to {real}, not python3.X",
                                  "apt-get install -y python3")
    return m.group(1)


# --- resolving files, libraries and Debian versions ----------------------------------------


def _resolve(name: str, spec: _Spec, versions: dict[str, str]) -> dict[str, object]:
    for src, _ in spec.files:
        if not os.path.exists(src):
            raise OfflineNixpkgsError(f"{name}: {src} is missing",
                                      f"apt-get install --reinstall -y {spec.main}")
    for src, _, _ in spec.trees:
        if not os.path.isdir(src):
            raise OfflineNixpkgsError(f"{name}: {src} is missing",
                                      f"apt-get install --reinstall -y {spec.main}")
    libs: dict[str, str] = {}
    needs_interp = False
    for elf in [src for src, _ in spec.files] + spec.elves:
        found, dynamic = _ldd(elf)
        needs_interp |= dynamic
        for soname, path in found.items():
            libs.setdefault(soname, path)
    copy = list(spec.files)
    copy += [(path, f"{LIBDIR}/{soname}") for soname, path in sorted(libs.items())]
    if needs_interp:
        copy.append((INTERPRETER, INTERPRETER.lstrip("/")))
    for src, dst in copy:
        _check_plain(src, dst)

    # A tree's sources are the owners of its top-level entries that are copied: dpkg records
    # every directory of a package, so a directory's owners are all packages with files in it.
    tree_entries = [os.path.join(src, n) for src, _, excl in spec.trees for n in sorted(os.listdir(src))
                    if not any(fnmatch.fnmatchcase(n, pat) for pat in excl)]
    owners = _owners([src for src, _ in copy] + tree_entries)
    debs = set(spec.debs) | {spec.main}
    unowned: dict[str, str] = {}
    for path in [src for src, _ in copy] + tree_entries:
        pkgs = owners.get(path)
        debs.update(pkgs or ())
        if os.path.isfile(path) and (not pkgs or path.startswith("/etc/")):
            # made by a maintainer script (the CA bundle) or an admin-editable conffile:
            # its package version does not determine it, so pin its content
            unowned[path] = file_sha256(path)
        elif not pkgs:
            raise OfflineNixpkgsError(f"{name}: {path} belongs to no Debian package",
                                      f"remove it, or reinstall {spec.main}")
    pinned = _versions(sorted(debs))
    versions.update(pinned)
    main = next((v for k, v in pinned.items() if k.split(":")[0] == spec.main), None)
    if main is None:
        raise OfflineNixpkgsError(f"Debian package {spec.main} is not installed",
                                  f"apt-get install -y {spec.main}")
    return {
        "version": _store_version(main),
        "debian": pinned,
        "copy": [list(c) for c in copy],
        "trees": [[src, dst, excl] for src, dst, excl in spec.trees],
        "unowned": unowned,
    }


def _ldd(path: str) -> tuple[dict[str, str], bool]:
    """{soname: host path} of every library `path` loads, and whether it is dynamic at all."""
    res = proc.run(["ldd", path], check=False,
                   env={"LC_ALL": "C", "LD_LIBRARY_PATH": "", "LD_PRELOAD": ""})
    text = res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")
    if "not a dynamic executable" in text or "statically linked" in text:
        return {}, False
    if res.returncode != 0:
        raise CommandFailed(f"ldd {path} failed: {text.strip()}", "apt-get install -y libc-bin")
    libs: dict[str, str] = {}
    missing = []
    for line in text.splitlines():
        line = line.strip()
        if "=>" not in line:
            continue  # vdso, or the interpreter itself
        soname, _, rest = line.partition("=>")
        target = rest.strip().split(" (")[0].strip()
        if target == "not found":
            missing.append(soname.strip())
        elif target.startswith("/"):
            libs[soname.strip()] = target
    if missing:
        raise OfflineNixpkgsError(
            f"{path} needs libraries this host does not have: {', '.join(missing)}",
            "install the Debian packages providing them (apt-file search <soname>)")
    return libs, True


def _check_plain(src: str, dst: str) -> None:
    """The builder reads the copy list line by line, split on whitespace."""
    if any(c.isspace() for c in src + dst):
        raise InvalidInput(f"path with whitespace cannot go into the offline set: {src!r}")


def _alternatives(path: str) -> list[str]:
    """The spellings dpkg may know a path by on a merged-/usr system."""
    out = []
    for p in dict.fromkeys([path, os.path.realpath(path)]):
        out.append(p)
        parts = p.split("/")
        if len(parts) > 2 and parts[1] == "usr" and parts[2] in _MERGED_DIRS:
            out.append("/" + "/".join(parts[2:]))
        elif len(parts) > 1 and parts[1] in _MERGED_DIRS:
            out.append("/usr" + p)
    return list(dict.fromkeys(out))


def _owners(paths: Iterable[str]) -> dict[str, list[str]]:
    """{path: [Debian packages owning it]} for each path dpkg knows (under any spelling)."""
    paths = list(dict.fromkeys(paths))
    alts = {p: _alternatives(p) for p in paths}
    query = sorted({a for v in alts.values() for a in v})
    res = proc.run(["dpkg-query", "-S", *query], check=False, env={"LC_ALL": "C"})
    found: dict[str, list[str]] = {}
    for line in res.stdout.decode(errors="replace").splitlines():
        if line.startswith("diversion by") or ": " not in line:
            continue
        names, _, path = line.partition(": ")
        found.setdefault(path.strip(), []).extend(n.strip() for n in names.split(","))
    out: dict[str, list[str]] = {}
    for p, spellings in alts.items():
        pkgs = [pkg for s in spellings for pkg in found.get(s, [])]
        if pkgs:
            out[p] = sorted(set(pkgs))
    return out


def _versions(pkgs: list[str]) -> dict[str, str]:
    """{binary:Package: Version} for installed packages; raises naming any that is not."""
    res = proc.run(["dpkg-query", "-W", "-f", "${binary:Package}\t${Version}\t${db:Status-Status}\n",
                    *pkgs], check=False, env={"LC_ALL": "C"})
    got: dict[str, str] = {}
    for line in res.stdout.decode(errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[2] == "installed":
            got[parts[0]] = parts[1]
    missing = [p for p in pkgs if p not in got and not any(k.split(":")[0] == p for k in got)]
    if missing:
        raise OfflineNixpkgsError(f"Debian package(s) not installed: {' '.join(missing)}",
                                  f"apt-get install -y {' '.join(missing)}")
    return got


def _require_tools() -> None:
    for tool, pkg in (("dpkg-query", "dpkg"), ("ldd", "libc-bin")):
        if proc.which(tool) is None:
            raise OfflineNixpkgsError(f"{tool} not found: the offline nixpkgs set needs a Debian host",
                                      f"apt-get install -y {pkg}")


def _require_packages(pkgs: Iterable[str]) -> None:
    try:
        _versions(list(pkgs))
    except OfflineNixpkgsError as e:
        raise OfflineNixpkgsError(e.message, _FIX) from e


def _store_version(deb_version: str) -> str:
    """The upstream part of a Debian version, in characters a store path name allows."""
    v = deb_version.split(":", 1)[-1]
    v = v.rsplit("-", 1)[0] if "-" in v else v
    return _NAME_OK.sub("_", v)


# --- writing the flake ---------------------------------------------------------------------


def _template_files() -> dict[str, bytes]:
    root = resources.files("mvm").joinpath("data", TEMPLATE)
    out: dict[str, bytes] = {}

    def walk(node: Traversable, prefix: str) -> None:
        for child in node.iterdir():
            rel = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, rel + "/")
            elif child.name != GENERATED and not child.name.endswith((".pyc", "~")):
                out[rel] = child.read_bytes()

    if not root.is_dir():
        raise MvmError(f"mvm's data files are missing: {TEMPLATE}", "reinstall mvm")
    walk(root, "")
    if "flake.nix" not in out:
        raise MvmError(f"mvm's data files are incomplete: {TEMPLATE}/flake.nix", "reinstall mvm")
    return out


def _current(dest: Path) -> dict[str, bytes] | None:
    if not dest.is_dir():
        return None
    out: dict[str, bytes] = {}
    for p in dest.rglob("*"):
        if p.is_file() or p.is_symlink():
            out[p.relative_to(dest).as_posix()] = p.read_bytes() if p.is_file() else b""
    return out


def _check_dest(dest: Path) -> None:
    """Only ever replace a directory this module wrote (or an empty/new one)."""
    if dest.exists() and not dest.is_dir():
        raise InvalidInput(f"{dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / GENERATED).is_file():
        raise InvalidInput(f"{dest} is not empty and holds no offline nixpkgs set",
                           "choose an empty or new directory")


def _write_tree(dest: Path, files: dict[str, bytes]) -> None:
    if _current(dest) == files:
        return
    _check_dest(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for rel, data in files.items():
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            p.chmod(0o644)
        tmp.chmod(0o755)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            old.rmdir()
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
