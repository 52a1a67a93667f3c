"""A DOUBLE of Firecracker's REST API (not Firecracker): strict about what Firecracker refuses.

Run it as Firecracker is run: `python -m tests.doubles.firecracker_api --api-sock PATH [--id ID]`
(from the repository root). It serves HTTP/1.1 on that Unix socket and answers as Firecracker
1.17's API does (written from its published OpenAPI description and its docs, no code of it):

- bodies are checked against the schemas below (unknown and missing fields, types, enums:
  400 with `{"fault_message": ...}`); a test checks these schemas against the published
  spec where it is at hand;
- pre-boot resources (boot-source, machine-config, drives and network-interfaces PUT, vsock,
  InstanceStart, snapshot/load, ...) are refused once the microVM started or was loaded, and
  PATCH /vm, PATCH of drives and network interfaces, SendCtrlAltDel and snapshot/create before;
  a second root drive, a MAC or TAP already in use, snapshot/create of a VM that is not paused,
  snapshot/load after anything but logger and metrics was configured, and `mem_backend` with
  `mem_file_path` (or neither) are refused; pause and resume are idempotent.
- Files are opened when Firecracker opens them: the kernel, initrd and drives at their PUT,
  the snapshot and memory files at load. The kernel must be an ELF64 (checked at InstanceStart;
  the double boots nothing). TAPs are not opened (the double runs unprivileged).

Its "VM" is a fake guest (no kernel runs): once started (or loaded and resumed) it writes a
few console lines on stdout (Firecracker's serial console) and serves a guest agent on vsock
port 1024 through the vsock Unix socket (`uds_path`), after Firecracker's host-initiated
handshake `CONNECT <port>\\n` -> `OK <host port>\\n`. The agent speaks mvm's line protocol
(ping, exec, sleep-prep, wake, output-limit) — a VM with an `output` drive is a builder
instead: it writes FAKE-BUILD-OUTPUT there and powers off; its exec verbs are those of
tests/doubles/fake_runtime.py's guest: `write X` keeps X in memory, `sync` moves memory to the
data disk (a file beside the `data` drive), `read` prints disk then memory. Memory lives in
the process and in the snapshot's memory file (its first bytes; the file has the VM's size),
which a loaded VM keeps open for its life: a memory file cut short under it kills it, as the
SIGBUS of Firecracker's private mapping would. SendCtrlAltDel makes the guest sync and
power off: the process ends.

Test seams (environment): `FC_DOUBLE_REFUSE="PUT /snapshot/create,PATCH /vm"` answers those
requests 400 with an injected fault; `FC_DOUBLE_CRASH_ON="PUT /actions"` makes the process die
(exit 70) on receiving such a request, without answering.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from tests.doubles import agent_protocol

VERSION = "1.17.0-dev"
APP_NAME = "Firecracker"
AGENT_PORT = 1024
NOT_STARTED, RUNNING, PAUSED = "Not started", "Running", "Paused"
POST_BOOT = "The requested operation is not supported after starting the microVM."
PRE_BOOT = "The requested operation is not supported before starting the microVM."
LOAD_NOT_ALLOWED = "Loading a microVM snapshot not allowed after configuring boot-specific resources."
DESERIALIZE = "An error occurred when deserializing the json body of a request: "

# -- schemas (Swagger 2.0 definitions, hand-declared: name -> (required, {field: type})) ------
# A type is "string", "integer", "boolean", "object", a definition name, ["array", item type],
# or ("enum", values).
Schema = tuple[tuple[str, ...], dict[str, Any]]
TOKEN_BUCKET: Schema = (("size", "refill_time"), {
    "size": "integer", "one_time_burst": "integer", "refill_time": "integer"})
RATE_LIMITER: Schema = ((), {"bandwidth": "TokenBucket", "ops": "TokenBucket"})
SCHEMAS: dict[str, Schema] = {
    "TokenBucket": TOKEN_BUCKET,
    "RateLimiter": RATE_LIMITER,
    "BootSource": (("kernel_image_path",), {
        "kernel_image_path": "string", "initrd_path": "string", "boot_args": "string"}),
    "MachineConfiguration": (("vcpu_count", "mem_size_mib"), {
        "vcpu_count": "integer", "mem_size_mib": "integer", "smt": "boolean",
        "track_dirty_pages": "boolean", "cpu_template": "object",
        "huge_pages": ("enum", ("None", "Transparent", "2M"))}),
    "Drive": (("drive_id", "is_root_device"), {
        "drive_id": "string", "partuuid": "string", "is_root_device": "boolean",
        "cache_type": ("enum", ("Unsafe", "Writeback")), "is_read_only": "boolean",
        "path_on_host": "string", "rate_limiter": "RateLimiter",
        "io_engine": ("enum", ("Sync", "Async")), "socket": "string"}),
    "PartialDrive": (("drive_id",), {
        "drive_id": "string", "path_on_host": "string", "rate_limiter": "RateLimiter"}),
    "NetworkInterface": (("iface_id", "host_dev_name"), {
        "iface_id": "string", "guest_mac": "string", "host_dev_name": "string", "mtu": "integer",
        "rx_rate_limiter": "RateLimiter", "tx_rate_limiter": "RateLimiter"}),
    "PartialNetworkInterface": (("iface_id",), {
        "iface_id": "string", "rx_rate_limiter": "RateLimiter", "tx_rate_limiter": "RateLimiter"}),
    "Vsock": (("guest_cid", "uds_path"), {
        "guest_cid": "integer", "uds_path": "string", "vsock_id": "string"}),
    "SerialDevice": ((), {"serial_out_path": "string", "rate_limiter": "TokenBucket"}),
    "InstanceActionInfo": (("action_type",), {
        "action_type": ("enum", ("FlushMetrics", "InstanceStart", "SendCtrlAltDel"))}),
    "Vm": (("state",), {"state": ("enum", ("Paused", "Resumed"))}),
    "Logger": ((), {"level": ("enum", ("Error", "Warning", "Info", "Debug", "Trace", "Off")),
                    "log_path": "string", "show_level": "boolean", "show_log_origin": "boolean",
                    "module": "string"}),
    "Metrics": (("metrics_path",), {"metrics_path": "string", "emit_id": "boolean",
                                    "properties": "object"}),
    "SnapshotCreateParams": (("mem_file_path", "snapshot_path"), {
        "mem_file_path": "string", "snapshot_path": "string",
        "snapshot_type": ("enum", ("Full", "Diff"))}),
    "MemoryBackend": (("backend_type", "backend_path"), {
        "backend_type": ("enum", ("File", "Uffd")), "backend_path": "string"}),
    "NetworkOverride": (("iface_id", "host_dev_name"), {
        "iface_id": "string", "host_dev_name": "string"}),
    "VsockOverride": (("uds_path",), {"uds_path": "string"}),
    "SnapshotLoadParams": (("snapshot_path",), {
        "enable_diff_snapshots": "boolean", "track_dirty_pages": "boolean",
        "mem_file_path": "string", "mem_backend": "MemoryBackend", "snapshot_path": "string",
        "resume_vm": "boolean", "network_overrides": ["array", "NetworkOverride"],
        "vsock_override": "VsockOverride", "clock_realtime": "boolean",
        "huge_pages": ("enum", ("Snapshot", "None", "Transparent", "2M"))}),
}


class Fault(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, str):
        return f"string {json.dumps(value)}"
    return {list: "a sequence", dict: "a map", type(None): "null"}.get(type(value), "a value")


def validate(schema: str, body: object) -> None:
    """Refuse a body as Firecracker's deserializer does (unknown fields are denied)."""
    required, props = SCHEMAS[schema]
    if not isinstance(body, dict):
        raise Fault(DESERIALIZE + f"invalid type: {_type_name(body)}, expected struct {schema}")
    for key in body:
        if key not in props:
            expected = ", ".join(f"`{k}`" for k in props)
            raise Fault(DESERIALIZE + f"unknown field `{key}`, expected one of {expected}")
    for key in required:
        if key not in body:
            raise Fault(DESERIALIZE + f"missing field `{key}`")
    for key, value in body.items():
        _check_type(props[key], value, key)


