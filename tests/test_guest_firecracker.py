"""The guest side of Firecracker, shown with what QEMU offers here (real guests, TCG).

- QEMU's microvm with acpi=off names its virtio-mmio devices on the kernel command line
  (`virtio_mmio.device=`), as Firecracker does. Debian's cloud kernel, mvm's default, is
  built without CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and ignores them: it finds virtio-mmio
  devices only in ACPI tables (QEMU microvm's default; Firecracker >= 1.8 on x86-64). So
  the initrd loads mvm's own mvm_mmio_cmdline module, which registers them: the guest
  boots and its agent answers. When that fails, the initrd says so in one line and powers
  off, instead of waiting for a root disk that never comes.
- The guest agent listens on vsock port 1024 when the guest has vsock: with the loopback
  transport (`mvm.modules=vsock_loopback`), a client inside the guest (the relay's own
  `connect` mode) reaches it on CID 1 and is served the agent's protocol; and mvm's host
  side (GuestAgentClient over VsockChannel) reaches it through a stand-in for Firecracker's
  vsock muxer (CONNECT/OK, then a byte pipe into the guest joined to AF_VSOCK there).
- Firecracker's stop is a Ctrl-Alt-Del on its i8042 (`SendCtrlAltDel`): mvm's init turns it
  into a clean stop (services stopped, disks unmounted) rather than the kernel's immediate
  reboot. QEMU's microvm gets an i8042 here to press the keys on.
"""

from __future__ import annotations

import contextlib
import gzip
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mvm.guest.agent_client import GuestAgentClient
from mvm.guest.channels import VSOCK_AGENT_PORT, VsockChannel
from mvm.image.kernel import KernelInfo, modinfo
from mvm.image.outputs import check_firecracker_kernel
from tests.doubles import agent_protocol as proto
from tests.doubles.agent_protocol import Answer
from tests.doubles.unix_server import UnixServer, read_line
from tests.test_guest_boot import Guest, make_rootfs

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU"),
]


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rootfs")
    return make_rootfs(d / "root.ext4", d / "staging")


class NoAcpiGuest(Guest):
    """QEMU's microvm without ACPI: its devices only on the command line, as Firecracker's."""

    def argv(self, incoming: str | None = None) -> list[str]:
        argv = super().argv(incoming)
        argv[argv.index("microvm")] = "microvm,acpi=off"
        return argv


def test_the_initrd_carries_the_vsock_modules_and_relay(kernel: KernelInfo) -> None:
    assert {"vsock", "vmw_vsock_virtio_transport", "virtio_mmio", "virtio_blk",
            "virtio_net"} <= set(kernel.modules)
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=gzip.decompress(
        kernel.initrd.read_bytes()), capture_output=True, check=True).stdout.decode().split()
    assert "bin/vsock-relay" in listing
    assert f"lib/modules/{kernel.kernel_version}/vsock_loopback.ko" in listing
    # the module mvm builds for command-line virtio-mmio devices, for this very kernel
    mmio = f"lib/modules/{kernel.kernel_version}/mvm_mmio_cmdline.ko"
    assert mmio in listing
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["cpio", "-i", "-d", "--quiet", mmio], cwd=d, check=True,
                       input=gzip.decompress(kernel.initrd.read_bytes()))
        info = modinfo(Path(d) / mmio)
    assert info["license"] == "GPL"
    assert info["vermagic"].split()[0] == kernel.kernel_version
    check_firecracker_kernel(kernel.vmlinux)  # the vmlinux beside it is one Firecracker loads


def test_without_acpi_the_default_kernel_boots_from_the_command_lines_devices(
        kernel: KernelInfo, rootfs: Path, tmp_path: Path) -> None:
    g = NoAcpiGuest(kernel, tmp_path, [(rootfs, True)])
    try:
        g.start()
        console = g.console()
        # QEMU put the devices on the command line only, as Firecracker does ...
        cmdline = g.sh("cat /proc/cmdline")
        assert "virtio_mmio.device=512@0x" in cmdline
        assert "FATAL" not in console, console
        assert g.sh("[ -d /sys/firmware/acpi/tables ] && echo acpi || echo none") == "none\n"
        # ... the initrd's module registered them, and the root disk is /dev/vda on one
        assert g.sh("awk '$2 == \"/\" {print $1}' /proc/mounts").split() == ["/dev/vda"]
        assert g.sh("hostname").strip() == "guest1"
        assert "mvm_mmio_cmdline" in g.sh("cat /proc/modules")
        dmesg = g.sh("dmesg")
        registered = [ln for ln in dmesg.splitlines()
                      if "mvm_mmio_cmdline: registering virtio-mmio." in ln]
        assert len(registered) == cmdline.count("virtio_mmio.device="), dmesg
        # loaded cleanly: an out-of-tree, unsigned module only taints the kernel
        assert "mvm_mmio_cmdline: loading out-of-tree module taints kernel." in dmesg
        assert not [ln for ln in dmesg.splitlines() if "mvm_mmio_cmdline" in ln and
                    ("rejected" in ln or "Unknown symbol" in ln or "disagrees" in ln)], dmesg
    finally:
        g.kill()  # (a guest without ACPI halts on poweroff: QEMU stays until killed)


