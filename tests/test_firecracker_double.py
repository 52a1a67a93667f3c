"""The Firecracker API double (tests/doubles/firecracker_api.py) refuses what Firecracker refuses.

Each case runs the double as Firecracker is run (`python -m tests.doubles.firecracker_api
--api-sock PATH`), brings it to a state by the API, sends one request and checks Firecracker's
status code and fault_message. Its schemas are checked against Firecracker's published spec
where it is at hand (../shared/reference/).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO
from tests.doubles import firecracker_api as double

SPEC = REPO.parent / "shared" / "reference" / "firecracker-api-1.17.0-dev.yaml"
if not SPEC.exists():
    SPEC = Path("/work/shared/reference/firecracker-api-1.17.0-dev.yaml")


class Fc:
    """One double process and an API client on its socket."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.sock = root / "api.sock"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.doubles.firecracker_api", "--api-sock", str(self.sock), "--id", "t1"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            assert self.proc.poll() is None, self.proc.communicate()
            assert time.monotonic() < deadline, "the double did not create its API socket"
            time.sleep(0.01)
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.sock)),
                                   base_url="http://localhost", timeout=30)
        self.kernel = root / "vmlinux"
        shutil.copy("/bin/true", self.kernel)  # an ELF64 x86-64: the double boots nothing
        for name in ("rootfs", "data", "other"):
            (root / name).write_bytes(b"\0" * 4096)

    def req(self, method: str, path: str, body: Any = None) -> tuple[int, str]:
        r = self.client.request(method, path, json=body)
        return r.status_code, (r.json().get("fault_message", "") if r.content else "")

    def ok(self, method: str, path: str, body: Any = None) -> None:
        status, fault = self.req(method, path, body)
        assert status == 204, f"{method} {path}: {status} {fault}"

    def configure(self, vsock: bool = True) -> None:
        self.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})
        self.ok("PUT", "/boot-source", {"kernel_image_path": str(self.kernel), "boot_args": "console=ttyS0"})
        self.ok("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": str(self.root / "rootfs"),
                                          "is_root_device": True, "is_read_only": True})
        self.ok("PUT", "/drives/data", {"drive_id": "data", "path_on_host": str(self.root / "data"),
                                        "is_root_device": False, "is_read_only": False})
        self.ok("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0",
                                                    "guest_mac": "02:00:00:00:00:01"})
        if vsock:
            self.ok("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(self.root / "v.sock")})

    def start(self) -> None:
        self.configure()
        self.ok("PUT", "/actions", {"action_type": "InstanceStart"})

    def state(self) -> str:
        return str(self.client.get("/").json()["state"])

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def fc(tmp_path: Path) -> Iterator[Fc]:
    f = Fc(tmp_path)
    yield f
    f.close()


def started(f: Fc) -> None:
    f.start()


def paused(f: Fc) -> None:
    f.start()
    f.ok("PATCH", "/vm", {"state": "Paused"})


def fresh(f: Fc) -> None:
    pass


def configured(f: Fc) -> None:
    f.configure()


ROOT2 = {"drive_id": "other", "path_on_host": "{root}/other", "is_root_device": True}

# (name, how to get there, method, path, body, fault substring)
REFUSALS: list[tuple[str, Any, str, str, Any, str]] = [
    ("unknown-field", fresh, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32, "cpus": 2},
     "unknown field `cpus`"),
    ("missing-field", fresh, "PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/x"},
     "missing field `is_root_device`"),
    ("wrong-type", fresh, "PUT", "/machine-config", {"vcpu_count": "1", "mem_size_mib": 32},
     "invalid type"),
    ("bad-enum", fresh, "PATCH", "/vm", {"state": "Stopped"}, "not supported before starting"),
    ("path-body-id", fresh, "PUT", "/drives/a", {"drive_id": "b", "path_on_host": "/x",
                                                  "is_root_device": False}, "does not match"),
    ("unknown-path", fresh, "PUT", "/nonsense", {}, "Invalid request method and/or path"),
    ("missing-kernel", fresh, "PUT", "/boot-source", {"kernel_image_path": "/nonexistent/vmlinux"},
     "kernel file cannot be opened"),
    ("missing-drive-file", fresh, "PUT", "/drives/rootfs",
     {"drive_id": "rootfs", "path_on_host": "/nonexistent", "is_root_device": True},
     "Unable to create the block device"),
    ("start-without-kernel", fresh, "PUT", "/actions", {"action_type": "InstanceStart"},
     "without kernel configuration"),
    ("boot-source-after-start", started, "PUT", "/boot-source", {"kernel_image_path": "/bin/true"},
     double.POST_BOOT),
    ("machine-config-after-start", started, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32},
     double.POST_BOOT),
    ("drive-put-after-start", started, "PUT", "/drives/data", {"drive_id": "data", "path_on_host": "{root}/data",
                                                               "is_root_device": False}, double.POST_BOOT),
    ("net-put-after-start", started, "PUT", "/network-interfaces/eth1", {"iface_id": "eth1", "host_dev_name": "t1"},
     double.POST_BOOT),
    ("vsock-after-start", started, "PUT", "/vsock", {"guest_cid": 3, "uds_path": "{root}/x.sock"}, double.POST_BOOT),
    ("start-twice", started, "PUT", "/actions", {"action_type": "InstanceStart"}, double.POST_BOOT),
    ("patch-vm-before-boot", fresh, "PATCH", "/vm", {"state": "Paused"}, double.PRE_BOOT),
    ("patch-drive-before-boot", configured, "PATCH", "/drives/data",
     {"drive_id": "data", "path_on_host": "{root}/other"},
     double.PRE_BOOT),
    ("patch-net-before-boot", configured, "PATCH", "/network-interfaces/eth0", {"iface_id": "eth0"}, double.PRE_BOOT),
    ("ctrl-alt-del-before-boot", fresh, "PUT", "/actions", {"action_type": "SendCtrlAltDel"}, double.PRE_BOOT),
    ("second-root-drive", configured, "PUT", "/drives/other", ROOT2, "A root block device already exists"),
    ("duplicate-mac", configured, "PUT", "/network-interfaces/eth1", {"iface_id": "eth1", "host_dev_name": "tap1",
                                                                      "guest_mac": "02:00:00:00:00:01"},
     "MAC address is already in use"),
    ("duplicate-tap", configured, "PUT", "/network-interfaces/eth1", {"iface_id": "eth1", "host_dev_name": "tap0"},
     "tap0 is already in use"),
    ("patch-drive-other-field", started, "PATCH", "/drives/data", {"drive_id": "data", "is_read_only": True},
     "unknown field `is_read_only`"),
    ("snapshot-create-running", started, "PUT", "/snapshot/create",
     {"snapshot_path": "{root}/s", "mem_file_path": "{root}/m"},
     "not paused"),
    ("snapshot-create-before-boot", fresh, "PUT", "/snapshot/create", {"snapshot_path": "{root}/s",
                                                                       "mem_file_path": "{root}/m"}, double.PRE_BOOT),
    ("snapshot-load-after-config", configured, "PUT", "/snapshot/load", {"snapshot_path": "{root}/s",
                                                                         "mem_file_path": "{root}/m"},
     double.LOAD_NOT_ALLOWED),
    ("snapshot-load-after-start", started, "PUT", "/snapshot/load", {"snapshot_path": "{root}/s",
                                                                     "mem_file_path": "{root}/m"}, double.POST_BOOT),
    ("snapshot-load-both-mem", fresh, "PUT", "/snapshot/load", {
        "snapshot_path": "{root}/s", "mem_file_path": "{root}/m",
        "mem_backend": {"backend_type": "File", "backend_path": "{root}/m"}}, "not both"),
    ("snapshot-load-neither-mem", fresh, "PUT", "/snapshot/load", {"snapshot_path": "{root}/s"}, "not both"),
    ("snapshot-load-missing-files", fresh, "PUT", "/snapshot/load", {
        "snapshot_path": "{root}/missing", "mem_backend": {"backend_type": "File", "backend_path": "{root}/m"}},
     "Cannot open the snapshot file"),
]


