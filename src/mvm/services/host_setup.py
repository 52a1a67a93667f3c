"""Host set-up (`mvm setup`) and checks (`mvm doctor`)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mvm.config import settings
from mvm.config.paths import Layout
from mvm.config.settings import Settings
from mvm.errors import CommandFailed
from mvm.util import proc
from mvm.util.progress import Progress

if TYPE_CHECKING:
    from mvm.runtime.jail import Verdict

DATA = Path(__file__).resolve().parent.parent / "data"


def internet_reachable(host: str = "github.com", timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def install_builtin_flake(layout: Layout) -> Path:
    dest = layout.builtin_flake_dir()
    dest.mkdir(parents=True, exist_ok=True)
    src = DATA / "builtin-flake" / "flake.nix"
    if not (dest / "flake.nix").is_file() or (dest / "flake.nix").read_bytes() != src.read_bytes():
        shutil.copyfile(src, dest / "flake.nix")
    return dest


BUILD_USERS = 8  # Nix runs each concurrent build as one of them (Nix's installer makes 32)
NOLOGIN = "/usr/sbin/nologin"


def ensure_build_users(count: int = BUILD_USERS) -> list[str]:
    """Create Nix's build users as Nix's own installer does: a system group `nixbld` whose
    members nixbld1..N have no home, no login shell and no other group. Idempotent."""
    import grp
    import pwd

    from mvm.image import nix

    group = nix.BUILD_GROUP
    try:
        grp.getgrnam(group)
    except KeyError:
        proc.run(["groupadd", "--system", group])
    for i in range(1, count + 1):
        user = f"{group}{i}"
        try:
            pwd.getpwnam(user)
        except KeyError:
            proc.run(["useradd", "--system", "--no-create-home", "--home-dir", "/var/empty",
                      "--shell", NOLOGIN, "--gid", group, "--groups", group,
                      "--comment", f"Nix build user {i}", user])
        else:
            if user not in grp.getgrnam(group).gr_mem:
                proc.run(["usermod", "--append", "--groups", group, user])
    return nix.build_users()


def setup(layout: Layout, offline: bool | None, progress: Progress) -> None:
    from mvm.image import kernel, offline_nixpkgs

    progress("nix-build-users", "…")
    users = ensure_build_users()
    progress("nix-build-users", f"group nixbld: {len(users)} users")
    progress("kernel", "…")
    info = kernel.install_default_kernel(layout.kernel_dir())
    progress("kernel", f"{layout.kernel_dir()} ({getattr(info, 'version', '')})")
    progress("builtin-flake", "…")
    progress("builtin-flake", str(install_builtin_flake(layout)))
    progress("nixpkgs", "…")
    d = offline_nixpkgs.install(layout.offline_nixpkgs_dir())
    if offline is None:
        offline = not internet_reachable()
    current = settings.get(layout, "nixpkgs")
    if offline and not current:
        settings.set_value(layout, "nixpkgs", offline_nixpkgs.ref(d))
    elif offline is False and current == offline_nixpkgs.ref(d):
        settings.set_value(layout, "nixpkgs", "")
    progress("nixpkgs", f"flakes' nixpkgs input -> {settings.get(layout, 'nixpkgs') or 'their own (online)'}")
    from mvm.runtime import accel

    progress("accelerator", "…")
    probe = accel.probe_kvm(cache=layout.kvm_probe_cache())
    progress("accelerator", f"{'kvm' if probe.fast else 'tcg'} ({probe.reason})")
    progress("jail", "…")
    progress("jail", record_jail(layout).line())
    setup_builder(layout, progress)


def record_jail(layout: Layout) -> Verdict:
    """Decide, once for this host, whether it can jail hypervisors, and record it (`doctor`
    shows it; every start holds to it: see runtime/jail.Verdict)."""
    from mvm.runtime import jail

    verdict = jail.decide_host()
    verdict.save(layout.jail_verdict())
    return verdict


def setup_builder(layout: Layout, progress: Progress) -> None:
    """The builder microVM's image and the package set's export it imports (idempotent)."""
    from mvm.builder import on_host, vm_image

    info, made = vm_image.install(layout.builder_dir(), progress)
    progress("builder", f"{info.image} (version {info.version}{'' if made else ', current'})")
    nixpkgs = settings.get(layout, "nixpkgs")
    if nixpkgs.startswith("path:"):
        on_host.nixpkgs_export(layout, Path(nixpkgs.removeprefix("path:")))


def _check(name: str, ok: bool, detail: str, required: bool = True, **data: Any) -> dict[str, Any]:
    return {"check": name, "ok": ok, "detail": detail, "required": required, **data}


# Host Nix settings that weaken the isolation of builds, and what mvm's own nix.conf says.
WEAKENING: dict[str, Callable[[Any], bool]] = {
    "sandbox": lambda v: v is not True,
    "sandbox-fallback": lambda v: v is not False,
    "sandbox-paths": lambda v: bool(v),
    "extra-sandbox-paths": lambda v: bool(v),
    "build-users-group": lambda v: not v,
    "allow-new-privileges": lambda v: v is True,
}


def _nix_checks(nixpkgs: str) -> list[dict[str, Any]]:
    """The sandbox mvm builds with, its build users, and host settings that would weaken it."""
    from mvm.image import nix

    out = []
    conf = nix.CONF_DIR / "nix.conf"
    try:
        mine = nix.effective_settings(nixpkgs)
    except CommandFailed as e:
        return [_check("nix sandbox", False, f"cannot read Nix's settings: {e.message}")]
    sandbox = {k: mine.get(k) for k in ("sandbox", "sandbox-fallback", "sandbox-paths",
                                         "build-users-group", "store")}
    weak = [k for k, bad in WEAKENING.items() if k in mine and bad(mine[k])]
    out.append(_check(
        "nix sandbox", not weak,
        (f"on: sandbox = true, sandbox-fallback = false, no host paths, builds as "
         f"{nix.BUILD_GROUP} users (settings: {conf})") if not weak
        else f"weakened in {conf}: {', '.join(weak)}",
        settings=sandbox, config=str(conf)))
    users = nix.build_users()
    out.append(_check(
        "nix build users", bool(users),
        f"group {nix.BUILD_GROUP}: {len(users)} users" if users
        else f"group {nix.BUILD_GROUP} missing or empty: run `mvm setup`",
        group=nix.BUILD_GROUP, users=users))
    # What the host's own configuration says (mvm does not read it): other Nix users of this
    # host build with it, and a reader may wonder whether mvm does.
    try:
        host_out = proc.output(["nix", "--extra-experimental-features", "nix-command",
                                "show-config", "--json"], timeout=60)
        host = {k: v.get("value") for k, v in json.loads(host_out).items() if isinstance(v, dict)}
    except (CommandFailed, ValueError):
        host = {}
    where = os.environ.get("NIX_CONF_DIR", "/etc/nix") + "/nix.conf"
    host_weak = {k: host[k] for k, bad in WEAKENING.items() if k in host and bad(host[k])}
    out.append(_check(
        "host nix.conf", not host_weak,
        "does not weaken the sandbox" if not host_weak else
        f"warning: {where} weakens Nix's sandbox for other users of Nix on this host "
        f"({', '.join(f'{k} = {_nix_value(v)}' for k, v in host_weak.items())}); "
        "mvm ignores it and builds with its own settings",
        required=False, weakening=host_weak, path=where))
    return out


def _nix_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return " ".join(map(str, v))
    return str(v)


def doctor(layout: Layout) -> list[dict[str, Any]]:
    from mvm.runtime import accel

    checks = []
    qemu = proc.which("qemu-system-x86_64")
    qv = ""
    if qemu:
        try:
            qv = proc.output([qemu, "--version"], timeout=10).splitlines()[0]
        except CommandFailed as e:
            qv = e.message
    checks.append(_check("qemu", bool(qemu), qv or "qemu-system-x86_64 not found: apt-get install qemu-system-x86"))
    probe = accel.probe_kvm(cache=layout.kvm_probe_cache())
    checks.append(_check("kvm", True, f"{'usable and fast' if probe.fast else 'not used'}: {probe.reason}",
                         required=False))
    settings_ = Settings.load(layout)
    checks.append(_check("accelerator", True, accel.choose_accel(settings_.accel.value,
                                                                 cache=layout.kvm_probe_cache())))
    nix = proc.which("nix")
    checks.append(_check("nix", bool(nix), proc.output(["nix", "--version"], timeout=10).strip()
                         if nix else "nix not found: apt-get install nix-bin"))
    if nix:
        checks += _nix_checks(settings_.nixpkgs)
    checks.append(_check("nixpkgs", True, settings_.nixpkgs or "flakes use their own nixpkgs input"))
    mkfs = proc.which("mkfs.ext4")
    checks.append(_check("mkfs.ext4", bool(mkfs), mkfs or "apt-get install e2fsprogs"))
    tun = os.path.exists("/dev/net/tun")
    checks.append(_check("/dev/net/tun", tun, "present" if tun else "missing: modprobe tun"))
    bridge = os.path.isdir("/sys/class/net") and (os.path.exists("/sys/module/bridge")
                                                 or os.geteuid() == 0)
    checks.append(_check("bridge", bridge, "bridges can be created" if bridge else "no bridge support"))
    nft = proc.which("nft")
    checks.append(_check("nftables", bool(nft), nft or "apt-get install nftables", required=False))
    if nft:
        from mvm.lifecycle import netops

        checks.append(_check("firewall", True, netops.firewall_state(layout), required=False))
    kdir = layout.kernel_dir()
    have_kernel = (kdir / "vmlinux").is_file() and (kdir / "initrd").is_file()
    checks.append(_check("guest kernel", have_kernel,
                         str(kdir) if have_kernel else f"missing in {kdir}: run `mvm setup`"))
    checks.append(_jail_check(settings_, layout))
    checks += _firecracker_checks(settings_)
    return checks


def _firecracker_checks(settings_: Settings) -> list[dict[str, Any]]:
    """Firecracker's and its jailer's versions (`--version`), or their absence."""
    from mvm.runtime import firecracker

    rows = []
    for name in (firecracker.BINARY, firecracker.JAILER):
        version = firecracker.version(name)
        needed = settings_.backend.value == "firecracker" and name == firecracker.BINARY
        rows.append(_check(name, version is not None,
                           version or f"absent ({name} is not on PATH)", required=needed))
    return rows


def _jail_check(settings_: Settings, layout: Layout) -> dict[str, Any]:
    """The hypervisor jail: the setting, the host's verdict as `mvm setup` recorded it (can it
    jail, and if not why), what this process can do now, its uid range, cgroups."""
    from mvm.runtime import jail

    mode = jail.Mode(settings_.jail.value)
    verdict = jail.Verdict.load(layout.jail_verdict())
    now = jail.support()
    backend = settings_.backend.value
    why = verdict.why_not(backend) if verdict is not None else None
    # ok: starts are jailed (or the setting says off); a start that would be refused fails a
    # required check, one that runs unjailed because the host cannot jail is a warning
    if mode is jail.Mode.OFF:
        ok, required = True, False
    elif verdict is None:  # the first start decides (and records) it
        ok, required = now.ok, mode is jail.Mode.REQUIRED
    elif why is not None:
        ok, required = False, mode is jail.Mode.REQUIRED
    else:
        ok, required = now.ok, True
    return _check("jail", ok, jail.describe_host(mode, settings_.jail_uid_base, verdict, now),
                  required=required, mode=mode.value,
                  host_can_jail=None if verdict is None else why is None,
                  host_reason=None if verdict is None else (why or ""),
                  decided=None if verdict is None else verdict.decided,
                  now_ok=now.ok, now_reason=now.reason,
                  cgroup_version=now.cgroups.version, controllers=sorted(now.cgroups.roots),
                  seccomp=None if verdict is None else verdict.backends.get("qemu", "") is None)
