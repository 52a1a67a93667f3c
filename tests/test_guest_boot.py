"""Real guests: mvm's default kernel + initrd boot a tiny rootfs under QEMU (TCG) and the
guest contract (DESIGN §5) is checked through the agent, as the host would see it.

The QEMU command line is spelled out here on purpose: this tests the guest side, not
mvm's runtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mvm.errors import GuestError
from mvm.guest.agent_client import AGENT_PORT_NAME, GuestAgentClient
from mvm.guest.layout import install_guest_files
from mvm.image.kernel import KernelInfo, install_default_kernel
from tests.doubles import agent_protocol as proto

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU"),
]

BOOT_TIMEOUT = 90.0
SECRETS = {"api_key": "s3cr3t", "db": {"password": "hunter2"}}

MY_APP = """#!/bin/sh
echo "start $$ GREETING=$GREETING OTHER=$OTHER cwd=$(/bin/busybox pwd)" >> /run/my-app.log
exec /bin/busybox sleep 100000
"""
MY_APP_UNIT = """[Unit]
Description=My Application
After=network.target

[Service]
Environment="GREETING=hello world" OTHER=1
WorkingDirectory=/tmp
ExecStart=/usr/bin/my-app
Restart=always
RestartSec=0.2

[Install]
WantedBy=multi-user.target
"""
# Installed but not wanted by multi-user.target: must not run.
IDLE_UNIT = """[Service]
ExecStart=/bin/sh -c 'echo ran > /run/idle.log'

[Install]
WantedBy=other.target
"""
# Restart=on-failure: fails twice, then exits 0 and stays down. Also: EnvironmentFile=,
# a `-` prefix, quoting that the shell in ExecStart must get untouched.
FLAKY_UNIT = """[Service]
EnvironmentFile=/etc/flaky.env
EnvironmentFile=-/etc/missing.env
Environment=NAME=flaky
ExecStart=/bin/sh -c 'echo "run $NAME $FROM_FILE $$" >> /run/flaky.log; \\
  [ $(/bin/busybox wc -l < /run/flaky.log) -ge 3 ]'
Restart=on-failure
RestartSec=100ms

[Install]
WantedBy=default.target multi-user.target
"""
FLAKY_ENV = '# comment\nFROM_FILE="from file"\n'
# Enabled by a multi-user.target.wants link, no [Install]; `-` prefix on ExecStart.
LINKED_UNIT = """[Service]
ExecStart=-/bin/sh -c "echo linked > /run/linked.log"
"""
TEMPLATE_UNIT = """[Service]
ExecStart=/bin/sh -c "echo template > /run/template.log"