def _check_type(kind: Any, value: object, key: str) -> None:
    if isinstance(kind, tuple):
        if value not in kind[1]:
            variants = ", ".join(f"`{v}`" for v in kind[1])
            raise Fault(DESERIALIZE + f"unknown variant `{value}`, expected one of {variants}")
    elif isinstance(kind, list):
        if not isinstance(value, list):
            raise Fault(DESERIALIZE + f"invalid type: {_type_name(value)}, expected a sequence")
        for item in value:
            _check_type(kind[1], item, key)
    elif kind == "string":
        if not isinstance(value, str):
            raise Fault(DESERIALIZE + f"invalid type: {_type_name(value)}, expected a string")
    elif kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise Fault(DESERIALIZE + f"invalid type: {_type_name(value)}, expected u64")
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise Fault(DESERIALIZE + f"invalid type: {_type_name(value)}, expected a boolean")
    elif kind == "object":
        if not isinstance(value, dict):
            raise Fault(DESERIALIZE + f"invalid type: {_type_name(value)}, expected a map")
    else:
        validate(kind, value)


def _is_elf64(path: Path) -> str | None:
    """Why Firecracker's x86-64 ELF loader would refuse the kernel, or None."""
    try:
        from mvm.image.outputs import check_firecracker_kernel
    except ImportError:
        check_firecracker_kernel = None
    if check_firecracker_kernel is not None:
        try:
            check_firecracker_kernel(path)
        except Exception as e:
            return str(e)
        return None
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF" or head[4] != 2:
        return "Kernel Loader: failed to load ELF kernel image (not an ELF64 file)"
    if int.from_bytes(head[18:20], "little") != 62:
        return "Kernel Loader: failed to load ELF kernel image (not x86-64)"
    return None