def _fill(body: Any, root: Path) -> Any:
    if isinstance(body, dict):
        return {k: _fill(v, root) for k, v in body.items()}
    return body.replace("{root}", str(root)) if isinstance(body, str) else body


@pytest.mark.parametrize(("setup", "method", "path", "body", "fault"),
                         [pytest.param(*r[1:], id=r[0]) for r in REFUSALS])
def test_the_double_refuses_what_firecracker_refuses(fc: Fc, setup: Any, method: str, path: str,
                                                     body: Any, fault: str) -> None:
    setup(fc)
    before = fc.state()
    status, message = fc.req(method, path, _fill(body, fc.root))
    assert status == 400, (status, message)
    assert fault in message
    assert fc.state() == before  # a refusal changes nothing


def test_logger_and_metrics_do_not_count_as_configuration(fc: Fc, tmp_path: Path) -> None:
    fc.ok("PUT", "/logger", {"log_path": str(tmp_path / "log"), "level": "Info"})
    fc.ok("PUT", "/metrics", {"metrics_path": str(tmp_path / "metrics")})
    status, message = fc.req("PUT", "/snapshot/load", {
        "snapshot_path": str(tmp_path / "missing"),
        "mem_backend": {"backend_type": "File", "backend_path": str(tmp_path / "m")}})
    assert status == 400 and double.LOAD_NOT_ALLOWED not in message  # refused for the missing file only


