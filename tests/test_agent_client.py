"""GuestAgentClient against a protocol double of the guest agent (no guest, no QEMU).

The double listens on a Unix socket like QEMU's chardev and speaks the line protocol of
src/mvm/data/guest/agent, including the noise a real channel carries: the agent's own
`* hello` lines and answers to requests the host already gave up on.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mvm.errors import GuestError
from mvm.guest.agent_client import ExecResult, GuestAgentClient
from tests.doubles import agent_protocol as proto
from tests.doubles.agent_protocol import HELLO, Request, b64, unb64
from tests.doubles.unix_server import UnixServer

Handler = Callable[[str, str, list[str]], list[str] | None]  # → lines to send
Script = Callable[[socket.socket, Request], None]  # a guest's answer to one request


def guest_like(rid: str, verb: str, args: list[str]) -> list[str] | None:
    """What the real agent answers, plus a stale line before every answer."""
    stale = [HELLO, proto.ok("deadbeef", "stale")]
    if verb == "ping":
        return [*stale, proto.ok(rid, args[0])]
    if verb == "exec":
        argv = Request(rid, verb, args).argv
        if argv[0] == b"fail":
            return [*stale, proto.exec_ok(rid, int(argv[1]), b"", b"failed\n")]
        if argv[0] == b"hang":
            return [*stale, proto.exec_ok(rid, 124, b"", b"", "timeout")]
        return [*stale, proto.exec_ok(rid, 0, b"|".join(argv))]
    if verb in ("sleep-prep", "wake"):
        return [proto.ok(rid)]
    return [proto.err(rid, f"unknown verb: {verb}")]


class FakeAgent:
    """QEMU's chardev socket with an agent behind it; one client at a time."""

    def __init__(self, path: Path, handler: Handler = guest_like) -> None:
        self.path = path
        self.handler = handler
        self.requests: list[Request] = []
        self.discards = 0
        self.session_ended = threading.Event()
        self.drop_after: int | None = None  # close the connection after this many requests
        self._server = UnixServer(path, self._session)

    @property
    def connections(self) -> int:
        return self._server.connections

    def _session(self, conn: socket.socket) -> None:
        served = 0
        for line in proto.lines(conn):
            req = Request.parse(line)
            if req is None:
                self.discards += b"\x01" in line
                continue
            self.requests.append(req)
            out = self.handler(req.rid, req.verb, req.args)
            if out:
                conn.sendall("".join(f"{x}\n" for x in out).encode())
            served += 1
            if self.drop_after is not None and served >= self.drop_after:
                break
        conn.close()
        self.session_ended.set()

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "agent.sock"


@pytest.fixture
def agent(sock: Path) -> Iterator[FakeAgent]:
    fake = FakeAgent(sock)
    yield fake
    fake.close()


def test_ping_and_exec_skip_stale_lines(agent: FakeAgent, sock: Path) -> None:
    with GuestAgentClient(sock) as c:
        assert c.ping() < 5
        r = c.exec(["echo", "a b", "", "é\n", b"\xff\x00bin"], timeout=5)
    assert r == ExecResult(0, "echo|a b||é\n|".encode() + b"\xff\x00bin", b"", False)
    assert r.ok
    # the exec request carried the guest-side timeout and `-` for the empty argument
    exec_req = next(x for x in agent.requests if x.verb == "exec")
    assert exec_req.args[:3] == ["5.000", b64(b"echo"), b64(b"a b")]
    assert exec_req.args[3] == "-"


def test_exit_code_stderr_and_timeout_flag(agent: FakeAgent, sock: Path) -> None:
    c = GuestAgentClient(sock)
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
        GuestAgentClient(sock).wait_ready(timeout=20)
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
        GuestAgentClient(sock).wait_ready(timeout=10)
    finally:
        timer.join()
        for f in fakes:
            f.close()


