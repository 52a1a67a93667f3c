"""AgentClient against a protocol double of the guest agent (no guest, no QEMU).

The double listens on a Unix socket like QEMU's chardev and speaks the line protocol of
src/mvm/data/guest/agent, including the noise a real channel carries: the agent's own
`* hello` lines and answers to requests the host already gave up on.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mvm.errors import GuestError
from mvm.guest.agent_client import AgentClient, ExecResult

Handler = Callable[[str, str, list[str]], list[str] | None]  # → lines to send


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode() if data else "-"


def unb64(field: str) -> bytes:
    return b"" if field == "-" else base64.b64decode(field)


def guest_like(rid: str, verb: str, args: list[str]) -> list[str] | None:
    """What the real agent answers, plus a stale line before every answer."""
    stale = ["* hello mvm-agent 1", "deadbeef ok stale"]
    if verb == "ping":
        return [*stale, f"{rid} ok {args[0]}"]
    if verb == "exec":
        argv = [unb64(a) for a in args[1:]]
        if argv[0] == b"fail":
            failed = b64(b"failed\n")
            return [*stale, f"{rid} ok {int(argv[1])} - {failed}"]
        if argv[0] == b"hang":
            return [*stale, f"{rid} ok 124 - - timeout"]
        return [*stale, f"{rid} ok 0 {b64(b'|'.join(argv))} -"]
    if verb in ("sleep-prep", "wake"):
        return [f"{rid} ok"]
    return [f"{rid} err {b64(f'unknown verb: {verb}'.encode())}"]


class FakeAgent:
    """QEMU's chardev socket with an agent behind it; one client at a time."""

    def __init__(self, path: Path, handler: Handler = guest_like) -> None:
        self.path = path
        self.handler = handler
        self.requests: list[str] = []
        self.connections = 0
        self.discards = 0
        self.session_ended = threading.Event()
        self.drop_after: int | None = None  # close the connection after this many requests
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(str(path))
        self._srv.listen(1)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                self._session(conn)
            self.session_ended.set()

    def _session(self, conn: socket.socket) -> None:
        buf = b""
        served = 0
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if b"\x01" in line:
                    self.discards += 1
                    continue
                self.requests.append(line.decode())
                rid, verb, *args = line.decode().split(" ")
                out = self.handler(rid, verb, args)
                if out:
                    conn.sendall("".join(f"{x}\n" for x in out).encode())
                served += 1
                if self.drop_after is not None and served >= self.drop_after:
                    return

    def close(self) -> None:
        self._stop = True
        self._srv.close()


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "agent.sock"


@pytest.fixture
def agent(sock: Path) -> Iterator[FakeAgent]:
    fake = FakeAgent(sock)
    yield fake
    fake.close()


def test_ping_and_exec_skip_stale_lines(agent: FakeAgent, sock: Path) -> None:
    with AgentClient(sock) as c:
        assert c.ping() < 5
        r = c.exec(["echo", "a b", "", "é\n", b"\xff\x00bin"], timeout=5)
    assert r == ExecResult(0, "echo|a b||é\n|".encode() + b"\xff\x00bin", b"", False)
    assert r.ok
    # the exec request carried the guest-side timeout and `-` for the empty argument
    exec_line = next(x for x in agent.requests if " exec " in x)
    assert exec_line.split(" ")[2:5] == ["5.000", b64(b"echo"), b64(b"a b")]
    assert exec_line.split(" ")[5] == "-"


def test_exit_code_stderr_and_timeout_flag(agent: FakeAgent, sock: Path) -> None:
    c = AgentClient(sock)
    r = c.exec(["fail", "7"], timeout=5)
    assert (r.exit_code, r.stdout, r.stderr, r.timed_out, r.ok) == (7, b"", b"failed\n", False,
                                                                    False)
    r = c.exec(["hang"], timeout=1)
    assert r.timed_out and r.exit_code == 124 and not r.ok


def test_wait_ready_keeps_pinging_until_the_agent_answers(sock: Path) -> None:
    seen: list[str] = []

    def booting(rid: str, verb: str, args: list[str]) -> list[str] | None:
        seen.append(args[0])
        if len(seen) < 4:
            return None  # still booting: the agent has not opened its port
        # the guest finally reads the queued pings: it answers the *first* one
        return [f"{rid} ok {seen[0]}"]

    fake = FakeAgent(sock, booting)
    try:
        started = time.monotonic()
        AgentClient(sock).wait_ready(timeout=20)
        assert len(seen) == 4 and len(set(seen)) == 4  # a fresh nonce per try
        assert time.monotonic() - started < 10
    finally:
        fake.close()