def test_pause_and_resume_are_idempotent_and_info_shows_the_state(fc: Fc) -> None:
    assert fc.state() == "Not started"
    fc.start()
    assert fc.state() == "Running"
    for _ in range(2):
        fc.ok("PATCH", "/vm", {"state": "Paused"})
        assert fc.state() == "Paused"
    for _ in range(2):
        fc.ok("PATCH", "/vm", {"state": "Resumed"})
        assert fc.state() == "Running"
    assert fc.client.get("/machine-config").json()["mem_size_mib"] == 32
    assert fc.client.get("/version").json() == {"firecracker_version": double.VERSION}
    info = fc.client.get("/").json()
    assert info["id"] == "t1" and info["app_name"] == "Firecracker"


def _vsock(path: Path, port: int) -> tuple[socket.socket, bytes]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    s.sendall(f"CONNECT {port}\n".encode())
    answer = b""
    while not answer.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        answer += chunk
    return s, answer


def test_vsock_follows_the_connect_ok_handshake_and_the_guest_agent_answers(fc: Fc) -> None:
    fc.start()
    s, answer = _vsock(fc.root / "v.sock", double.AGENT_PORT)
    with s:
        words = answer.split()
        assert words[0] == b"OK" and words[1].isdigit(), answer
        s.sendall(b"\x01\nr1 ping n0nce\n")
        assert s.recv(100) == b"r1 ok n0nce\n"
    # a port nothing listens on in the guest: the connection is closed without an answer
    s, answer = _vsock(fc.root / "v.sock", 5000)
    s.close()
    assert answer == b""


