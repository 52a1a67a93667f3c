"""A tenant's flake source, checked and copied by mvm before Nix sees it; never evaluated here.

Sources: a local directory (`./my-flake`, `/abs/dir`, `path:/abs/dir`), a local git repository
(`git+file:///repo[?dir=sub&ref=…&rev=…]`: its committed tree) and URL refs (`github:`,
`https:`, …, fetched by Nix). At `pool create` only the reference's form and the directory are
checked (`check_ref`: a local directory or repository is recorded resolved), and the directory's
device and inode recorded (`identity`). At build time that directory is opened again without
following any link (`open_dir`), refused if another one is there, and the source is copied
through the opened descriptors into a directory of mvm's own (`stage`): only the flake
directory's own tree, no link that leaves it, no `secrets.json` next to `flake.nix`, nothing
from mvm's state home. Its inputs are then read from `flake.lock` and
`flake.nix` without evaluating anything (`check_inputs`): an input naming a host path outside
the flake (`path:/…`, `git+file:`, `file:`) is refused before Nix fetches anything. Nix builds
the staged copy (`path:<copy>`); the builder microVM takes the same copy as its source disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from mvm.config.paths import Layout
from mvm.errors import InvalidInput

# URL refs Nix fetches over the network; every other scheme is refused.
URL_SCHEMES = ("github", "gitlab", "sourcehut", "git+https", "git+ssh", "git+http",
               "https", "http", "tarball+https", "tarball+http", "file+https", "file+http")
# Left out of a local directory's copy: a tenant's secrets file lying next to flake.nix (as the
# guide's commands invite), the git directory, and `nix build`'s result links.
EXCLUDED_TOP = ("secrets.json", ".git")
RESULT_LINK = re.compile(r"^result(-.*)?$")
MAX_LINKS = 40


class SourceRefused(InvalidInput):
    """A flake source or input mvm will not hand to Nix."""


# -- pool create: the reference's form ---------------------------------------

def check_ref(ref: str, layout: Layout, base: Path | None = None) -> str:
    """The pool's flake reference, normalized (a local directory becomes its absolute path);
    nothing is evaluated or fetched. Refuses what `stage` would refuse for its form."""
    if not ref or ref.startswith("-"):
        raise SourceRefused(f"flake reference {ref!r} is not a reference",
                            "a reference may not start with '-'; for a directory use ./-name")
    if any(c in ref for c in "\n\0"):
        raise SourceRefused("the flake reference holds a newline or NUL byte")
    scheme = _scheme(ref)
    if scheme is None or scheme == "path":
        d = _local_dir(ref.removeprefix("path:") if scheme else ref, base)
        _check_flake_dir(d, layout)
        return str(d)
    if scheme == "git+file":
        repo, _params = _git_ref(ref)
        _check_allowed_place(repo, layout)
        if not (repo / ".git").exists():
            raise SourceRefused(f"{repo} is not a git repository (no .git)",
                                "use git+file:///path/to/repo, or --flake with the directory")
        query = urllib.parse.urlparse(ref).query
        return f"git+file://{repo.resolve()}" + (f"?{query}" if query else "")
    if scheme in URL_SCHEMES:
        return ref
    raise SourceRefused(f"flake reference {ref!r}: scheme {scheme!r} is not supported",
                        "use a directory, git+file:///repo, or a URL ref such as github:owner/repo")


def is_url_ref(ref: str) -> bool:
    """A reference Nix fetches over the network (one of URL_SCHEMES)."""
    return _scheme(ref) in URL_SCHEMES


# -- the directory recorded at pool create, opened again at each build -----------------------

def local_dir(ref: str) -> Path | None:
    """The host directory a pool's (normalized) reference reads: the flake's directory, or
    the git repository's; None for a URL ref."""
    scheme = _scheme(ref)
    if scheme is None or scheme == "path":
        return Path(ref.removeprefix("path:"))
    if scheme == "git+file":
        return _git_ref(ref)[0]
    return None