def test_devices_in_acpi_and_on_the_command_line_are_registered_once(
        kernel: KernelInfo, rootfs: Path, tmp_path: Path) -> None:
    """A VM that announces its devices both ways (ACPI and `virtio_mmio.device=`): the
    module is not loaded, ACPI's devices are the only ones."""
    g = Guest(kernel, tmp_path, [(rootfs, True)],
              append="virtio_mmio.device=512@0xfeb00e00:12")  # QEMU's first device, again
    try:
        g.start()
        assert "mvm_mmio_cmdline" not in g.sh("cat /proc/modules")
        assert g.sh("awk '$2 == \"/\" {print $1}' /proc/mounts").split() == ["/dev/vda"]
    finally:
        g.kill()


def test_without_acpi_and_a_failing_module_the_initrd_says_why(
        kernel: KernelInfo, rootfs: Path, tmp_path: Path) -> None:
    """A command line entry the module refuses: one FATAL line, not a wait for the root."""
    g = NoAcpiGuest(kernel, tmp_path, [(rootfs, True)], append="virtio_mmio.device=bogus")
    g.proc = subprocess.Popen(g.argv(), stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while "mvm-initrd: powering off" not in g.console():
            assert g.proc.poll() is None, g.console()
            assert time.monotonic() < deadline, f"no verdict from the initrd:\n{g.console()}"
            time.sleep(0.2)
        console = g.console()
        fatal = [ln for ln in console.splitlines() if ln.startswith("mvm-initrd: FATAL:")]
        assert len(fatal) == 1, console
        assert ("this kernel ignores virtio_mmio.device= (built without "
                "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES), mvm_mmio_cmdline could not register "
                "them") in fatal[0]
        assert "did not appear" not in console  # not after waiting for the root disk
    finally:
        g.kill()


BRIDGE_PORT = "mvm.test-bridge"


class KeyboardGuest(Guest):
    """QEMU's microvm with an i8042 keyboard controller, as Firecracker has. The kernel
    finds it in the ACPI tables (PNP): no `i8042.nopnp` here. And a second virtio-serial
    port, a byte pipe between the host and a vsock client in the guest (FakeVsockMuxer)."""

    def argv(self, incoming: str | None = None) -> list[str]:
        argv = super().argv(incoming)
        n = argv.index("-append") + 1
        argv[n] = argv[n].replace("i8042.nopnp ", "")
        return [*argv, "-device", "i8042",
                "-chardev", f"socket,id=bridge,path={self.bridge_path},server=on,wait=off",
                "-device", f"virtserialport,chardev=bridge,name={BRIDGE_PORT}"]

    @property
    def bridge_path(self) -> Path:
        return self.dir / "bridge.sock"


class FakeVsockMuxer:
    """A named double of Firecracker's vsock Unix socket, for one guest port: it reads
    `CONNECT <port>`, opens the stream (QEMU's chardev of BRIDGE_PORT, where a client in
    the guest joins it to AF_VSOCK CID 1 <port>), answers `OK <n>` and copies both ways."""

    def __init__(self, path: Path, bridge: Path) -> None:
        self.bridge = bridge
        self.connects: list[bytes] = []
        self._server = UnixServer(path, self._one)

    def _one(self, host: socket.socket) -> None:
        line = read_line(host, 64)
        self.connects.append(line)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as guest:
            guest.connect(str(self.bridge))
            host.sendall(b"OK %d\n" % (1073741824 + self._server.connections))
            copy = threading.Thread(target=_copy, args=(guest, host), daemon=True)
            copy.start()
            _copy(host, guest)
            guest.shutdown(socket.SHUT_RDWR)
            copy.join(10)

    def close(self) -> None:
        self._server.close()


def _copy(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)


@pytest.fixture(scope="module")
def vsock_guest(kernel: KernelInfo, rootfs: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    g = KeyboardGuest(kernel, tmp_path_factory.mktemp("vsock-guest"), [(rootfs, True)],
                      append="mvm.modules=vsock_loopback")
    g.start()
    yield g
    g.kill()


def vsock_exchange(g: Guest, lines: list[str]) -> list[str]:
    """Send lines to the guest agent's vsock port from inside the guest; its answers."""
    text = "\\001\\n" + "".join(f"{ln}\\n" for ln in lines)
    out = g.sh(f"printf '{text}' | /run/mvm/vsock-relay connect 1 {VSOCK_AGENT_PORT}", 60)
    return out.splitlines()


def test_the_agent_answers_on_vsock(vsock_guest: Guest) -> None:
    g = vsock_guest
    answers = vsock_exchange(g, ["p1 ping n1", proto.exec_request(
        "e1", 20, ["sh", "-c", "echo from $(cat /proc/sys/kernel/hostname)"]), "p2 ping n2"])
    assert len(answers) == 4, answers
    assert answers[0] == proto.HELLO
    assert answers[1] == "p1 ok n1"
    e1 = Answer.parse(answers[2])
    assert e1 is not None and (e1.rid, e1.ok, e1.exit_code) == ("e1", True, 0)
    assert (e1.stdout, e1.stderr, e1.flags) == (b"from guest1\n", b"", [])
    assert answers[3] == "p2 ok n2"
    # one connection after another, each host gone right after its requests (it stopped
    # sending while the agent was still at an exec): the next one is served the same
    for n in range(5):
        assert vsock_exchange(g, [proto.exec_request(f"e{n}", 20, ["echo", str(n)]), f"p{n} ping x"]) \
            == [proto.HELLO, proto.exec_ok(f"e{n}", 0, f"{n}\n".encode()), f"p{n} ok x"]
    # the virtio-serial agent is still there beside it
    r = g.agent.exec(["cat", "/proc/sys/kernel/hostname"], 30)
    assert r.ok and r.stdout == b"guest1\n", r
    ps = g.sh("ps -o pid,args")
    assert "/mvm/busybox sh /mvm/agent vsock" in ps
    assert f"/run/mvm/vsock-relay {VSOCK_AGENT_PORT} " in ps


def test_agent_client_over_vsock_channel_reaches_the_guest_agent(vsock_guest: KeyboardGuest,
                                                                 tmp_path: Path) -> None:
    """mvm's host side (GuestAgentClient over VsockChannel: CONNECT/OK, then the agent protocol)
    against the guest's agent on vsock, through a stand-in for Firecracker's muxer."""
    g = vsock_guest
    g.sh(f"""for d in /sys/class/virtio-ports/*; do
               [ "$(cat $d/name)" = {BRIDGE_PORT} ] && port=/dev/${{d##*/}}; done
             setsid sh -c 'while :; do /run/mvm/vsock-relay connect 1 {VSOCK_AGENT_PORT} \
               <>'$port' >&0 2>/dev/null; sleep 0.05; done' </dev/null >/dev/null 2>&1 &""")
    mux = FakeVsockMuxer(tmp_path / "v.sock", g.bridge_path)
    try:
        for _ in range(2):  # a host, then another (each connection is a vsock connection)
            with GuestAgentClient(VsockChannel(tmp_path / "v.sock", VSOCK_AGENT_PORT)) as client:
                client.wait_ready(60)
                r = client.exec(["sh", "-c", "echo $PPID; cat /proc/sys/kernel/hostname"], 30)
                assert r.ok and r.stdout.decode().split("\n")[1] == "guest1", r
                ppid = r.stdout.decode().split("\n")[0]
                # the command ran under the vsock agent, not the virtio-serial one
                assert "/mvm/agent vsock" in g.sh(f"cat /proc/{ppid}/cmdline | tr '\\0' ' '")
        assert mux.connects and set(mux.connects) == {b"CONNECT 1024\n"}
    finally:
        mux.close()


def test_ctrl_alt_del_is_a_clean_stop(vsock_guest: Guest) -> None:
    """(Last here: it ends the module's guest.)"""
    g = vsock_guest
    assert g.sh("cat /proc/sys/kernel/ctrl-alt-del").strip() == "0"
    g.qmp("send-key", keys=[{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")])
    assert g.wait_exit(60) == 0  # the guest rebooted; QEMU runs with -no-reboot
    console = g.console()
    assert "mvm-init: shutting down (reboot)" in console, console