def test_snapshot_create_and_load_keep_the_guest_memory(fc: Fc, tmp_path: Path) -> None:
    fc.start()
    s, _ = _vsock(fc.root / "v.sock", double.AGENT_PORT)
    with s:
        s.sendall(b"a exec 5.000 d3JpdGU= aW4tbWVtb3J5\n")  # write in-memory
        assert s.recv(100).startswith(b"a ok 0")
    fc.ok("PATCH", "/vm", {"state": "Paused"})
    fc.ok("PUT", "/snapshot/create", {"snapshot_path": str(tmp_path / "state"),
                                      "mem_file_path": str(tmp_path / "mem"), "snapshot_type": "Full"})
    assert (tmp_path / "mem").stat().st_size == 32 << 20  # the VM's memory size
    fc.close()
    (tmp_path / "b").mkdir()
    g = Fc(tmp_path / "b")
    try:
        g.ok("PUT", "/snapshot/load", {"snapshot_path": str(tmp_path / "state"), "resume_vm": False,
                                       "mem_backend": {"backend_type": "File", "backend_path": str(tmp_path / "mem")},
                                       "vsock_override": {"uds_path": str(g.root / "w.sock")}})
        assert g.state() == "Paused"
        status, fault = g.req("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})
        assert (status, fault) == (400, double.POST_BOOT)
        g.ok("PATCH", "/vm", {"state": "Resumed"})
        s, _ = _vsock(g.root / "w.sock", double.AGENT_PORT)
        with s:
            s.sendall(b"b exec 5.000 cmVhZA==\n")  # read
            assert s.recv(200) == b"b ok 0 aW4tbWVtb3J5Cg== -\n"  # "in-memory\n"
    finally:
        g.close()


def test_ctrl_alt_del_ends_the_process_and_removes_its_sockets(fc: Fc) -> None:
    fc.start()
    fc.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    assert fc.proc.wait(timeout=30) == 0
    assert not fc.sock.exists() and not (fc.root / "v.sock").exists()
    assert b"reboot: Restarting system" in fc.proc.communicate()[0]


def test_a_non_elf_kernel_is_refused_at_instance_start(fc: Fc) -> None:
    fc.kernel.write_bytes(b"MZ\0\0" + b"\0" * 600)  # a bzImage-like file
    fc.configure()
    status, fault = fc.req("PUT", "/actions", {"action_type": "InstanceStart"})
    assert status == 400 and "invalid kernel image" in fault
    assert fc.state() == "Not started"


def test_an_api_socket_in_use_ends_the_double_as_firecracker_ends(tmp_path: Path) -> None:
    (tmp_path / "api.sock").touch()
    p = subprocess.run([sys.executable, "-m", "tests.doubles.firecracker_api",
                        "--api-sock", str(tmp_path / "api.sock")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "Failed to open the API socket" in p.stderr


def test_injected_refusals_and_crashes(tmp_path: Path) -> None:
    f = Fc(tmp_path, {"FC_DOUBLE_REFUSE": "PUT /machine-config", "FC_DOUBLE_CRASH_ON": "PUT /vsock"})
    try:
        status, fault = f.req("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})
        assert status == 400 and "injected refusal" in fault
        with pytest.raises(httpx.HTTPError):
            f.req("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "v.sock")})
        assert f.proc.wait(timeout=30) == 70
    finally:
        f.close()


def test_the_doubles_schemas_are_firecrackers() -> None:
    if not SPEC.exists():
        pytest.skip(f"Firecracker's API spec is not here: {SPEC}")
    yaml = pytest.importorskip("yaml")
    spec = yaml.safe_load(SPEC.read_text())["definitions"]
    for name, (required, props) in double.SCHEMAS.items():
        theirs = spec[name]
        assert set(theirs.get("required", [])) == set(required), name
        assert set(theirs.get("properties", {})) == set(props), name
        for field, kind in props.items():
            t = theirs["properties"][field]
            if isinstance(kind, tuple):  # (YAML reads Firecracker's `Off` as false)
                assert [("Off" if v is False else v) for v in t["enum"]] == list(kind[1]), (name, field)
            elif isinstance(kind, list):
                assert t["type"] == "array" and t["items"]["$ref"].endswith("/" + kind[1]), (name, field)
            elif kind in double.SCHEMAS:
                assert t["$ref"].endswith("/" + kind), (name, field)
            else:
                assert t.get("type", "object" if "$ref" in t else None) == kind, (name, field)