# -- the fake guest ------------------------------------------------------------------------------

class Guest:
    """What runs "inside": memory (lines not yet synced), a data disk file, a vsock agent."""

    def __init__(self, vmm: Vmm, memory: list[str]) -> None:
        self.vmm = vmm
        self.memory = memory
        self.output_limit = 16 << 20

    def disk(self) -> Path | None:
        data = self.vmm.drives.get("data")
        return Path(data["path_on_host"] + ".fake-content") if data else None

    def sync(self) -> None:
        disk = self.disk()
        if disk is not None and self.memory:
            with open(disk, "a") as f:
                f.writelines(f"{line}\n" for line in self.memory)
        self.memory = []

    def answer(self, rid: str, verb: str, args: list[str]) -> str:
        if verb == "ping":
            return f"{rid} ok {args[0] if args else ''}".rstrip()
        if verb in ("sleep-prep",):
            self.sync()
            return f"{rid} ok"
        if verb in ("wake", "output-limit"):
            return f"{rid} ok"
        if verb == "exec":
            argv = [base64.b64decode(a).decode() if a != "-" else "" for a in args[1:]]
            cmd, rest = (argv[0], argv[1:]) if argv else ("", [])
            out = ""
            if cmd == "write":
                self.memory.extend(rest)
            elif cmd == "sync":
                self.sync()
            elif cmd == "read":
                disk = self.disk()
                out = (disk.read_text() if disk is not None and disk.exists() else "")
                out += "".join(f"{x}\n" for x in self.memory)
            else:
                err = base64.b64encode(f"fake guest: no {cmd}\n".encode()).decode()
                return f"{rid} ok 127 - {err}"
            enc = base64.b64encode(out.encode()).decode() if out else "-"
            return f"{rid} ok 0 {enc} -"
        msg = base64.b64encode(f"unknown verb: {verb}".encode()).decode()
        return f"{rid} err {msg}"


