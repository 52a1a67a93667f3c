"""The QMP wrapper against a protocol double on a Unix socket (no QEMU needed).

qemu.qmp sends each message as JSON without a trailing newline, so the double splits the
stream with `JSONDecoder.raw_decode`, not `readline()`.
"""

from __future__ import annotations

import array
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mvm.errors import RuntimeFailure
from mvm.runtime.qemu.qmp import Qmp, call

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
                    "capabilities": []}}
Handler = Callable[[dict[str, Any], list[int]], dict[str, Any] | None]


class QmpDouble:
    """Answers one client at a time; `handler(msg, fds)` returns a reply, or None for none.
    A reply of {"close": True} hangs up instead of answering."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.received: list[dict[str, Any]] = []
        self.fds: list[int] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        conn.sendall(json.dumps(GREETING).encode() + b"\r\n")
        decoder = json.JSONDecoder()
        buf = ""
        pending_fds: list[int] = []
        while True:
            fds = array.array("i")
            try:
                data, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(16 * fds.itemsize))
            except OSError:
                return
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    pending_fds.extend(fds)
            if not data:
                return
            buf += data.decode()
            while True:
                stripped = buf.lstrip()
                if not stripped:
                    buf = ""
                    break
                try:
                    msg, end = decoder.raw_decode(stripped)
                except json.JSONDecodeError:
                    break  # incomplete: read more
                buf = stripped[end:]
                self.received.append(msg)
                if msg.get("execute") == "qmp_capabilities":
                    reply: dict[str, Any] | None = {"return": {}}
                else:
                    reply = self.handler(msg, pending_fds)
                    self.fds.extend(pending_fds)
                    pending_fds = []
                if reply is None:
                    continue
                if reply.get("close"):
                    return
                reply["id"] = msg.get("id")
                conn.sendall(json.dumps(reply).encode() + b"\r\n")

    def commands(self) -> list[str]:
        return [m["execute"] for m in self.received]

    def close(self) -> None:
        self.server.close()
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
def double(tmp_path: Path) -> Iterator[Callable[[Handler], QmpDouble]]:
    made: list[QmpDouble] = []

    def make(handler: Handler) -> QmpDouble:
        d = QmpDouble(tmp_path / "qmp.sock", handler)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def test_execute_returns_the_return_value(double: Callable[[Handler], QmpDouble]) -> None:
    d = double(lambda msg, fds: {"return": {"status": "running", "running": True}})
    with Qmp(d.path) as q:
        assert q.execute("query-status") == {"status": "running", "running": True}
        assert q.execute("stop", timeout=1) == {"status": "running", "running": True}
    assert d.commands() == ["qmp_capabilities", "query-status", "stop"]


def test_arguments_are_sent(double: Callable[[Handler], QmpDouble]) -> None:
    d = double(lambda msg, fds: {"return": {}})
    assert call(d.path, "migrate-set-parameters", {"max-bandwidth": 1 << 30}) == {}
    assert d.received[-1]["arguments"] == {"max-bandwidth": 1 << 30}


def test_qemu_error_text_is_kept(double: Callable[[Handler], QmpDouble]) -> None:
    d = double(lambda msg, fds: {"error": {"class": "GenericError",
                                           "desc": "There's a migration process in progress"}})
    with pytest.raises(RuntimeFailure, match="QEMU refused migrate: There's a migration "
                                             "process in progress"):
        call(d.path, "migrate", {"uri": "fd:x"})


def test_every_call_has_a_deadline(double: Callable[[Handler], QmpDouble]) -> None:
    d = double(lambda msg, fds: None)  # never answers
    start = time.monotonic()
    with pytest.raises(RuntimeFailure, match=r"did not answer query-migrate within 0\.2s"):
        call(d.path, "query-migrate", timeout=0.2)
    assert time.monotonic() - start < 2


def test_no_socket_is_a_clear_failure(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure, match="cannot connect to QEMU"):
        call(tmp_path / "nothing.sock", "query-status")


def test_silent_server_hits_the_connect_deadline(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(path))
        mute.listen(1)  # accepts the connection but never greets
        start = time.monotonic()
        with pytest.raises(RuntimeFailure, match="did not answer"):
            Qmp(path, connect_timeout=0.3).connect()
        assert time.monotonic() - start < 2


def test_hang_up_mid_command(double: Callable[[Handler], QmpDouble]) -> None:
    d = double(lambda msg, fds: {"close": True})
    with pytest.raises(RuntimeFailure, match="closed the connection during cont"):
        call(d.path, "cont")


def test_quit_tolerates_the_hang_up(double: Callable[[Handler], QmpDouble]) -> None:
    d = double(lambda msg, fds: {"close": True} if msg["execute"] == "quit" else {"return": {}})
    with Qmp(d.path) as q:
        q.quit()
    assert d.commands()[-1] == "quit"


def test_send_fd_passes_a_working_descriptor(double: Callable[[Handler], QmpDouble],
                                             tmp_path: Path) -> None:
    got: dict[str, int] = {}

    def handler(msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        if msg["execute"] == "getfd":
            assert len(fds) == 1
            got[msg["arguments"]["fdname"]] = fds[0]
        return {"return": {}}

    d = double(handler)
    target = tmp_path / "memory"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with Qmp(d.path) as q:
            q.send_fd(fd, "mvm-snapshot")
    finally:
        os.close(fd)
    os.write(got["mvm-snapshot"], b"QEVM")  # the "hypervisor" writes through its copy
    assert target.read_bytes() == b"QEVM"


def test_concurrent_clients_queue_instead_of_failing(
        double: Callable[[Handler], QmpDouble]) -> None:
    # Like QEMU, the double serves one client at a time with a backlog of one: the others
    # must wait their turn (each connection also has its own event loop, per thread).
    d = double(lambda msg, fds: {"return": {"status": "paused"}})
    results = []

    def worker() -> None:
        for _ in range(5):
            results.append(call(d.path, "query-status"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [{"status": "paused"}] * 40