def test_wait_ready_waits_for_the_socket_to_appear(tmp_path: Path) -> None:
    sock = tmp_path / "late.sock"
    fakes: list[FakeAgent] = []
    timer = threading.Timer(0.3, lambda: fakes.append(FakeAgent(sock)))
    timer.start()
    try:
        AgentClient(sock).wait_ready(timeout=10)
    finally:
        timer.join()
        for f in fakes:
            f.close()


def test_no_socket_is_a_guest_error_within_the_deadline(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(GuestError, match=r"not ready after 0\.5s"):
        AgentClient(tmp_path / "nothing.sock").wait_ready(timeout=0.5)
    assert time.monotonic() - started < 2
    with pytest.raises(GuestError, match=r"nothing\.sock"):
        AgentClient(tmp_path / "nothing.sock").ping(timeout=0.5)


def test_silent_guest_is_a_guest_error(sock: Path) -> None:
    fake = FakeAgent(sock, lambda rid, verb, args: None)
    try:
        with pytest.raises(GuestError, match=r"did not answer ping within 0\.3s"):
            AgentClient(sock).ping(timeout=0.3)
        with pytest.raises(GuestError, match="not ready"):
            AgentClient(sock).wait_ready(timeout=0.6)
    finally:
        fake.close()


def test_refusal_carries_the_guest_message(agent: FakeAgent, sock: Path) -> None:
    c = AgentClient(sock)
    with pytest.raises(GuestError, match="unknown verb: frobnicate"):
        c._request("frobnicate", [], 5)
    c.sleep_prep()
    c.wake(1_700_000_000.25)
    assert agent.requests[-1].split(" ")[1:] == ["wake", "1700000000.250000"]


def test_reconnects_after_the_socket_drops(agent: FakeAgent, sock: Path) -> None:
    agent.drop_after = 1  # like QEMU going away after a snapshot, then a restored one
    c = AgentClient(sock)
    c.ping()
    assert agent.session_ended.wait(5)
    c.ping()  # the request could not be sent on the dead connection: sent on a new one
    assert agent.connections == 2
    assert agent.discards == 2  # each connection began by ending any torn line


def test_answer_lost_with_the_connection_is_a_guest_error(sock: Path) -> None:
    fake = FakeAgent(sock, lambda rid, verb, args: None)
    fake.drop_after = 1  # reads the request, then the VM goes away without answering
    try:
        with pytest.raises(GuestError, match="closed the agent socket"):
            AgentClient(sock).exec(["true"], timeout=5)
    finally:
        fake.close()


def test_malformed_answers_are_guest_errors(sock: Path) -> None:
    fake = FakeAgent(sock, lambda rid, verb, args: [f"{rid} ok notanumber - -"])
    try:
        with pytest.raises(GuestError, match="exit code"):
            AgentClient(sock).exec(["x"], timeout=1)
    finally:
        fake.close()
    with pytest.raises(ValueError):
        AgentClient(sock).exec([], timeout=1)


def test_a_queued_wake_sends_the_time_it_goes_out_not_when_it_was_asked(agent: FakeAgent, sock: Path) -> None:
    c = AgentClient(sock)
    c._lock.acquire()  # another request of this client is in flight
    done = threading.Event()

    def wake() -> None:
        c.wake()
        done.set()

    t = threading.Thread(target=wake)
    t.start()
    time.sleep(0.6)
    released = time.time()
    c._lock.release()
    t.join(5)
    assert done.is_set()
    sent = float(next(x for x in agent.requests if " wake " in x).split(" ")[2])
    assert sent >= released  # not the time 0.6 s earlier, when wake() was called


def test_a_wait_ends_when_the_hypervisor_exits(tmp_path: Path) -> None:
    from mvm.guest.channels import VirtioSerialChannel

    alive = {"yes": True}
    channel = VirtioSerialChannel(tmp_path / "never.sock", alive=lambda: alive["yes"],
                                  last_words=lambda: "console:\nKernel panic - not syncing")
    threading.Timer(0.3, lambda: alive.update(yes=False)).start()
    # (without the watch this would end after the full minute, as "not ready after 60s")
    with pytest.raises(GuestError, match="the hypervisor exited while waiting for the guest agent") as e:
        AgentClient(channel).wait_ready(timeout=60)
    assert "Kernel panic" in e.value.message