class Vsock:
    """The vsock device's host side: a Unix socket where the host opens guest ports."""

    def __init__(self, vmm: Vmm, uds_path: str) -> None:
        self.vmm = vmm
        self.path = uds_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(uds_path)
        except OSError as e:
            self.sock.close()
            raise Fault(f"Cannot create backend for vsock device: UnixBind({e})") from e
        self.sock.listen(16)
        self.next_port = 1 << 30
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            f = conn.makefile("rwb", buffering=0)
            line = f.readline(64)
            parts = line.decode(errors="replace").split()
            if len(parts) != 2 or parts[0] != "CONNECT" or not parts[1].isdigit():
                return  # Firecracker drops a connection whose first line is not CONNECT <port>
            if int(parts[1]) != AGENT_PORT:
                return  # nothing listens on that guest port: the guest resets it
            self.vmm.wait_running()  # the guest accepts only while its vCPUs run
            self.next_port += 1
            conn.sendall(f"OK {self.next_port}\n".encode())
            for raw in agent_protocol.lines(conn):
                if b"\x01" in raw or not raw.strip():
                    continue
                rid, verb, *args = raw.decode(errors="replace").split(" ")
                self.vmm.wait_running()
                with self.vmm.lock:
                    assert self.vmm.guest is not None
                    out = self.vmm.guest.answer(rid, verb, args)
                conn.sendall(out.encode() + b"\n")

    def close(self) -> None:
        self.sock.close()


# -- the VMM -------------------------------------------------------------------------------------

