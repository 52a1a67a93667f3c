"""The offline nixpkgs set: the user guide's flakes build verbatim against it and run in a chroot."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mvm.errors import CommandFailed, HostUnsupported, InvalidInput
from mvm.image import nix as mvm_nix
from mvm.image import offline_nixpkgs
from mvm.util import proc

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
BUILTIN = REPO / "src" / "mvm" / "data" / "builtin-flake" / "flake.nix"
# mvm's own Nix settings (sandbox on, build users), with nothing to substitute from
NIX_ENV = {**mvm_nix.env(), "NIX_CONFIG": "substituters ="}
SERVICE = """\
[Unit]
Description=My Application
After=network.target

[Service]
ExecStart=/usr/bin/my-app
Restart=always

[Install]
WantedBy=multi-user.target
"""

debian = pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="needs a Debian host")
needs_nix = pytest.mark.skipif(shutil.which("nix") is None, reason="needs nix")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")


def nix(*args: str, timeout: float = 600) -> str:
    return proc.output(["nix", *args], env=NIX_ENV, timeout=timeout)


def build(flake: Path | str, attr: str, nixpkgs: Path) -> str:
    """Build `<flake>#<attr>` the way mvm does; return the output path."""
    ref = flake if isinstance(flake, str) else f"path:{flake}"
    out = nix("build", "--no-link", "--json", "--no-write-lock-file",
              "--override-input", "nixpkgs", offline_nixpkgs.ref(nixpkgs), f"{ref}#{attr}")
    return str(json.loads(out)[0]["outputs"]["out"])


def make_root(out: str, root: Path) -> Path:
    """Lay a profile out as a guest root: its closure in /nix/store, its contents at /."""
    store = root / "nix" / "store"
    store.mkdir(parents=True)
    closure = nix("path-info", "-r", out).split()
    proc.run(["cp", "-a", *closure, str(store)])
    proc.run(["cp", "-a", f"{out}/.", str(root)])
    return root


def in_root(root: Path, *argv: str) -> str:
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    res = proc.run(["env", "-i", "PATH=/bin:/sbin", "HOME=/", "LC_ALL=C",
                    chroot, str(root), *argv], check=False)
    text = res.stdout.decode() + res.stderr.decode()
    assert res.returncode == 0, f"{argv} failed in {root}: {text}"
    return res.stdout.decode()


# --- without Nix --------------------------------------------------------------------------


def test_builtin_flake_is_the_guides_first_flake() -> None:
    assert BUILTIN.read_text() == (FIXTURES / "guide-flake" / "flake.nix").read_text()
    text = BUILTIN.read_text()
    for profile in ("minimal", "baseline", "python"):
        assert f"{profile} = pkgs.buildEnv" in text


def test_ref_is_a_path_flake(tmp_path: Path) -> None:
    assert offline_nixpkgs.ref(tmp_path) == f"path:{tmp_path.resolve()}"


@debian
def test_install_is_idempotent_and_records_versions(tmp_path: Path) -> None:
    dest = tmp_path / "np"
    assert offline_nixpkgs.install(dest) == dest
    files = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert {Path("flake.nix"), Path("pkgs.nix"), Path("versions.json")} <= set(files)
    inode = (dest / "versions.json").stat().st_ino
    offline_nixpkgs.install(dest)
    assert (dest / "versions.json").stat().st_ino == inode  # untouched when nothing changed
    data = json.loads(files[Path("versions.json")])
    curl = data["packages"]["curl"]
    assert curl["debian"]["curl"] == data["debian"]["curl"]
    assert any(k.startswith("libcurl") for k in curl["debian"])
    assert ["/lib64/ld-linux-x86-64.so.2", "lib64/ld-linux-x86-64.so.2"] in curl["copy"]
    # the host files are in the store, content-addressed, and kept from garbage collection
    assert curl["files"]["name"] == f"curl-{curl['version']}-debian-files"
    assert curl["files"]["sha256"].startswith("sha256-")
    store = Path(curl["files"]["path"])
    assert (store / "bin/curl").read_bytes() == Path("/usr/bin/curl").read_bytes()
    assert (store / "lib64/ld-linux-x86-64.so.2").read_bytes() == Path(
        "/lib64/ld-linux-x86-64.so.2").read_bytes()
    assert os.readlink(offline_nixpkgs.GCROOTS / store.name) == str(store)
    assert set(data["packages"]) >= {"bash", "busybox", "coreutils", "curl", "wget", "openssl",
                                     "python3", "pip", "cacert"}


def test_install_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(InvalidInput):
        offline_nixpkgs.install(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# --- with Nix -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nixpkgs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("nix") is None or shutil.which("dpkg-query") is None:
        pytest.skip("needs nix on a Debian host")
    return offline_nixpkgs.install(tmp_path_factory.mktemp("offline") / "nixpkgs")


@pytest.fixture(scope="module")
def roots(nixpkgs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    base = tmp_path_factory.mktemp("roots")
    out = {}
    for profile in ("minimal", "baseline", "python"):
        out[profile] = make_root(build(FIXTURES / "guide-flake", profile, nixpkgs), base / profile)
    out["services"] = make_root(build(FIXTURES / "services-flake", "baseline", nixpkgs), base / "services")
    return out


@pytest.mark.nix
@needs_nix
@needs_root
def test_minimal_profile_runs(roots: dict[str, Path]) -> None:
    root = roots["minimal"]
    assert in_root(root, "/bin/busybox", "echo", "ok") == "ok\n"
    assert in_root(root, "/bin/sh", "-c", "echo ok | cat") == "ok\n"  # applet symlinks
    assert in_root(root, "/bin/curl", "--version").startswith("curl ")


@pytest.mark.nix
@needs_nix
@needs_root
def test_baseline_profile_runs(roots: dict[str, Path]) -> None:
    root = roots["baseline"]
    assert in_root(root, "/bin/bash", "-c", "echo ok") == "ok\n"
    assert in_root(root, "/bin/curl", "--version").startswith("curl ")
    assert "Wget" in in_root(root, "/bin/wget", "--version")
    assert in_root(root, "/bin/openssl", "version").startswith("OpenSSL ")
    assert "cert" in in_root(root, "/bin/ls", "/etc/ssl/certs")
    assert in_root(root, "/bin/bash", "-c", "printf x | sha256sum").startswith("2d711642b726b044")


@pytest.mark.nix
@needs_nix
@needs_root
def test_python_profile_runs(roots: dict[str, Path]) -> None:
    root = roots["python"]
    out = in_root(root, "/bin/python3", "-c",
                  "import ssl, sqlite3, json; print(json.dumps(ssl.OPENSSL_VERSION))")
    assert "OpenSSL" in out
    assert in_root(root, "/bin/pip", "--version").startswith("pip ")
    assert in_root(root, "/bin/bash", "-c", "echo ok") == "ok\n"
    # OpenSSL's default CA file exists in the profile, so TLS clients can verify peers
    n = in_root(root, "/bin/python3", "-c",
                "import ssl; print(len(ssl.create_default_context().get_ca_certs()))")
    assert int(n) > 10


@pytest.mark.nix
@needs_nix
@needs_root
def test_services_example_builds(roots: dict[str, Path]) -> None:
    root = roots["services"]
    assert (root / "etc/systemd/system/my-app.service").read_text() == SERVICE
    assert in_root(root, "/bin/bash", "-c", "echo ok") == "ok\n"
    assert in_root(root, "/bin/curl", "--version").startswith("curl ")


@pytest.mark.nix
@needs_nix
def test_same_input_gives_same_out_path(nixpkgs: Path, tmp_path: Path) -> None:
    again = offline_nixpkgs.install(tmp_path / "again")
    for attr in ("minimal", "python"):
        assert build(FIXTURES / "guide-flake", attr, nixpkgs) == build(FIXTURES / "guide-flake", attr, again)


@pytest.mark.nix
@needs_nix
def test_debian_versions_address_the_packages(nixpkgs: Path, tmp_path: Path) -> None:
    """A newer library changes the packages holding it, and only those."""
    changed = tmp_path / "changed"
    shutil.copytree(nixpkgs, changed)
    data = json.loads((changed / "versions.json").read_text())
    ssl = next(k for k in data["packages"]["curl"]["debian"] if k.startswith("libssl"))
    for entry in data["packages"].values():
        if ssl in entry["debian"]:
            entry["debian"][ssl] += "+local1"
    (changed / "versions.json").write_text(json.dumps(data))

    def out_path(where: Path, attr: str) -> str:
        return nix("eval", "--raw", f"path:{where}#legacyPackages.x86_64-linux.{attr}.outPath")

    assert out_path(nixpkgs, "curl") != out_path(changed, "curl")
    assert out_path(nixpkgs, "openssl") != out_path(changed, "openssl")
    assert out_path(nixpkgs, "bash") == out_path(changed, "bash")


@pytest.mark.nix
@needs_nix
def test_imported_bytes_address_the_packages(nixpkgs: Path, tmp_path: Path) -> None:
    """Other bytes for the host files of one package give another store path for it and for
    what holds it, and nothing else; the build itself never reads the host."""
    changed = tmp_path / "changed"
    shutil.copytree(nixpkgs, changed)
    data = json.loads((changed / "versions.json").read_text())
    data["packages"]["curl"]["files"]["sha256"] = "sha256-" + "A" * 43 + "="
    (changed / "versions.json").write_text(json.dumps(data))

    def out_path(where: Path, attr: str) -> str:
        return nix("eval", "--raw", f"path:{where}#legacyPackages.x86_64-linux.{attr}.outPath")

    assert out_path(nixpkgs, "curl") != out_path(changed, "curl")
    assert out_path(nixpkgs, "bash") == out_path(changed, "bash")
    # a set whose recorded bytes the host no longer has is refused with a hint, not rebuilt
    data["packages"]["curl"]["files"]["path"] = "/nix/store/" + "0" * 32 + "-curl-files"
    (changed / "versions.json").write_text(json.dumps(data))
    with pytest.raises(HostUnsupported) as err:
        offline_nixpkgs.ensure_imported(offline_nixpkgs.ref(changed))
    assert "host files of offline package curl changed" in err.value.message
    assert "mvm setup" in (err.value.hint or "")


@pytest.mark.nix
@needs_nix
def test_build_env_and_trivial_builders(nixpkgs: Path, tmp_path: Path) -> None:
    flake = tmp_path / "collide"
    flake.mkdir()
    (flake / "flake.nix").write_text("""{
      inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.05";
      outputs = { self, nixpkgs }: let pkgs = nixpkgs.legacyPackages.x86_64-linux; in {
        packages.x86_64-linux = {
          same = pkgs.buildEnv { name = "same"; paths = [
            (pkgs.writeTextDir "etc/a" "one") (pkgs.writeTextDir "etc/a" "one") ]; };
          differ = pkgs.buildEnv { name = "differ"; paths = [
            (pkgs.writeTextDir "etc/a" "one") (pkgs.writeTextDir "etc/a" "two") ]; };
          prio = pkgs.buildEnv { name = "prio"; paths = [
            ((pkgs.writeTextDir "etc/a" "loses") // { meta.priority = 10; })
            (pkgs.writeTextDir "etc/a" "wins") ]; };
          both = pkgs.buildEnv { name = "both"; paths = [ pkgs.busybox pkgs.bash ]; };
          rc = pkgs.runCommand "rc" { nativeBuildInputs = [ pkgs.curl ]; greeting = "hi"; } ''
            curl --version | head -n1 > $out
            echo "$greeting" >> $out
          '';
          script = pkgs.buildEnv { name = "script"; paths = [
            (pkgs.writeShellScriptBin "hello" "echo hello from bash $BASH_VERSION") ]; };
        };
      };
    }""")
    assert (Path(build(flake, "same", nixpkgs)) / "etc/a").read_text() == "one"
    assert (Path(build(flake, "prio", nixpkgs)) / "etc/a").read_text() == "wins"
    both = Path(build(flake, "both", nixpkgs))  # busybox has a low priority, like nixpkgs'
    assert os.path.realpath(both / "bin/sh").endswith("/bin/bash")
    with pytest.raises(CommandFailed) as err:
        build(flake, "differ", nixpkgs)
    assert "collision at /etc/a" in err.value.stderr
    assert Path(build(flake, "rc", nixpkgs)).read_text().split("\n")[:2] == [
        in_host_curl_version(), "hi"]
    if os.geteuid() == 0:  # the script's bash (and its libraries) come along by propagation
        root = make_root(build(flake, "script", nixpkgs), tmp_path / "root")
        assert in_root(root, "/bin/hello").startswith("hello from bash 5")


def in_host_curl_version() -> str:
    return proc.output(["curl", "--version"]).splitlines()[0]