def identity(ref: str) -> str:
    """"<device>:<inode>" of the directory `ref` reads (opened without following any link),
    "" for a URL ref: recorded at `pool create`, compared at every build."""
    d = local_dir(ref)
    if d is None:
        return ""
    fd = open_dir(d)
    try:
        return _identity(fd)
    finally:
        os.close(fd)


def _identity(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


def open_dir(path: Path, expect: str = "") -> int:
    """A descriptor (O_RDONLY) of the directory at `path`, an absolute path without `.` or `..`,
    opened from `/` one component at a time without following a link: a component that is (now)
    a link, or not a directory, is refused, and so is a directory that is not `expect`
    ("<device>:<inode>", when given). Whatever the tenant does to the path afterwards, the
    descriptor stays on the directory that was checked."""
    parts = path.parts
    if not path.is_absolute() or any(p in (".", "..") for p in parts[1:]) \
            or os.path.normpath(path) != str(path):
        raise SourceRefused(f"flake directory {path} is not an absolute, normalized path",
                            "create the pool again with --flake naming the directory")
    flags = os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
    fd = os.open("/", os.O_PATH | flags)
    try:
        for i, name in enumerate(parts[1:], start=1):
            last = i == len(parts) - 1
            try:
                nxt = os.open(name, (os.O_RDONLY if last else os.O_PATH) | flags, dir_fd=fd)
            except FileNotFoundError as e:
                raise SourceRefused(f"no flake at {str(path)!r}: {path}/flake.nix does not exist",
                                    "point the pool at a directory holding flake.nix") from e
            except OSError as e:
                where = "it" if last else str(Path(*parts[:i + 1]))
                raise _changed(path, f"{where} is now a link, or not a directory ({e.strerror})") from e
            os.close(fd)
            fd = nxt
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise _changed(path, "it is not a directory")
        if expect and _identity(fd) != expect:
            raise _changed(path, "another directory is in its place")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _changed(path: Path, why: str) -> SourceRefused:
    return SourceRefused(f"flake directory {path} is not the one recorded at pool create: {why};"
                         " nothing was built",
                         "put the flake's directory back, or destroy the pool and create it again"
                         " with --flake")


def _scheme(ref: str) -> str | None:
    m = re.match(r"^([a-z][a-z0-9+.-]*):", ref)
    if m is None or ref.startswith(("./", "/", "../")) or os.path.isdir(ref):
        return None
    return m.group(1)


def _local_dir(text: str, base: Path | None) -> Path:
    if "?" in text or "#" in text:
        raise SourceRefused(f"flake directory {text!r} has a query or fragment",
                            "give the plain directory; mvm builds its flake.nix")
    d = Path(os.path.abspath((base or Path.cwd()) / os.path.expanduser(text)))
    if not (d / "flake.nix").is_file():
        raise SourceRefused(f"no flake at {text!r}: {d}/flake.nix does not exist",
                            "point --flake at a directory holding flake.nix")
    return d.resolve()


def _forbidden_roots(layout: Layout) -> list[Path]:
    roots = [layout.home, layout.secrets_runtime_dir(), layout.runtime_dir()]
    return [*roots, *(r.resolve() for r in roots)]


def _check_allowed_place(d: Path, layout: Layout) -> None:
    """Never mvm's own state (other tenants' secrets, disks, revisions) as a flake source."""
    if d in (layout.builtin_flake_dir(), layout.builtin_flake_dir().resolve()):
        return
    real = d.resolve()
    for root in _forbidden_roots(layout):
        if real == root or root in real.parents or d == root or root in d.parents:
            raise SourceRefused(f"flake directory {d} is inside mvm's state ({root})",
                                "keep flakes outside mvm's state directory")


def _check_flake_dir(d: Path, layout: Layout) -> None:
    _check_allowed_place(d, layout)
    st = os.lstat(d / "flake.nix")
    if not stat.S_ISREG(st.st_mode):
        raise SourceRefused(f"{d}/flake.nix is not a regular file (a link?)",
                            "make flake.nix a file in the flake's directory")


def _git_ref(ref: str) -> tuple[Path, dict[str, str]]:
    u = urllib.parse.urlparse(ref.removeprefix("git+"))
    if u.netloc not in ("", "localhost"):
        raise SourceRefused(f"{ref!r}: a git+file ref names a local repository",
                            "use git+file:///absolute/path")
    params = dict(urllib.parse.parse_qsl(u.query))
    unknown = set(params) - {"dir", "ref", "rev"}
    if unknown:
        raise SourceRefused(f"{ref!r}: unsupported parameter(s) {', '.join(sorted(unknown))}",
                            "git+file refs take dir, ref and rev")
    if not u.path.startswith("/"):
        raise SourceRefused(f"{ref!r}: the repository path must be absolute")
    for v in params.values():
        if v.startswith("-"):
            raise SourceRefused(f"{ref!r}: a parameter may not start with '-'")
    return Path(os.path.abspath(u.path)), params


# -- build: copy the source into a directory of mvm's own ---------------------

def stage(ref: str, dest: Path, layout: Layout, fetch: Callable[[str], str] | None = None,
          expect: str = "") -> Path:
    """Copy the flake's source tree to `dest` (which must not exist) and return the directory
    holding its flake.nix. `fetch(ref) -> store path` fetches a URL ref (the host builder
    uses Nix); the checks are the same whatever the source.

    A local directory or repository is the pool's recorded one (`ref` as `check_ref` made it
    at create: resolved, absolute): opened again without following any link and, with
    `expect` (its `identity` at create), refused if another directory is there now. Every
    file is then read through that descriptor, never by its path again."""
    d = local_dir(ref)
    if d is not None:
        fd = open_dir(d, expect)
        try:
            _check_allowed_place(Path(os.readlink(f"/proc/self/fd/{fd}")), layout)
            if _scheme(ref) == "git+file":
                return _stage_git(fd, d, _git_ref(ref)[1], dest)
            try:
                st = os.lstat("flake.nix", dir_fd=fd)
            except FileNotFoundError as e:
                raise SourceRefused(f"no flake at {str(d)!r}: {d}/flake.nix does not exist",
                                    "point the pool at a directory holding flake.nix") from e
            if not stat.S_ISREG(st.st_mode):
                raise SourceRefused(f"{d}/flake.nix is not a regular file (a link?)",
                                    "make flake.nix a file in the flake's directory")
            copy_tree(d, dest, root_fd=fd)
        finally:
            os.close(fd)
        return dest
    ref = check_ref(ref, layout)
    if fetch is None:
        raise SourceRefused(f"flake reference {ref!r} must be fetched, and nothing fetches here")
    copy_tree(Path(fetch(ref)), dest, exclude_top=())
    flake_dir = dest / urllib.parse.parse_qs(urllib.parse.urlparse(ref).query).get("dir", [""])[0]
    _inside(flake_dir, dest, ref)
    return flake_dir


def copy_tree(src: Path, dest: Path, exclude_top: Iterable[str] = EXCLUDED_TOP,
              layout: Layout | None = None, root_fd: int | None = None) -> None:
    """Copy `src`'s own tree: files (bytes and the executable bit), directories, and links
    that resolve inside it; a link leaving it, or a device, socket or FIFO, is refused.
    Top-level `exclude_top` names and `nix build` result links are left out.

    The source may be changed while it is read (it is the tenant's): every directory and file
    is opened relative to its parent's descriptor without following links, so a directory
    swapped for a link is never entered; links are checked on the copy, which is mvm's alone.
    With `layout`, the directory actually opened is checked again to be outside mvm's state.
    With `root_fd` (`open_dir`'s, which the caller keeps), that directory is copied, and `src`
    only names it in messages."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        root = os.open(src, flags | os.O_DIRECTORY) if root_fd is None else os.dup(root_fd)
    except OSError as e:
        raise SourceRefused(f"flake source {src} is not a directory ({e.strerror})") from e
    try:
        if layout is not None:
            _check_allowed_place(Path(os.readlink(f"/proc/self/fd/{root}")), layout)
        os.mkdir(dest, 0o700)
        _copy_dir(root, Path(src), dest, set(exclude_top), top=True)
    finally:
        os.close(root)
    for rel, target in _links(dest):
        _check_link(dest, rel, target, shown=Path(src) / rel)


def _copy_dir(fd: int, src: Path, dest: Path, skip: set[str], top: bool = False) -> None:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    for name in sorted(os.listdir(fd)):
        if top and name in skip:
            continue
        st = os.lstat(name, dir_fd=fd)
        if stat.S_ISLNK(st.st_mode):
            if top and RESULT_LINK.match(name):
                continue
            os.symlink(os.readlink(name, dir_fd=fd), dest / name)
        elif stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(name, flags | os.O_DIRECTORY, dir_fd=fd)
            except OSError as e:
                raise SourceRefused(f"flake source {src / name} changed while copied ({e.strerror})") from e
            try:
                os.mkdir(dest / name, 0o755)
                _copy_dir(sub, src / name, dest / name, skip)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            try:
                f = os.open(name, flags, dir_fd=fd)
            except OSError as e:
                raise SourceRefused(f"flake source {src / name} changed while copied ({e.strerror})") from e
            with os.fdopen(f, "rb") as r:
                fst = os.fstat(r.fileno())
                if not stat.S_ISREG(fst.st_mode):
                    raise SourceRefused(f"flake source {src / name} changed while copied")
                with open(dest / name, "xb") as w:
                    shutil.copyfileobj(r, w)
            os.chmod(dest / name, 0o755 if fst.st_mode & 0o111 else 0o644)
        else:
            raise SourceRefused(f"flake source holds {src / name}, which is not a file, directory or link",
                                "remove it from the flake's directory")


def _links(root: Path) -> Iterator[tuple[Path, str]]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            if p.is_symlink():
                yield p.relative_to(root), os.readlink(p)


def _check_link(root: Path, rel: Path, target: str, shown: Path) -> None:
    """A link inside the flake's tree must resolve inside it, following every link on the way
    (inside the tree) as the kernel would; `..` above the tree or an absolute target is out."""
    where = f"{shown} -> {target}"
    if os.path.isabs(target):
        raise _link_out(where)
    todo = [*rel.parent.parts, *Path(target).parts]
    cur: list[str] = []
    links = 0
    while todo:
        name = todo.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            if not cur:
                raise _link_out(where)
            cur.pop()
            continue
        path = root.joinpath(*cur, name)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            cur.append(name)  # dangling inside the tree: treated as a directory (stricter)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            t = os.readlink(path)
            if links > MAX_LINKS or os.path.isabs(t):
                raise _link_out(where)
            todo = [*Path(t).parts, *todo]
            continue
        cur.append(name)


def _link_out(where: str) -> SourceRefused:
    return SourceRefused(f"flake source link {where} leaves the flake's directory",
                         "copy what it points at into the flake's directory")


def _inside(path: Path, root: Path, what: str) -> None:
    if ".." in path.relative_to(root).parts or not (path / "flake.nix").is_file():
        raise SourceRefused(f"{what}: no flake.nix in the fetched source at that dir")


def _stage_git(repo_fd: int, repo: Path, params: dict[str, str], dest: Path) -> Path:
    """The committed tree (HEAD, or `ref`/`rev`) of the flake's directory in the repository,
    read as objects (`git ls-tree`, `git cat-file`): no checkout, no filter or hook runs.

    Git works in the directory `repo_fd` holds (never the path again), with the repository's
    `.git`, and as the repository directory's owner: whatever `.git` links to or names
    (`gitdir:`, alternates, linked refs or objects), it reads only what that user could."""
    sub = params.get("dir", "").strip("/")
    if ".." in Path(sub).parts:
        raise SourceRefused(f"git+file ref: dir={sub!r} leaves the repository")
    rev = params.get("rev") or params.get("ref") or "HEAD"
    git = _Git(repo_fd, repo)
    commit = git.text(["rev-parse", "--verify", "--end-of-options", f"{rev}^{{commit}}"]).strip()
    listing = git.text(["ls-tree", "-r", "-z", "--full-tree", commit, *(["--", sub] if sub else [])])
    entries = []
    for item in listing.split("\0"):
        if not item:
            continue
        meta, path = item.split("\t", 1)
        mode, kind, obj = meta.split()
        rel = Path(path).relative_to(sub) if sub else Path(path)
        entries.append((mode, kind, obj, rel))
    if not any(rel == Path("flake.nix") and mode.startswith("100") for mode, _, _, rel in entries):
        raise SourceRefused(f"no flake.nix committed in {repo}{'/' + sub if sub else ''} at {rev}",
                            "commit flake.nix (mvm builds the committed tree)")
    tree = dest.with_name(dest.name + ".tree")
    os.mkdir(tree, 0o700)
    try:
        for mode, kind, obj, rel in entries:
            if kind != "blob" or (len(rel.parts) == 1 and rel.name in EXCLUDED_TOP):
                continue  # submodules are not part of the tree (as for Nix)
            d = tree / rel
            d.parent.mkdir(parents=True, exist_ok=True)
            data = git.run(["cat-file", "blob", obj]).stdout
            if mode == "120000":
                os.symlink(os.fsdecode(data), d)
            else:
                d.write_bytes(data)
                os.chmod(d, 0o755 if mode == "100755" else 0o644)
        copy_tree(tree, dest, exclude_top=())
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    return dest


class _Git:
    """git in the repository directory held by `fd`, as that directory's owner, reading no
    system or user configuration."""

    def __init__(self, fd: int, repo: Path) -> None:
        self.fd = fd
        self.repo = repo
        st = os.fstat(fd)
        self.uid, self.gid = st.st_uid, st.st_gid
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent",
                    "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
                    "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}

    def run(self, args: list[str]) -> subprocess.CompletedProcess[bytes]:
        argv = ["git", "--git-dir=.git", "-c", "core.fsmonitor=false", *args]
        user = {} if self.uid == 0 else {"user": self.uid, "group": self.gid, "extra_groups": []}
        # (the child changes into the directory through /proc/self/fd as root, before it
        # becomes the owner: the directory's path is not looked up again)
        p = subprocess.run(argv, capture_output=True, timeout=300, check=False,
                           cwd=f"/proc/self/fd/{self.fd}", pass_fds=(self.fd,), env=self.env,
                           stdin=subprocess.DEVNULL, **user)  # type: ignore[call-overload]
        if p.returncode != 0:
            msg = (p.stderr.decode(errors="replace").strip().splitlines() or ["git failed"])[-1]
            raise SourceRefused(f"git in {self.repo}: {msg}", "check the repository and the ref")
        return p

    def text(self, args: list[str]) -> str:
        return self.run(args).stdout.decode(errors="surrogateescape")


# -- inputs: read, never evaluated --------------------------------------------

def check_inputs(flake_dir: Path, allowed: Iterable[str] = ()) -> None:
    """Refuse inputs that name host paths, from flake.lock and flake.nix's text, before Nix
    fetches anything. `allowed` are mvm's own local flakes (the offline nixpkgs set)."""
    ok = {_norm_allowed(a) for a in allowed if a}
    lock = flake_dir / "flake.lock"
    if os.path.lexists(lock):
        try:
            data = json.loads(lock.read_text())
        except (OSError, ValueError) as e:
            raise SourceRefused(f"flake.lock is not readable JSON: {e}") from e
        for name, node in (data.get("nodes") or {}).items():
            for part in ("original", "locked"):
                spec = node.get(part) if isinstance(node, dict) else None
                if isinstance(spec, dict):
                    _check_lock_spec(f"flake.lock input {name!r}", spec, ok)
    for where, key, value in _input_strings((flake_dir / "flake.nix").read_text(errors="replace")):
        _check_input_string(where, value, ok, key)


def _norm_allowed(ref: str) -> str:
    return os.path.normpath(ref.removeprefix("path:").split("?")[0])


def _refused(where: str, what: str) -> SourceRefused:
    return SourceRefused(f"{where}: {what} names a host path outside the flake's directory",
                         "use inputs inside the flake's own directory (path:./sub) or URL refs")


def _check_path(where: str, path: str, ok: set[str], shown: str) -> None:
    p = path.split("?")[0]
    if p.startswith("~") or (os.path.isabs(p) and os.path.normpath(p) not in ok):
        raise _refused(where, shown)
    if not os.path.isabs(p) and ".." in Path(p).parts:
        raise _refused(where, shown)


def _check_lock_spec(where: str, spec: dict[str, Any], ok: set[str]) -> None:
    kind = str(spec.get("type", ""))
    if kind == "path":
        _check_path(where, str(spec.get("path", "")), ok, f"path {spec.get('path')!r}")
    for key in ("url", "path", "dir"):
        v = spec.get(key)
        if isinstance(v, str) and kind != "path":
            _check_input_string(f"{where} ({key})", v, ok, key)


def _check_input_string(where: str, value: str, ok: set[str], key: str = "") -> None:
    scheme = re.match(r"^([a-z][a-z0-9+.-]*):", value)
    if ".." in re.split(r"[/?&=]", value):
        raise _refused(where, repr(value))
    if scheme:
        s = scheme.group(1)
        if s == "path":
            _check_path(where, value[5:], ok, repr(value))
        elif s == "file" or s.endswith("+file"):
            raise _refused(where, repr(value))
        return
    if key in ("url", "path") or value.startswith(("/", "./", "~")) or value in (".", ".."):
        if key == "url" and re.fullmatch(r"[A-Za-z][\w-]*(/[\w.-]+)?", value):
            return  # an indirect ref (`nixpkgs`): a name, not a path
        _check_path(where, value, ok, repr(value))


# A small reader of Nix's syntax: comments, strings (with their `${…}`) and brackets, enough to
# find the top-level `inputs` attributes and read their values as literals. Anything that would
# need evaluating there is refused.
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_'-]*")
Token = tuple[str, str]  # (kind, text): ident, str, cstr (a string with ${…}), punct, other


def _tokens(text: str) -> list[Token]:
    out: list[Token] = []
    _lex(text, 0, out, nested=False)
    return out


def _lex(text: str, i: int, out: list[Token], nested: bool) -> int:
    depth = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c == '"':
            i = _lex_string(text, i + 1, out, '"')
        elif text.startswith("''", i):
            i = _lex_string(text, i + 2, out, "''")
        elif c == "{" or text.startswith("${", i):
            if c == "$":
                out.append(("other", "$"))
                i += 1
            out.append(("punct", "{"))
            depth += 1
            i += 1
        elif c == "}":
            if nested and depth == 0:
                return i + 1
            depth -= 1
            out.append(("punct", c))
            i += 1
        elif m := _IDENT.match(text, i):
            out.append(("ident", m.group()))
            i = m.end()
        else:
            out.append(("punct" if c in "=;.[]()" else "other", c))
            i += 1
    if nested:
        raise SourceRefused("flake.nix: an unterminated ${ in a string")
    return i


def _lex_string(text: str, i: int, out: list[Token], quote: str) -> int:
    buf: list[str] = []
    computed = False
    n = len(text)
    while i < n:
        if quote == '"':
            c = text[i]
            if c == "\\" and i + 1 < n:
                buf.append({"n": "\n", "t": "\t", "r": "\r"}.get(text[i + 1], text[i + 1]))
                i += 2
                continue
            if c == '"':
                out.append(("cstr" if computed else "str", "".join(buf)))
                return i + 1
        else:
            if text.startswith("'''", i):
                buf.append("''")
                i += 3
                continue
            if text.startswith("''$", i) or text.startswith("''\\", i):
                buf.append(text[i + 2:i + 4] if text[i + 2] == "\\" else "$")
                i += 4 if text[i + 2] == "\\" else 3
                continue
            if text.startswith("''", i):
                out.append(("cstr" if computed else "str", "".join(buf)))
                return i + 2
        if text.startswith("$${", i):
            buf.append("${")
            i += 3
            continue
        if text.startswith("${", i):
            computed = True
            i = _lex(text, i + 2, [], nested=True)
            continue
        buf.append(text[i])
        i += 1
    raise SourceRefused("flake.nix: an unterminated string")


def _input_strings(text: str) -> list[tuple[str, str, str]]:
    """(where, attribute, string) for every string in the top-level `inputs` attributes of
    flake.nix. flake.nix must be one attribute set; the values under `inputs` may only be
    attribute sets, plain strings and true/false: a computed value (`"pa" + "th:/…"`, `${…}`,
    a variable, an import) cannot be read without evaluating, and is refused."""
    toks = _tokens(text)
    i = 1 if toks[:1] == [("ident", "rec")] else 0
    if toks[i:i + 1] != [("punct", "{")]:
        raise SourceRefused("flake.nix is not an attribute set { … }",
                            "write flake.nix as one attribute set (no let, import or function around it)")
    found: list[tuple[str, str, str]] = []
    depth = 0
    stmt_start = False
    while i < len(toks):
        kind, v = toks[i]
        if kind == "punct" and v in "{[(":
            depth += 1
            stmt_start = depth == 1
        elif kind == "punct" and v in "}])":
            depth -= 1
            if depth == 0 and i != len(toks) - 1:
                raise SourceRefused("flake.nix has more after its attribute set",
                                    "write flake.nix as one attribute set")
        elif depth == 1 and stmt_start:
            if v == "inputs" and kind in ("ident", "str"):
                i = _read_inputs(toks, i, found)
                continue
            if kind == "ident" and v == "inherit":
                j = i
                while j < len(toks) and toks[j] != ("punct", ";"):
                    if toks[j][1] == "inputs":
                        raise _computed("inherit … inputs")
                    j += 1
            elif kind not in ("ident", "str"):
                raise _computed("a top-level attribute name")
            stmt_start = False
        elif depth == 1 and kind == "punct" and v == ";":
            stmt_start = True
        i += 1
    return found


def _read_inputs(toks: list[Token], i: int, found: list[tuple[str, str, str]]) -> int:
    """Read `inputs… = value;` from toks[i]; returns the index after its `;`."""
    frames: list[list[str]] = [[]]
    while i < len(toks) and toks[i] != ("punct", "="):
        kind, v = toks[i]
        if kind in ("ident", "str"):
            frames[0].append(v)
        elif toks[i] != ("punct", "."):
            raise _computed(".".join(frames[0]) or "inputs")
        i += 1
    frames.append([])
    i += 1
    while i < len(toks):
        kind, v = toks[i]
        names = [n for f in frames for n in f]
        nxt = toks[i + 1] if i + 1 < len(toks) else ("", "")
        if kind in ("ident", "str") and nxt in (("punct", "="), ("punct", ".")):
            frames[-1].append(v)  # (part of) an attribute name
        elif kind == "punct" and v in "=.":
            pass
        elif kind == "punct" and v == "{":
            frames.append([])
        elif kind == "punct" and v == "}":
            if len(frames) <= 2:
                raise _computed(".".join(names))
            frames.pop()
        elif kind == "punct" and v == ";":
            if len(frames) == 2:
                return i + 1
            frames[-1].clear()
        elif kind == "ident" and v in ("true", "false"):
            pass
        elif kind == "str":
            found.append((f"flake.nix {'.'.join(names)}", names[-1] if names else "", v))
        else:
            raise _computed(".".join(names))
        i += 1
    raise _computed(".".join(frames[0]))


def _computed(where: str) -> SourceRefused:
    return SourceRefused(f"flake.nix: {where} is not a literal mvm can read without evaluating",
                         "write inputs as plain strings and attribute sets")