class Vmm:
    def __init__(self, instance_id: str) -> None:
        self.id = instance_id
        self.state = NOT_STARTED
        self.configured = False  # anything but logger/metrics
        self.machine: dict[str, Any] = {"vcpu_count": 1, "mem_size_mib": 128, "smt": False,
                                        "track_dirty_pages": False, "huge_pages": "None"}
        self.boot: dict[str, Any] | None = None
        self.drives: dict[str, dict[str, Any]] = {}
        self.ifaces: dict[str, dict[str, Any]] = {}
        self.vsock: dict[str, Any] | None = None
        self.vsock_dev: Vsock | None = None
        self.guest: Guest | None = None
        self.lock = threading.RLock()
        self.running = threading.Condition(self.lock)
        self.mem_fd: int | None = None
        self.serial: Any = None

    # the console (Firecracker: the guest's serial port on its stdout)
    def console(self, text: str) -> None:
        out = self.serial or sys.stdout
        out.write(text + "\n")
        out.flush()

    def wait_running(self) -> None:
        with self.running:
            self.running.wait_for(lambda: self.state == RUNNING)

    def set_state(self, state: str) -> None:
        with self.running:
            self.state = state
            self.running.notify_all()

    def started(self) -> bool:
        return self.state != NOT_STARTED

    def pre_boot(self) -> None:
        if self.started():
            raise Fault(POST_BOOT)

    def post_boot(self) -> None:
        if not self.started():
            raise Fault(PRE_BOOT)

    # -- routes
    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        route = "/" + "/".join(parts[:1])
        with self.lock:
            if method == "GET":
                if path == "/":
                    return 200, {"id": self.id, "state": self.state, "vmm_version": VERSION,
                                 "app_name": APP_NAME}
                if path == "/version":
                    return 200, {"firecracker_version": VERSION}
                if path == "/machine-config":
                    return 200, dict(self.machine)
                if path == "/vm/config":
                    return 200, {"boot-source": self.boot, "machine-config": self.machine,
                                 "drives": list(self.drives.values()),
                                 "network-interfaces": list(self.ifaces.values()),
                                 "vsock": self.vsock}
            elif method == "PUT":
                if path in ("/logger", "/metrics"):
                    validate("Logger" if path == "/logger" else "Metrics", body)
                    return 204, None
                if path == "/boot-source":
                    return self.put_boot_source(body)
                if path == "/machine-config":
                    return self.put_machine(body, patch=False)
                if route == "/drives" and len(parts) == 2:
                    return self.put_drive(parts[1], body)
                if route == "/network-interfaces" and len(parts) == 2:
                    return self.put_iface(parts[1], body)
                if path == "/vsock":
                    return self.put_vsock(body)
                if path == "/actions":
                    return self.action(body)
                if path == "/snapshot/create":
                    return self.snapshot_create(body)
                if path == "/snapshot/load":
                    return self.snapshot_load(body)
                if path == "/serial":
                    return self.put_serial(body)
                if path in ("/balloon", "/entropy", "/mmds/config", "/cpu-config",
                            "/hotplug/memory") or route == "/pmem":
                    self.pre_boot()
                    raise Fault(f"{path} is not implemented by the Firecracker API double")
            elif method == "PATCH":
                if path == "/machine-config":
                    return self.put_machine(body, patch=True)
                if path == "/vm":
                    return self.patch_vm(body)
                if route == "/drives" and len(parts) == 2:
                    return self.patch_drive(parts[1], body)
                if route == "/network-interfaces" and len(parts) == 2:
                    return self.patch_iface(parts[1], body)
        raise Fault(f"Invalid request method and/or path: {method} {path.lstrip('/')}.")

    def put_boot_source(self, body: Any) -> tuple[int, Any]:
        self.pre_boot()
        validate("BootSource", body)
        for key, what in (("kernel_image_path", "kernel"), ("initrd_path", "initrd")):
            if key in body:
                try:
                    open(body[key], "rb").close()
                except OSError as e:
                    raise Fault(f"The {what} file cannot be opened: {e.strerror} "
                                f"(os error {e.errno})") from e
        self.boot = body
        self.configured = True
        return 204, None

    def put_machine(self, body: Any, patch: bool) -> tuple[int, Any]:
        self.pre_boot()
        if patch:
            if not isinstance(body, dict):
                raise Fault(DESERIALIZE + "expected a map")
            merged = {**self.machine, **body}
            validate("MachineConfiguration", merged)
        else:
            validate("MachineConfiguration", body)
            merged = {"smt": False, "track_dirty_pages": False, "huge_pages": "None", **body}
        if not 1 <= merged["vcpu_count"] <= 32:
            raise Fault("The vCPU number is invalid: it should be between 1 and 32.")
        if merged["mem_size_mib"] < 1:
            raise Fault("The memory size (MiB) is invalid.")
        self.machine = merged
        self.configured = True
        return 204, None

    @staticmethod
    def _same_id(path_id: str, body: dict[str, Any], key: str) -> None:
        if body.get(key) != path_id:
            raise Fault(f"The id from the path [{path_id}] does not match the id from the body "
                        f"[{body.get(key)}]!")

    def put_drive(self, drive_id: str, body: Any) -> tuple[int, Any]:
        self.pre_boot()
        validate("Drive", body)
        self._same_id(drive_id, body, "drive_id")
        if body["is_root_device"] and any(d["is_root_device"] for k, d in self.drives.items()
                                          if k != drive_id):
            raise Fault("A root block device already exists!")
        if "path_on_host" not in body and "socket" not in body:
            raise Fault("Unable to create the block device: a path_on_host or a socket is needed")
        try:
            flags = os.O_RDONLY if body.get("is_read_only") else os.O_RDWR
            os.close(os.open(body["path_on_host"], flags))
        except OSError as e:
            raise Fault(f"Unable to create the block device: BackingFile(Os {{ code: {e.errno}, "
                        f"message: {json.dumps(e.strerror)} }}, {json.dumps(body['path_on_host'])})") from e
        self.drives[drive_id] = body
        self.configured = True
        return 204, None

    def patch_drive(self, drive_id: str, body: Any) -> tuple[int, Any]:
        self.post_boot()
        validate("PartialDrive", body)
        self._same_id(drive_id, body, "drive_id")
        if drive_id not in self.drives:
            raise Fault(f"Invalid block device ID: {drive_id}")
        if "path_on_host" in body:
            try:
                open(body["path_on_host"], "rb").close()
            except OSError as e:
                raise Fault(f"Unable to patch the block device: {e.strerror}") from e
            self.drives[drive_id]["path_on_host"] = body["path_on_host"]
        return 204, None

    def put_iface(self, iface_id: str, body: Any) -> tuple[int, Any]:
        self.pre_boot()
        validate("NetworkInterface", body)
        self._same_id(iface_id, body, "iface_id")
        for other_id, other in self.ifaces.items():
            if other_id == iface_id:
                continue
            if body.get("guest_mac") and other.get("guest_mac") == body["guest_mac"]:
                raise Fault(f"The MAC address is already in use: {body['guest_mac']}")
            if other["host_dev_name"] == body["host_dev_name"]:
                raise Fault(f"Could not create the network device: Open tap device failed: "
                            f"Resource busy (tap {body['host_dev_name']} is already in use)")
        self.ifaces[iface_id] = body
        self.configured = True
        return 204, None

    def patch_iface(self, iface_id: str, body: Any) -> tuple[int, Any]:
        self.post_boot()
        validate("PartialNetworkInterface", body)
        self._same_id(iface_id, body, "iface_id")
        if iface_id not in self.ifaces:
            raise Fault(f"Invalid interface ID: {iface_id}")
        return 204, None

    def put_serial(self, body: Any) -> tuple[int, Any]:
        self.pre_boot()
        validate("SerialDevice", body)
        if "serial_out_path" in body:
            try:
                self.serial = open(body["serial_out_path"], "a")  # noqa: SIM115
            except OSError as e:
                raise Fault(f"Cannot open the serial output file: {e}") from e
        self.configured = True
        return 204, None

    def put_vsock(self, body: Any) -> tuple[int, Any]:
        self.pre_boot()
        validate("Vsock", body)
        if body["guest_cid"] < 3:
            raise Fault(f"Invalid guest CID: {body['guest_cid']} (must be 3 or more)")
        self.vsock = body
        self.configured = True
        return 204, None

    def action(self, body: Any) -> tuple[int, Any]:
        validate("InstanceActionInfo", body)
        kind = body["action_type"]
        if kind == "InstanceStart":
            self.pre_boot()
            if self.boot is None:
                raise Fault("Start microvm error: Cannot start microvm without kernel configuration.")
            why = _is_elf64(Path(self.boot["kernel_image_path"]))
            if why:
                raise Fault("Start microvm error: Cannot load kernel due to invalid memory "
                            f"configuration or invalid kernel image: {why}")
            self.start_devices(self.vsock["uds_path"] if self.vsock else None)
            self.guest = Guest(self, [])
            self.console(f"fake guest (Firecracker API double): booting "
                         f"{self.boot['kernel_image_path']} with {self.boot.get('boot_args', '')}")
            self.set_state(RUNNING)
            if "output" in self.drives:
                threading.Thread(target=self.fake_build, daemon=True).start()
            else:
                self.console("fake guest: agent listening on vsock port 1024")
            return 204, None
        if kind == "SendCtrlAltDel":
            self.post_boot()
            if self.state == RUNNING:
                threading.Thread(target=self.power_off, daemon=True).start()
            return 204, None
        return 204, None  # FlushMetrics

    def fake_build(self) -> None:
        """A builder VM's job (a drive `output`): say so on the console, write the output disk,
        power off."""
        self.console("@mvm builder up (fake builder of the Firecracker API double)")
        with open(self.drives["output"]["path_on_host"], "r+b") as f:
            f.write(b"FAKE-BUILD-OUTPUT\n")
        self.console("@mvm done")
        self.power_off()

    def power_off(self) -> None:
        time.sleep(0.05)  # the guest hears the keyboard, syncs and powers off
        with self.lock:
            if self.guest is not None:
                self.guest.sync()
            self.console("reboot: Restarting system")
        exit_vmm(0)

    def start_devices(self, uds_path: str | None) -> None:
        if uds_path is not None:
            self.vsock_dev = Vsock(self, uds_path)

    def patch_vm(self, body: Any) -> tuple[int, Any]:
        self.post_boot()
        validate("Vm", body)
        self.set_state(PAUSED if body["state"] == "Paused" else RUNNING)
        return 204, None

    def snapshot_create(self, body: Any) -> tuple[int, Any]:
        self.post_boot()
        validate("SnapshotCreateParams", body)
        if self.state != PAUSED:
            raise Fault("Create snapshot error: Cannot save the microVM state: the microVM is "
                        "not paused; pause it first (PATCH /vm Paused)")
        if body.get("snapshot_type") == "Diff" and not self.machine.get("track_dirty_pages"):
            raise Fault("Diff snapshots are not allowed on uVMs with dirty page tracking disabled.")
        assert self.guest is not None
        state = {"double": "firecracker_api", "version": VERSION, "machine": self.machine,
                 "boot": self.boot, "drives": self.drives, "ifaces": self.ifaces,
                 "vsock": self.vsock}
        try:
            with open(body["snapshot_path"], "w") as f:
                json.dump(state, f)
            with open(body["mem_file_path"], "wb") as f:
                f.write(json.dumps({"memory": self.guest.memory}).encode() + b"\n")
                f.truncate(self.machine["mem_size_mib"] << 20)  # a file the VM's size (sparse)
        except OSError as e:
            raise Fault(f"Create snapshot error: Cannot write the snapshot: {e}") from e
        return 204, None

    def snapshot_load(self, body: Any) -> tuple[int, Any]:
        if self.started():
            raise Fault(POST_BOOT)
        if self.configured:
            raise Fault(LOAD_NOT_ALLOWED)
        validate("SnapshotLoadParams", body)
        if ("mem_backend" in body) == ("mem_file_path" in body):
            raise Fault("Failed to restore from snapshot: either `mem_backend` or "
                        "`mem_file_path` must be given, and not both")
        if "mem_backend" in body:
            if body["mem_backend"]["backend_type"] != "File":
                raise Fault("the Firecracker API double implements only the File memory backend")
            mem_path = body["mem_backend"]["backend_path"]
        else:
            mem_path = body["mem_file_path"]
        try:
            with open(body["snapshot_path"]) as f:
                state = json.load(f)
        except (OSError, ValueError) as e:
            raise Fault(f"Load snapshot error: Failed to restore from snapshot: Cannot open the "
                        f"snapshot file: {e}") from e
        try:
            mem_fd = os.open(mem_path, os.O_RDONLY)
        except OSError as e:
            raise Fault(f"Load snapshot error: Failed to restore from snapshot: Cannot open the "
                        f"memory file: {e}") from e
        size = os.fstat(mem_fd).st_size
        if size != state["machine"]["mem_size_mib"] << 20:
            os.close(mem_fd)
            raise Fault(f"Load snapshot error: the memory file has {size} bytes, the snapshot's "
                        f"VM {state['machine']['mem_size_mib']} MiB")
        with os.fdopen(os.dup(mem_fd), "rb") as f:
            memory = json.loads(f.readline())["memory"]
        ifaces = state["ifaces"]
        for override in body.get("network_overrides", []):
            if override["iface_id"] not in ifaces:
                os.close(mem_fd)
                raise Fault(f"Load snapshot error: Invalid network override: no interface "
                            f"{override['iface_id']} in the snapshot")
            ifaces[override["iface_id"]]["host_dev_name"] = override["host_dev_name"]
        vsock = state["vsock"]
        if "vsock_override" in body:
            if vsock is None:
                os.close(mem_fd)
                raise Fault("Load snapshot error: vsock_override given but the snapshot has no "
                            "vsock device")
            vsock = {**vsock, "uds_path": body["vsock_override"]["uds_path"]}
        for d in state["drives"].values():
            try:
                open(d["path_on_host"], "rb").close()
            except OSError as e:
                os.close(mem_fd)
                raise Fault(f"Load snapshot error: Failed to restore from snapshot: block "
                            f"device {d['drive_id']}: {e}") from e
        self.machine, self.boot, self.drives = state["machine"], state["boot"], state["drives"]
        self.ifaces, self.vsock = ifaces, vsock
        try:
            self.start_devices(vsock["uds_path"] if vsock else None)
        except Fault:
            os.close(mem_fd)
            raise
        self.mem_fd = mem_fd
        threading.Thread(target=self._watch_memory, args=(mem_fd, size), daemon=True).start()
        self.guest = Guest(self, memory)
        self.set_state(RUNNING if body.get("resume_vm") else PAUSED)
        self.console("fake guest: restored from snapshot")
        return 204, None

    def _watch_memory(self, fd: int, size: int) -> None:
        """A private mapping of a file cut short faults the guest: the VMM dies of SIGBUS."""
        while True:
            time.sleep(0.05)
            if os.fstat(fd).st_size < size:
                sys.stderr.write("memory file changed under the restored VM: SIGBUS\n")
                sys.stderr.flush()
                exit_vmm(128 + signal.SIGBUS)