def test_no_socket_is_a_guest_error_within_the_deadline(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(GuestError, match=r"not ready after 0\.5s"):
        GuestAgentClient(tmp_path / "nothing.sock").wait_ready(timeout=0.5)
    assert time.monotonic() - started < 2
    with pytest.raises(GuestError, match=r"nothing\.sock"):
        GuestAgentClient(tmp_path / "nothing.sock").ping(timeout=0.5)


def test_silent_guest_is_a_guest_error(sock: Path) -> None:
    fake = FakeAgent(sock, lambda rid, verb, args: None)
    try:
        with pytest.raises(GuestError, match=r"did not answer ping within 0\.3s"):
            GuestAgentClient(sock).ping(timeout=0.3)
        with pytest.raises(GuestError, match="not ready"):
            GuestAgentClient(sock).wait_ready(timeout=0.6)
    finally:
        fake.close()


def test_refusal_carries_the_guest_message(agent: FakeAgent, sock: Path) -> None:
    c = GuestAgentClient(sock)
    with pytest.raises(GuestError, match="unknown verb: frobnicate"):
        c._request("frobnicate", [], 5)
    c.sleep_prep()
    c.wake(1_700_000_000.25)
    assert (agent.requests[-1].verb, agent.requests[-1].args) == ("wake", ["1700000000.250000"])


def test_reconnects_after_the_socket_drops(agent: FakeAgent, sock: Path) -> None:
    agent.drop_after = 1  # like QEMU going away after a snapshot, then a restored one
    c = GuestAgentClient(sock)
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
            GuestAgentClient(sock).exec(["true"], timeout=5)
    finally:
        fake.close()


class StartHandshake:
    """A current agent: `run` is answered `ready`, and the command starts only on `<id> go`
    (`started` lists what ran). `lose`: where the connection ends without an answer."""

    def __init__(self, lose: str | None = None) -> None:
        self.lose = lose
        self.pending: dict[str, list[str]] = {}
        self.started: list[str] = []

    def __call__(self, rid: str, verb: str, args: list[str]) -> list[str] | None:
        if verb == "run":
            if self.lose == "before-ready":
                return None
            self.pending[rid] = args
            return [f"{rid} ready"]
        if verb == "go":
            if rid not in self.pending:
                return [f"{rid} err {b64(b'no command waits for go: it was not started')}"]
            argv = [unb64(a).decode() for a in self.pending.pop(rid)[1:]]
            self.started.append(" ".join(argv))
            return None if self.lose == "after-go" else [f"{rid} ok 3 {b64(b'ran')} -"]
        return guest_like(rid, verb, args)


def test_exec_starts_the_command_only_after_the_host_says_go(sock: Path) -> None:
    guest = StartHandshake()
    fake = FakeAgent(sock, guest)
    try:
        r = GuestAgentClient(sock).exec(["echo", "x"], timeout=5)
    finally:
        fake.close()
    assert (r.exit_code, r.stdout) == (3, b"ran")
    run, go = fake.requests
    assert run.verb == "run" and (go.rid, go.verb, go.args) == (run.rid, "go", [])
    assert guest.started == ["echo x"]


@pytest.mark.parametrize("lose", ["before-ready", "after-go"])
def test_a_lost_exec_says_whether_its_command_started(sock: Path, lose: str) -> None:
    """The connection ends before the guest was told to start (nothing ran: a GuestError, exit
    125 at the CLI), or after (ExecLost, 126): never a guess either way."""
    from mvm.errors import ExecLost

    guest = StartHandshake(lose)
    fake = FakeAgent(sock, guest)
    fake.drop_after = 1 if lose == "before-ready" else 2
    try:
        with pytest.raises(GuestError) as e:
            GuestAgentClient(sock).exec(["touch", "/data/once"], timeout=5)
    finally:
        fake.close()
    assert isinstance(e.value, ExecLost) == (lose == "after-go")
    assert guest.started == ([] if lose == "before-ready" else ["touch /data/once"])
    if lose == "after-go":
        assert e.value.exit_code == 126 and "result was lost" in e.value.message


def test_a_refused_go_is_a_command_that_did_not_start(sock: Path) -> None:
    """An agent that gave up waiting for go (and ran nothing) answers the late go with err."""
    from mvm.errors import ExecLost

    guest = StartHandshake()
    fake = FakeAgent(sock, lambda rid, verb, args: guest(rid, verb, args) if verb != "run" else [f"{rid} ready"])
    try:
        with pytest.raises(GuestError, match="not started") as e:
            GuestAgentClient(sock).exec(["true"], timeout=5)
    finally:
        fake.close()
    assert not isinstance(e.value, ExecLost) and guest.started == []


def test_an_agent_from_before_the_handshake_gets_exec_and_a_loss_counts_as_started(sock: Path) -> None:
    from mvm.errors import ExecLost

    fake = FakeAgent(sock, lambda rid, verb, args: guest_like(rid, verb, args) if verb != "exec" else None)
    fake.drop_after = 2  # `run` refused as unknown, then `exec` read and the VM gone
    try:
        with pytest.raises(ExecLost, match="before `run`"):
            GuestAgentClient(sock).exec(["true"], timeout=5)
    finally:
        fake.close()
    assert [r.verb for r in fake.requests] == ["run", "exec"]


def test_malformed_answers_are_guest_errors(sock: Path) -> None:
    fake = FakeAgent(sock, lambda rid, verb, args: [f"{rid} ok notanumber - -"])
    try:
        with pytest.raises(GuestError, match="exit code"):
            GuestAgentClient(sock).exec(["x"], timeout=1)
    finally:
        fake.close()
    with pytest.raises(ValueError):
        GuestAgentClient(sock).exec([], timeout=1)


def test_a_queued_wake_sends_the_time_it_goes_out_not_when_it_was_asked(agent: FakeAgent, sock: Path) -> None:
    c = GuestAgentClient(sock)
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
    sent = float(next(x for x in agent.requests if x.verb == "wake").args[0])
    assert sent >= released  # not the time 0.6 s earlier, when wake() was called


def test_a_wait_ends_when_the_hypervisor_exits(tmp_path: Path) -> None:
    from mvm.guest.channels import VirtioSerialChannel

    alive = {"yes": True}
    channel = VirtioSerialChannel(tmp_path / "never.sock", alive=lambda: alive["yes"],
                                  last_words=lambda: "console:\nKernel panic - not syncing")
    threading.Timer(0.3, lambda: alive.update(yes=False)).start()
    # (without the watch this would end after the full minute, as "not ready after 60s")
    with pytest.raises(GuestError, match="the hypervisor exited while waiting for the guest agent") as e:
        GuestAgentClient(channel).wait_ready(timeout=60)
    assert "Kernel panic" in e.value.message


# ---------------------------------------------------------------- a hostile guest on the channel
# The guest is root in its VM and may replace the agent: whatever it sends, the host's memory
# stays bounded, a request ends with one clear error, and the next connection starts clean.


class RawPeer:
    """QEMU's chardev socket with a guest that writes what `script(conn, request)` says."""

    def __init__(self, path: Path, script: Script) -> None:
        self.script = script
        self.sent = 0
        self._server = UnixServer(path, self._session)

    @property
    def connections(self) -> int:
        return self._server.connections

    def _session(self, conn: socket.socket) -> None:
        for line in proto.lines(conn):
            req = Request.parse(line)
            if req is not None:
                self.script(conn, req)

    def send(self, conn: socket.socket, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        conn.sendall(raw)
        self.sent += len(raw)

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def peer(sock: Path) -> Iterator[Callable[[Script], RawPeer]]:
    made: list[RawPeer] = []

    def make(script: Script) -> RawPeer:
        made.append(RawPeer(sock, script))
        return made[-1]

    yield make
    for p in made:
        p.close()


def peak_memory(fn: Callable[[], object]) -> tuple[object, int]:
    """fn's result (or the exception it raised) and the most memory Python held meanwhile."""
    import tracemalloc

    tracemalloc.start()
    try:
        try:
            result: object = fn()
        except Exception as e:
            result = e
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_flood_without_newlines_ends_the_request_at_once(peer, sock: Path) -> None:  # type: ignore[no-untyped-def]
    """`cat /dev/zero > /dev/vport…`: no line ever ends. (Before: the buffer grew until the
    deadline, rescanned for a newline on every recv.)"""
    zeros = b"\0" * 65536  # (made here: the peer allocates nothing while measured)

    def flood(conn: socket.socket, req: Request) -> None:
        for _ in range(2000):  # 128 MiB, far more than the request may read
            p.send(conn, zeros)

    p = peer(flood)
    c = GuestAgentClient(sock)
    err, peak = peak_memory(lambda: c.ping(timeout=60))
    assert isinstance(err, GuestError)
    assert "not protocol lines" in err.message and "connection was reset" in err.message
    assert peak < 4 << 20
    assert c._sock is None  # dropped: the next request starts on a new connection


def test_an_answer_over_the_limit_is_an_error_and_the_next_request_works(peer, sock: Path) -> None:  # type: ignore[no-untyped-def]
    state = {"n": 0}
    long = b"A" * (5 << 20) + b"\n"  # (made here: the peer allocates nothing while measured)

    def answers(conn: socket.socket, req: Request) -> None:
        rid, args = req.rid, req.args
        state["n"] += 1
        if state["n"] == 1:  # our own id, then more than any answer to a ping may hold
            p.send(conn, f"{rid} ok ".encode())
            p.send(conn, long)
        else:
            p.send(conn, f"{rid} ok {args[0]}\n".encode())

    p = peer(answers)
    c = GuestAgentClient(sock)
    err, peak = peak_memory(lambda: c.ping(timeout=60))
    assert isinstance(err, GuestError) and "longer than 65536 bytes" in err.message
    assert peak < 4 << 20
    assert c.ping(timeout=10) < 10  # resynchronised: a new connection, and a clean one
    assert p.connections == 2


def test_stale_answers_are_skipped_without_being_kept(peer, sock: Path) -> None:  # type: ignore[no-untyped-def]
    """An answer to an exec the host gave up on may be long: skipped as it arrives."""
    stale = b"deadbeef ok 0 " + b"QUFB" * (2 << 20) + b" -\n"  # 8 MiB, not ours

    def answers(conn: socket.socket, req: Request) -> None:
        rid, args = req.rid, req.args
        p.send(conn, stale)
        p.send(conn, b"* hello mvm-agent 1\n")
        p.send(conn, f"{rid} ok {args[0]}\n".encode())

    p = peer(answers)
    result, peak = peak_memory(lambda: GuestAgentClient(sock).ping(timeout=60))
    assert isinstance(result, float)
    assert peak < 4 << 20


def test_endless_stale_lines_end_the_request(peer, sock: Path) -> None:  # type: ignore[no-untyped-def]
    """Well-formed lines for others, without end: bounded too (the stale budget)."""
    line64k = b"deadbeef ok " + b"A" * 65524 + b"\n"

    def answers(conn: socket.socket, req: Request) -> None:
        for _ in range(4000):  # 4000 x 64 KiB = 250 MiB offered
            p.send(conn, line64k)

    p = peer(answers)
    err, peak = peak_memory(lambda: GuestAgentClient(sock).ping(timeout=120))
    assert isinstance(err, GuestError) and "answers to other requests" in err.message
    assert peak < 4 << 20


def exec_answer(rid: str, out: bytes, err: bytes, *flags: str) -> str:
    return proto.exec_ok(rid, 0, out, err, *flags) + "\n"


def test_exec_output_cut_by_the_agent_is_flagged(peer, sock: Path) -> None:  # type: ignore[no-untyped-def]
    """A current agent takes the limit (`output-limit`) and says what it cut."""
    seen: list[str] = []

    def agent(conn: socket.socket, req: Request) -> None:
        rid, verb, args = req.rid, req.verb, req.args
        seen.append(verb)
        if verb == "output-limit":
            p.send(conn, f"{rid} ok {args[0]}\n".encode())
        else:
            p.send(conn, exec_answer(rid, b"x" * 1000, b"e", "stdout-truncated=5000"))

    p = peer(agent)
    r = GuestAgentClient(sock).exec(["yes"], timeout=5, output_limit=1000)
    assert seen == ["output-limit", "run"]
    assert (r.stdout, r.stderr, r.truncated, r.exit_code) == (b"x" * 1000, b"e", {"stdout": 5000}, 0)


def test_exec_output_of_an_agent_without_limits_is_cut_here(peer, sock: Path) -> None:  # type: ignore[no-untyped-def]
    """An agent from before output limits refuses `output-limit` and sends it all."""
    def old_agent(conn: socket.socket, req: Request) -> None:
        rid, verb = req.rid, req.verb
        if verb != "exec":
            p.send(conn, proto.err(rid, f"unknown verb: {verb}") + "\n")
        else:
            p.send(conn, exec_answer(rid, b"o" * 3000, b"e" * 10, "timeout"))

    p = peer(old_agent)
    r = GuestAgentClient(sock).exec(["yes"], timeout=5, output_limit=1000)
    assert (r.stdout, r.stderr, r.truncated, r.timed_out) == (b"o" * 1000, b"e" * 10, {"stdout": 3000}, True)


def test_exec_answer_beyond_its_limit_is_an_error_with_bounded_memory(peer, sock: Path) -> None:  # type: ignore[no-untyped-def]
    """A guest that ignores the limit: the default (16 MiB per stream) bounds what is read."""
    from mvm.guest.agent_client import EXEC_OUTPUT_LIMIT, exec_frame

    block = b"A" * 65536

    def liar(conn: socket.socket, req: Request) -> None:
        rid = req.rid
        p.send(conn, f"{rid} ok 0 ".encode())
        for _ in range(exec_frame(EXEC_OUTPUT_LIMIT) // 65536 + 64):
            p.send(conn, block)

    p = peer(liar)
    err, peak = peak_memory(lambda: GuestAgentClient(sock).exec(["yes"], timeout=60))
    assert isinstance(err, GuestError) and "longer than" in err.message
    assert "--max-output" in (err.hint or "")
    assert peak < exec_frame(EXEC_OUTPUT_LIMIT) * 1.3


@pytest.mark.parametrize("bad", ["zz", "7 - - frob", "0 !!!! -", "0 - -" + " timeout" * 10])
def test_malformed_exec_answers_are_one_line_errors(peer, sock: Path, bad: str) -> None:  # type: ignore[no-untyped-def]
    p = peer(lambda conn, req: p.send(conn, proto.ok(req.rid, bad) + "\n"))
    with pytest.raises(GuestError):
        GuestAgentClient(sock).exec(["x"], timeout=5)


@pytest.mark.parametrize("timeout", [-1.0, 0.0, float("nan"), float("inf"), 1e300, 86401.0])
def test_exec_timeout_out_of_range_is_refused_before_anything_is_sent(sock: Path, timeout: float) -> None:
    from mvm.errors import InvalidInput

    with pytest.raises(InvalidInput, match=r"--timeout must be more than 0 and at most 86400 seconds"):
        GuestAgentClient(sock).exec(["true"], timeout=timeout)  # (no socket there: nothing was tried)


def test_a_refusal_from_the_guest_is_shown_escaped(peer, sock: Path) -> None:  # type: ignore[no-untyped-def]
    evil = "\x1b]0;owned\x07\x1b[2J"
    p = peer(lambda conn, req: p.send(conn, proto.err(req.rid, evil) + "\n"))
    with pytest.raises(GuestError) as e:
        GuestAgentClient(sock).ping(timeout=5)
    assert "\x1b" not in e.value.message and "\\x1b]0;owned\\x07" in e.value.message


def test_the_rest_of_an_answer_torn_by_an_earlier_host_is_skipped(peer, sock: Path) -> None:  # type: ignore[no-untyped-def]
    """A command that went away while a long exec answer came (Ctrl-C): the guest writes the
    rest when the next host connects. It is protocol text, however long: skipped, not an error."""
    rest = b"QUFB" * (2 << 20) + b" - stdout-truncated=99999999\n"  # 8 MiB without its id

    def answers(conn: socket.socket, req: Request) -> None:
        rid, args = req.rid, req.args
        p.send(conn, rest)
        p.send(conn, f"{rid} ok {args[0]}\n".encode())

    p = peer(answers)
    result, peak = peak_memory(lambda: GuestAgentClient(sock).ping(timeout=60))
    assert isinstance(result, float)
    assert peak < 4 << 20


def test_reading_a_long_answer_looks_at_each_byte_once(peer, sock: Path) -> None:  # type: ignore[no-untyped-def]
    """Linear in the data: a long answer arriving in small pieces is searched for its newline
    once, not again from its start at every piece (which cost a flooding guest's host a core)."""
    out = b"x" * (3 << 20)
    answer_b64 = b64(out).encode()

    def agent(conn: socket.socket, req: Request) -> None:
        rid, verb, args = req.rid, req.verb, req.args
        if verb == "ping":
            p.send(conn, f"{rid} ok {args[0]}\n".encode())
            return
        data = f"{rid} ok 0 ".encode() + answer_b64 + b" -\n"
        for i in range(0, len(data), 4096):
            p.send(conn, data[i:i + 4096])

    class Counting(bytearray):
        """The client's receive buffer, counting the bytes its newline searches look at."""

        looked_at = 0

        def find(self, sub, start=0, end=None):  # type: ignore[no-untyped-def,override]
            end = len(self) if end is None else end
            found = super().find(sub, start, end)
            Counting.looked_at += max(0, (found + len(sub) if found >= 0 else end) - start)
            return found

    p = peer(agent)
    c = GuestAgentClient(sock)
    c.ping(timeout=10)  # connected
    c._buf = Counting()
    assert c.exec(["cat"], timeout=60).stdout == out
    # once for the newline, once to split the fields (before: 51 times, and more the longer)
    assert Counting.looked_at < 3 * len(answer_b64)