[Install]
WantedBy=multi-user.target
"""
FAKE_SYSTEMD = """#!/bin/busybox sh
echo "fake-systemd: running as pid $$"
echo $$ > /run/fake-systemd.pid
exec /bin/busybox sleep 100000
"""


def host_tsc_khz() -> int:
    """The TSC frequency the guest must be told (QEMU-HERE.md: TCG calibration hangs)."""
    text = Path("/proc/cpuinfo").read_text()
    m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)
    assert m, "no cpu MHz in /proc/cpuinfo"
    return round(float(m.group(1)) * 1000)


def mkfs(image: Path, label: str, size: str, content: Path | None = None) -> None:
    argv = ["mkfs.ext4", "-q", "-F", "-L", label, "-E", "root_owner=0:0"]
    if content is not None:
        argv += ["-d", str(content)]
    subprocess.run([*argv, str(image), size], check=True, capture_output=True)


def make_rootfs(dest: Path, staging: Path, *, systemd: bool = False) -> Path:
    """A minimal image: BusyBox at /bin/busybox (no applet links) + a service; the guest
    files come from install_guest_files, as the rootfs packer does it."""
    (staging / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", staging / "bin" / "busybox")
    (staging / "bin" / "sh").symlink_to("busybox")
    (staging / "usr" / "bin").mkdir(parents=True)
    app = staging / "usr" / "bin" / "my-app"
    app.write_text(MY_APP)
    app.chmod(0o755)
    units = staging / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    (units / "my-app.service").write_text(MY_APP_UNIT)
    (units / "idle.service").write_text(IDLE_UNIT)
    (units / "flaky.service").write_text(FLAKY_UNIT)
    (staging / "etc" / "flaky.env").write_text(FLAKY_ENV)
    (units / "linked.service").write_text(LINKED_UNIT)
    (units / "multi-user.target.wants").mkdir()
    (units / "multi-user.target.wants" / "linked.service").symlink_to("../linked.service")
    (units / "tmpl@.service").write_text(TEMPLATE_UNIT)
    if systemd:
        sd = staging / "lib" / "systemd" / "systemd"
        sd.parent.mkdir(parents=True)
        sd.write_text(FAKE_SYSTEMD)
        sd.chmod(0o755)
    install_guest_files(staging)
    mkfs(dest, "mvm-root", "64M", staging)
    return dest


def make_secrets(dest: Path, staging: Path, secrets: dict[str, object]) -> Path:
    staging.mkdir(parents=True, exist_ok=True)
    f = staging / "secrets.json"
    if f.exists():
        f.chmod(0o600)
    f.write_text(json.dumps(secrets))
    f.chmod(0o400)
    mkfs(dest, "mvm-secrets", "2M", staging)
    return dest


class Guest:
    """One QEMU microVM, driven the way the tests need (not mvm's runtime)."""

    def __init__(self, kernel: KernelInfo, workdir: Path, disks: list[tuple[Path, bool]],
                 append: str = "") -> None:
        self.kernel = kernel
        self.dir = workdir
        self.disks = disks  # (image, read-only), in device order: root first
        self.append = append
        self.proc: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self.agent = GuestAgentClient(self.dir / "agent-0.sock")

    @property
    def console_log(self) -> Path:
        return self.dir / f"console-{self.generation}.log"

    @property
    def qmp_path(self) -> Path:
        return self.dir / f"qmp-{self.generation}.sock"

    def argv(self, incoming: str | None = None) -> list[str]:
        cmdline = (
            f"console=ttyS0,115200 root=/dev/vda ro tsc_early_khz={host_tsc_khz()} quiet "
            "pci=off cryptomgr.notests i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd "
            "8250.nr_uarts=1 init_on_alloc=0 random.trust_cpu=on "
            "ip=10.0.2.15::10.0.2.2:255.255.255.0:guest1:eth0:off " + self.append)
        argv = [
            "qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-cpu", "qemu64,+arat",
            "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot",
            "-kernel", str(self.kernel.vmlinux), "-initrd", str(self.kernel.initrd),
            "-append", cmdline,
        ]
        for n, (image, ro) in enumerate(self.disks):
            ro_opt = ",readonly=on" if ro else ""
            argv += ["-drive", f"file={image},if=none,id=d{n},format=raw{ro_opt}",
                     "-device", f"virtio-blk-device,drive=d{n}"]
        argv += [
            "-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0",
            "-chardev", f"socket,id=agent,path={self.agent.socket_path},server=on,wait=off",
            "-device", "virtio-serial-device",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
            "-serial", f"file:{self.console_log}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if incoming:
            argv += ["-S", "-incoming", incoming]
        return argv

    def start(self, incoming: str | None = None) -> float:
        """Start QEMU; return seconds until the agent answered."""
        started = time.monotonic()
        self.proc = subprocess.Popen(self.argv(incoming), stdin=subprocess.DEVNULL)
        if incoming:
            self.qmp("migrate-incoming-wait")
            self.qmp("cont")
        try:
            self.agent.wait_ready(BOOT_TIMEOUT)
        except GuestError as e:
            raise AssertionError(f"{e}\nconsole:\n{self.console()}") from e
        return time.monotonic() - started

    def console(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def sh(self, script: str, timeout: float = 20) -> str:
        """Run a shell snippet with the image's /bin/sh; fail on a non-zero exit."""
        r = self.agent.exec(["sh", "-c", script], timeout)
        assert r.exit_code == 0, (script, r)
        return r.stdout.decode()

    def qmp(self, command: str, **arguments: object) -> object:
        """One QMP command on a fresh connection (raw QMP: QEMU ends messages with \\n)."""
        if command == "migrate-incoming-wait":
            return self._wait_qmp_status("query-migrate", {"completed"}, {"failed"})
        with contextlib.closing(self._qmp_connect()) as s, s.makefile("rwb") as f:
            f.readline()  # greeting
            for cmd, args in (("qmp_capabilities", {}), (command, arguments)):
                f.write(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
                f.flush()
                while True:
                    msg = json.loads(f.readline())
                    if "event" in msg:
                        continue
                    if "error" in msg:
                        raise AssertionError(f"QMP {cmd}: {msg['error']}")
                    break
            return msg.get("return")

    def _qmp_connect(self) -> socket.socket:
        deadline = time.monotonic() + 10
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            try:
                s.connect(str(self.qmp_path))
                return s
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _wait_qmp_status(self, query: str, done: set[str], failed: set[str]) -> object:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = self.qmp(query)
            status = r.get("status") if isinstance(r, dict) else None
            if status in done:
                return r
            if status in failed:
                raise AssertionError(f"{query}: {r}")
            time.sleep(0.02)
        raise AssertionError(f"{query}: not {done} after 60 s")

    def snapshot(self, state_file: Path) -> None:
        """Pause, save RAM + devices to a file, and end this QEMU (QEMU-HERE.md)."""
        self.qmp("stop")
        self.qmp("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
        self.qmp("migrate", uri=f"exec:cat > {state_file}")
        self._wait_qmp_status("query-migrate", {"completed"}, {"failed", "cancelled"})
        self.kill()

    def restore(self, state_file: Path) -> float:
        self.generation += 1
        self.agent.close()
        self.agent = GuestAgentClient(self.dir / f"agent-{self.generation}.sock")
        return self.start(incoming=f"exec:cat {state_file}")

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.agent.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def wait_for(fn, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def guest(kernel: KernelInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    d = tmp_path_factory.mktemp("guest")
    root = make_rootfs(d / "root.ext4", d / "root-staging")
    data = d / "data.ext4"
    mkfs(data, "mvm-data", "64M")
    secrets = make_secrets(d / "secrets.ext4", d / "secrets-staging", SECRETS)
    g = Guest(kernel, d, [(root, True), (data, False), (secrets, True)])
    g.start()
    yield g
    g.kill()


# ---------------------------------------------------------------------------- tests


def test_kernel_install_is_reproducible_and_idempotent(kernel: KernelInfo,
                                                       tmp_path: Path) -> None:
    manifest = json.loads(kernel.manifest.read_text())
    assert manifest["package"].startswith("linux-image-")
    assert manifest["kernel_version"] == kernel.kernel_version
    assert kernel.vmlinux.read_bytes()[:4] == b"\x7fELF"
    assert hashlib.sha256(kernel.initrd.read_bytes()).hexdigest() == kernel.initrd_sha256
    assert {"virtio_blk", "virtio_net", "virtio_console", "virtio_mmio"} <= set(kernel.modules)
    mtime = kernel.initrd.stat().st_mtime_ns
    again = install_default_kernel(kernel.dir)  # current: nothing is rebuilt
    assert again == kernel and kernel.initrd.stat().st_mtime_ns == mtime
    other = install_default_kernel(tmp_path / "k2")  # same inputs, same bytes
    assert (other.vmlinux_sha256, other.initrd_sha256) == (kernel.vmlinux_sha256,
                                                          kernel.initrd_sha256)


def test_boot_marker_on_the_console(guest: Guest) -> None:
    marker = re.compile(
        r"mvm-init: ready in [\d.]+s; services: linked\.service flaky\.service my-app\.service")
    console = wait_for(lambda: marker.search(guest.console()) and guest.console(), 10, "marker")
    assert "ERROR" not in console and "FATAL" not in console, console


def test_exec_stdout_exit_code_stderr(guest: Guest) -> None:
    r = guest.agent.exec(["echo", "hi"], timeout=10)
    assert (r.exit_code, r.stdout, r.stderr, r.timed_out) == (0, b"hi\n", b"", False)
    r = guest.agent.exec(["sh", "-c", "exit 7"], timeout=10)
    assert r.exit_code == 7
    r = guest.agent.exec(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10)
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    r = guest.agent.exec(["no-such-command"], timeout=10)
    assert r.exit_code == 127 and b"not found" in r.stderr
    r = guest.agent.exec(["cat"], timeout=10)  # stdin is /dev/null: returns at once
    assert (r.exit_code, r.stdout) == (0, b"")


def test_exec_arguments_and_output_bytes_survive(guest: Guest) -> None:
    args = ["a b", "", "trailing\n\n", "quote'd \"x\" $HOME `id` *", "é€"]
    r = guest.agent.exec(["printf", "[%s]", *args], timeout=10)
    assert r.stdout == "".join(f"[{a}]" for a in args).encode()
    r = guest.agent.exec(["sh", "-c", "head -c 1000 /dev/urandom | tee /data/x | sha256sum"],
                         timeout=10)
    assert r.exit_code == 0
    back = guest.agent.exec(["cat", "/data/x"], timeout=10).stdout
    assert len(back) == 1000
    assert r.stdout.split()[0].decode() == hashlib.sha256(back).hexdigest()
    big = guest.agent.exec(["head", "-c", "2000000", "/dev/urandom"], timeout=30).stdout
    assert len(big) == 2_000_000
    # every byte but NUL, in short arguments (decoded by awk) and a long one (by base64)
    short = [bytes(range(1, 120)), bytes(range(120, 256))]
    long = bytes(range(1, 256)) * 400
    r = guest.agent.exec([b"printf", b"%s|", *short, long], timeout=30)
    assert r.stdout == b"|".join([*short, long]) + b"|"


def test_exec_output_is_cut_at_the_limit_and_says_so(guest: Guest) -> None:
    script = "head -c 3000 /dev/zero | tr '\\0' o; head -c 5 /dev/zero | tr '\\0' e >&2"
    r = guest.agent.exec(["sh", "-c", script], timeout=20, output_limit=1000)
    assert (r.stdout, r.stderr, r.truncated, r.exit_code) == (b"o" * 1000, b"e" * 5, {"stdout": 3000}, 0)
    r = guest.agent.exec(["sh", "-c", script], timeout=20, output_limit=0)
    assert (r.stdout, r.stderr, r.truncated) == (b"", b"", {"stdout": 3000, "stderr": 5})
    # a limit is for one exec: the next one gets the default
    r = guest.agent.exec(["sh", "-c", script], timeout=20)
    assert (len(r.stdout), r.truncated) == (3000, {})


def test_exec_timeout_kills_the_whole_tree(guest: Guest) -> None:
    started = time.monotonic()
    r = guest.agent.exec(["sh", "-c", "sleep 300 & echo started; sleep 301"], timeout=1.5)
    took = time.monotonic() - started
    assert r.timed_out and r.exit_code == 124 and r.stdout == b"started\n"
    assert 1.4 < took < 6
    ps = guest.sh("ps -o args")
    assert "sleep 300" not in ps and "sleep 301" not in ps
    assert guest.agent.exec(["true"], timeout=5).ok  # the agent carries on


def test_a_torn_request_never_runs(guest: Guest) -> None:
    """A host that dies mid-line leaves half a request; it must not run, even glued to
    the next connection's first line."""
    guest.agent.close()
    torn = proto.exec_request("t0rn", 10, ["sh", "-c", "touch /tmp/torn"])
    for _ in range(2):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(guest.agent.socket_path))
            s.sendall(torn.encode())  # no newline: the host "died" here
    assert guest.agent.exec(["echo", "next"], timeout=10).stdout == b"next\n"
    assert guest.agent.exec(["test", "-e", "/tmp/torn"], timeout=10).exit_code == 1


def test_unknown_verb_is_refused(guest: Guest) -> None:
    with pytest.raises(GuestError, match="unknown verb: frobnicate"):
        guest.agent._request("frobnicate", ["x"], 10)
    assert guest.agent.ping() < 5


def test_mounts_root_ro_data_rw_secrets_ro(guest: Guest) -> None:
    mounts = {f[1]: f for f in (ln.split() for ln in guest.sh("cat /proc/mounts").splitlines())}
    assert mounts["/"][2] == "ext4" and mounts["/"][3].startswith("ro")
    assert mounts["/data"][2] == "ext4" and mounts["/data"][3].startswith("rw")
    assert mounts["/run/secrets"][3].startswith("ro")
    for tmpfs in ("/run", "/tmp", "/dev/shm"):
        assert mounts[tmpfs][2] == "tmpfs"
    assert {"/proc", "/sys", "/dev", "/dev/pts"} <= set(mounts)
    assert guest.agent.exec(["touch", "/etc/x"], timeout=10).exit_code != 0
    assert guest.sh("echo kept > /data/kept && cat /data/kept") == "kept\n"
    assert json.loads(guest.sh("cat /run/secrets/secrets.json")) == SECRETS
    assert guest.sh("stat -c '%a %u' /run/secrets/secrets.json") == "400 0\n"


def test_network_and_hostname_from_the_command_line(guest: Guest) -> None:
    addr = guest.sh("ip addr show dev eth0")
    assert "inet 10.0.2.15/24" in addr and "UP" in addr
    assert "default via 10.0.2.2 dev eth0" in guest.sh("ip route")
    assert guest.sh("hostname") == "guest1\n"


def test_wanted_service_runs_with_its_environment_and_restarts(guest: Guest) -> None:
    log = wait_for(lambda: guest.sh("cat /run/my-app.log 2>/dev/null || true"), 20, "my-app")
    first = log.splitlines()[0].split()
    assert first[2:] == ["GREETING=hello", "world", "OTHER=1", "cwd=/tmp"], log
    assert guest.agent.exec(["test", "-e", "/run/idle.log"], timeout=5).exit_code == 1
    guest.sh(f"kill {first[1]}")
    log = wait_for(lambda: (lambda s: s if len(s.splitlines()) >= 2 else "")(
        guest.sh("cat /run/my-app.log")), 20, "my-app restart")
    second = log.splitlines()[1].split()
    assert second[1] != first[1]
    assert "my-app.service exited" in guest.console()


def test_unit_file_semantics(guest: Guest) -> None:
    runs = wait_for(lambda: (lambda s: s if len(s.splitlines()) >= 3 else "")(
        guest.sh("cat /run/flaky.log 2>/dev/null || true")), 20, "flaky to succeed")
    lines = runs.splitlines()
    assert [ln.rsplit(" ", 1)[0] for ln in lines] == ["run flaky from file"] * 3
    assert len({ln.rsplit(" ", 1)[1] for ln in lines}) == 3  # three processes
    wait_for(lambda: "flaky.service exited (0)" in guest.console(), 10, "flaky to stop")
    time.sleep(0.5)
    assert len(guest.sh("cat /run/flaky.log").splitlines()) == 3  # not restarted after 0
    assert guest.sh("cat /run/linked.log") == "linked\n"
    assert guest.agent.exec(["test", "-e", "/run/template.log"], timeout=5).exit_code == 1


def test_pid1_reaps_orphans(guest: Guest) -> None:
    guest.sh("for i in 1 2 3; do sh -c 'sleep 0.1 &'; done; sleep 0.5")
    stats = guest.sh("ps -o stat,args").splitlines()[1:]
    assert not [s for s in stats if s.startswith("Z")], stats


def test_agent_survives_host_reconnects(guest: Guest) -> None:
    for _ in range(3):
        guest.agent.close()
        assert guest.agent.exec(["echo", "again"], timeout=10).stdout == b"again\n"
    # A second client while the first is idle-connected: QEMU serves one at a time, so
    # hand over by closing the first.
    guest.agent.close()
    with GuestAgentClient(guest.agent.socket_path) as other:
        other.wait_ready(10)


@pytest.fixture
def restorable(kernel: KernelInfo, tmp_path: Path) -> Iterator[Guest]:
    root = make_rootfs(tmp_path / "root.ext4", tmp_path / "root-staging")
    data = tmp_path / "data.ext4"
    mkfs(data, "mvm-data", "64M")
    secrets = make_secrets(tmp_path / "secrets.ext4", tmp_path / "secrets-staging", SECRETS)
    g = Guest(kernel, tmp_path, [(root, True), (data, False), (secrets, True)])
    yield g
    g.kill()


def test_sleep_prep_snapshot_restore_wake(restorable: Guest, tmp_path: Path) -> None:
    g = restorable
    g.start()
    g.sh("echo before > /data/state")
    g.agent.sleep_prep()
    assert "/run/secrets" in g.sh("cat /proc/mounts")  # stays: re-delivered identical
    g.snapshot(tmp_path / "vm.state")
    # While it sleeps, the tenant's secrets change and are re-delivered on the same disk.
    time.sleep(2)
    make_secrets(tmp_path / "secrets.ext4", tmp_path / "secrets-staging", {"rotated": True})

    took = g.restore(tmp_path / "vm.state")
    assert took < 30
    skew = int(g.sh("date +%s")) - time.time()
    assert skew < -1.5, "the guest clock should be behind after a restore"
    g.agent.wake(fresh_secrets=True)
    assert abs(int(g.sh("date +%s")) - time.time()) <= 1.5
    assert json.loads(g.sh("cat /run/secrets/secrets.json")) == {"rotated": True}
    assert g.sh("cat /data/state") == "before\n"
    assert g.agent.exec(["echo", "hi"], timeout=10).stdout == b"hi\n"

    # Graceful stop: BusyBox poweroff signals our PID 1, which stops services and powers
    # off; the agent may be gone before its answer is out.
    with contextlib.suppress(GuestError):
        g.agent.exec(["poweroff"], timeout=10)
    assert g.wait_exit(30) == 0
    assert "mvm-init: shutting down (poweroff)" in g.console()


def test_hands_over_to_systemd_when_the_image_has_it(kernel: KernelInfo,
                                                      tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "root.ext4", tmp_path / "staging", systemd=True)
    g = Guest(kernel, tmp_path, [(root, True)])
    try:
        g.start()
        assert g.sh("cat /run/fake-systemd.pid") == "1\n"
        assert "handing over to /lib/systemd/systemd" in g.console()
        # services are systemd's business now; our init did not start them
        assert g.agent.exec(["test", "-e", "/run/my-app.log"], timeout=5).exit_code == 1
        assert g.agent.exec(["echo", "hi"], timeout=5).stdout == b"hi\n"
        # no data or secrets disk: nothing mounted, no complaint
        assert "/data" not in g.sh("cat /proc/mounts")
    finally:
        g.kill()


def test_missing_guest_files_fail_loudly(kernel: KernelInfo, tmp_path: Path) -> None:
    staging = tmp_path / "bare"
    (staging / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", staging / "bin" / "busybox")
    mkfs(tmp_path / "bare.ext4", "mvm-root", "16M", staging)
    g = Guest(kernel, tmp_path, [(tmp_path / "bare.ext4", True)])
    g.proc = subprocess.Popen(g.argv(), stdin=subprocess.DEVNULL)
    try:
        assert g.wait_exit(BOOT_TIMEOUT) == 0  # powered off instead of hanging
    finally:
        g.kill()
    console = g.console()
    assert "mvm-initrd: FATAL: the root image has no /mvm/init" in console, console
