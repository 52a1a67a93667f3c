"""VsockChannel against a small Unix-socket server that plays Firecracker's vsock socket
(docs/vsock.md of firecracker-microvm/firecracker: the host sends `CONNECT <port>\\n`, gets
`OK <host port>\\n` when the guest accepted, or a closed connection when nothing listens)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mvm.errors import GuestError
from mvm.guest.agent_client import GuestAgentClient
from mvm.guest.channels import VSOCK_AGENT_PORT, VsockChannel
from tests.doubles import agent_protocol as proto
from tests.doubles.agent_protocol import Request
from tests.doubles.unix_server import UnixServer, read_line

Script = Callable[[socket.socket, bytes], None]  # (connection, the CONNECT line read)


class VsockSocket:
    """A named double of Firecracker's vsock Unix socket: each connection's first line is read,
    then `script` answers it."""

    def __init__(self, path: Path, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self._server = UnixServer(path, self._one, backlog=4, concurrent=True)

    def _one(self, conn: socket.socket) -> None:
        line = read_line(conn, 100)
        if not line.endswith(b"\n") and len(line) < 100:
            return  # (the client closed first)
        self.requests.append(line)
        self.script(conn, line)

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "v.sock"


def ok_then_echo(conn: socket.socket, line: bytes) -> None:
    """Firecracker's answer, then a guest that sends a line at once and echoes what it reads."""
    conn.sendall(b"OK 1073741824\n* hello mvm-agent 1\n")
    while data := conn.recv(4096):
        conn.sendall(data)


def test_handshake_opens_the_stream_and_keeps_what_follows_the_answer(sock_path: Path) -> None:
    srv = VsockSocket(sock_path, ok_then_echo)
    try:
        s = VsockChannel(sock_path, VSOCK_AGENT_PORT).connect(timeout=10)
        with s:
            s.settimeout(10)
            assert srv.requests == [b"CONNECT 1024\n"]
            f = s.makefile("rb")
            assert f.readline() == b"* hello mvm-agent 1\n"  # the guest's bytes after OK
            s.sendall(b"ping\n")
            assert f.readline() == b"ping\n"
    finally:
        srv.close()


def test_the_wait_retries_until_the_socket_appears_and_the_guest_listens(sock_path: Path) -> None:
    closes = {"left": 3}

    def late_listener(conn: socket.socket, line: bytes) -> None:
        if closes["left"] > 0:  # no listener on the guest port yet: Firecracker closes
            closes["left"] -= 1
            return
        ok_then_echo(conn, line)

    servers: list[VsockSocket] = []
    threading.Timer(0.3, lambda: servers.append(VsockSocket(sock_path, late_listener))).start()
    s = VsockChannel(sock_path, 52).connect(timeout=20)
    with s:
        assert servers[0].requests == [b"CONNECT 52\n"] * 4
    servers[0].close()


@pytest.mark.parametrize(("answer", "expected"), [
    (b"NOPE\n", r"answered CONNECT 1024 with 'NOPE\\n' \(expected 'OK <port>'\)"),
    (b"OK\n", r"with 'OK\\n'"),
    (b"OK 12 34\n", r"with 'OK 12 34\\n'"),
    (b"HTTP/1.1 400 Bad Request\r\n", r"with 'HTTP/1.1 400"),
    (b"A" * 65 + b"\n", r"more than 64 bytes without a newline"),
    (b"OK " + b"1" * 200, r"more than 64 bytes without a newline"),
])
def test_a_wrong_or_oversized_answer_is_one_clear_error(sock_path: Path, answer: bytes,
                                                        expected: str) -> None:
    def wrong(conn: socket.socket, line: bytes) -> None:
        conn.sendall(answer)
        time.sleep(5)  # (keeps the connection open: the error comes from the bytes, not EOF)

    srv = VsockSocket(sock_path, wrong)
    try:
        with pytest.raises(GuestError, match=expected) as e:
            VsockChannel(sock_path, VSOCK_AGENT_PORT).connect(timeout=30)
        assert "\n" not in e.value.message
        assert "not Firecracker's vsock" in e.value.line()
        assert len(srv.requests) == 1  # at once, without retrying
    finally:
        srv.close()


def test_a_slow_answer_in_pieces_within_the_timeout_is_read(sock_path: Path) -> None:
    def slow(conn: socket.socket, line: bytes) -> None:
        for piece in (b"O", b"K 10", b"7374182", b"4\n"):
            time.sleep(0.2)
            conn.sendall(piece)
        conn.sendall(b"after\n")
        time.sleep(2)

    srv = VsockSocket(sock_path, slow)
    try:
        with VsockChannel(sock_path, VSOCK_AGENT_PORT).connect(timeout=30) as s:
            s.settimeout(10)
            assert s.makefile("rb").readline() == b"after\n"
    finally:
        srv.close()


def test_no_answer_ends_at_the_timeout_with_what_was_asked(sock_path: Path) -> None:
    srv = VsockSocket(sock_path, lambda conn, line: time.sleep(10))
    try:
        with pytest.raises(TimeoutError, match=r"no answer from the vsock socket .*v\.sock to "
                                               r"CONNECT 1024 within 0\.5s"):
            VsockChannel(sock_path, VSOCK_AGENT_PORT).connect(timeout=0.5)
    finally:
        srv.close()


def test_an_absent_socket_is_an_oserror_at_the_timeout(sock_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        VsockChannel(sock_path, VSOCK_AGENT_PORT).connect(timeout=0.3)


def test_a_guest_that_never_listens_ends_at_the_timeout(sock_path: Path) -> None:
    srv = VsockSocket(sock_path, lambda conn, line: None)  # Firecracker closes each time
    try:
        with pytest.raises(ConnectionResetError, match="closed the connection to port 1024 "
                                                       "before answering"):
            VsockChannel(sock_path, VSOCK_AGENT_PORT).connect(timeout=0.5)
        assert len(srv.requests) > 1  # it retried
    finally:
        srv.close()


def test_agent_client_pings_over_vsock(sock_path: Path) -> None:
    nonces: list[str] = []

    def agent(conn: socket.socket, line: bytes) -> None:
        conn.sendall(b"OK 1073741825\n")
        for line in proto.lines(conn):
            req = Request.parse(line)
            if req is not None and req.verb == "ping":
                nonces.append(req.args[0])
                conn.sendall(f"{proto.ok(req.rid, req.args[0])}\n".encode())

    srv = VsockSocket(sock_path, agent)
    try:
        with GuestAgentClient(VsockChannel(sock_path, VSOCK_AGENT_PORT)) as c:
            c.wait_ready(timeout=20)
            before = len(nonces)
            c.ping()
            # the ping crossed the channel after the CONNECT handshake, with a fresh nonce each time
            assert len(nonces) == before + 1
            c.ping()
            assert len(nonces) == before + 2 and nonces[-1] != nonces[-2]
    finally:
        srv.close()


def test_an_answer_dribbled_past_the_timeout_ends_at_the_timeout(sock_path: Path) -> None:
    """Each byte in time is not enough: the whole answer must come within the timeout."""
    def dribble(conn: socket.socket, line: bytes) -> None:
        for b in b"OK 1234567890\n":
            time.sleep(0.15)
            conn.sendall(bytes([b]))

    srv = VsockSocket(sock_path, dribble)
    try:
        with pytest.raises(TimeoutError, match=r"within 0\.5s"):
            VsockChannel(sock_path, VSOCK_AGENT_PORT).connect(timeout=0.5)
    finally:
        srv.close()