# -- the HTTP server ----------------------------------------------------------------------------

VMM: Vmm | None = None
API_SOCK: str | None = None


def exit_vmm(code: int) -> None:
    vmm = VMM
    if vmm is not None and vmm.vsock_dev is not None:
        with contextlib.suppress(OSError):
            os.unlink(vmm.vsock_dev.path)
    if API_SOCK is not None:
        with contextlib.suppress(OSError):
            os.unlink(API_SOCK)
    sys.stdout.flush()
    os._exit(code)


def _listed(env: str, method: str, path: str) -> bool:
    return f"{method} {path}" in [x.strip() for x in os.environ.get(env, "").split(",")]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Firecracker API"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        method, path = self.command, self.path.split("?")[0]
        if _listed("FC_DOUBLE_CRASH_ON", method, path):
            sys.stderr.write(f"injected crash on {method} {path} (FC_DOUBLE_CRASH_ON)\n")
            exit_vmm(70)
        assert VMM is not None
        try:
            if _listed("FC_DOUBLE_REFUSE", method, path):
                raise Fault(f"injected refusal of {method} {path} (FC_DOUBLE_REFUSE)")
            body: Any = None
            if method in ("PUT", "PATCH"):
                if not raw:
                    raise Fault("The body of the request is empty.")
                try:
                    body = json.loads(raw)
                except ValueError as e:
                    raise Fault(DESERIALIZE + f"{e}") from e
            status, answer = VMM.handle(method, path, body)
        except Fault as f:
            status, answer = f.status, {"fault_message": f.message}
        data = json.dumps(answer).encode() if answer is not None else b""
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    do_GET = do_PUT = do_PATCH = do_DELETE = do_POST = _serve


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def main(argv: list[str] | None = None) -> int:
    global VMM, API_SOCK
    p = argparse.ArgumentParser(prog="firecracker (API double)")
    p.add_argument("--api-sock", default="/run/firecracker.socket")
    p.add_argument("--id", default="anonymous-instance")
    p.add_argument("--version", action="store_true")
    # Flags of Firecracker's that the double accepts and ignores.
    for flag in ("--level", "--log-path", "--seccomp-filter", "--metrics-path", "--module",
                 "--boot-timer-placeholder", "--http-api-max-payload-size", "--mmds-size-limit"):
        p.add_argument(flag)
    for flag in ("--no-seccomp", "--show-level", "--show-log-origin", "--boot-timer"):
        p.add_argument(flag, action="store_true")
    args = p.parse_args(argv)
    if args.version:
        print(f"Firecracker v{VERSION} (API double)")
        return 0
    if os.path.exists(args.api_sock):
        sys.stderr.write(f"Failed to open the API socket at: {args.api_sock}. Check that it is "
                         "not already used.\n")
        return 1
    VMM = Vmm(args.id)
    API_SOCK = args.api_sock
    server = Server(args.api_sock, Handler)
    signal.signal(signal.SIGTERM, lambda *_: exit_vmm(0))
    server.serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
