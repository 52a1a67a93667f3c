"""Host side of the guest agent protocol, over QEMU's virtio-serial chardev Unix socket.

QEMU: `-chardev socket,id=agent,path=<run>/agent.sock,server=on,wait=off
-device virtio-serial-device -device virtserialport,chardev=agent,name=mvm.agent`.

Protocol (the guest side is src/mvm/data/guest/agent): one line per request
`<id> <verb> <args...>`, one line per response `<id> <status> <fields...>`, single spaces,
payloads base64 with `-` for the empty payload. The guest answers one request at a time.
Every connection starts with the line `\x01`, which the agent discards (with any partial
line before it).
Lines whose id is not the one we wait for — answers to requests we gave up on, the
agent's own `* hello` lines, data from before a snapshot — are skipped, so the
connection needs no resynchronisation. QEMU serves one client at a time: use one
GuestAgentClient per instance and do not share it between processes.

The guest is root in its VM and may replace the agent, so every byte on the channel is
hostile until parsed, and what it can cost the host is bounded:
- a line we wait for holds at most `MAX_LINE` bytes (an exec's answer: its output limit in
  base64), or the request fails and the connection is dropped (the next one starts clean);
- lines we do not wait for are skipped as they arrive, never kept: per request at most
  `STALE_LIMIT` bytes of protocol text (answers to requests given up on, or the rest of one
  torn when a host went away: either may be a whole exec's output) and `NOISE_LIMIT` bytes
  of anything else (binary, control bytes);
- reading is linear in the data: each byte is looked at for a newline once;
- exec output is cut at a limit per stream (`EXEC_OUTPUT_LIMIT` unless asked otherwise),
  by the agent (`output-limit` request; an old agent that does not know it is cut here),
  and the result says which streams were cut and how long they were.

An exec says for certain whether its command started: it asks with `run`, the agent answers
`ready` and starts the command only when the host's `go` follows. A failure before `go` was
sent is the `GuestError` it always was (the command did not start); after, it is `ExecLost`.
An agent from before `run` (it answers "unknown verb") gets `exec`, after which any failure
is `ExecLost` too: it may have started.
"""

from __future__ import annotations

import binascii
import contextlib
import math
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mvm.errors import ExecLost, GuestError, InvalidInput
from mvm.guest.channels import AgentChannel, VirtioSerialChannel
from mvm.util.text import printable

AGENT_PORT_NAME = "mvm.agent"  # the virtserialport name the guest agent looks for
EXEC_GRACE = 10.0  # host waits this much longer than the guest-side exec timeout
#: Seconds of silence while waiting for an answer after which the channel is asked whether the
#: hypervisor still answers its control socket (it has its own deadline): a hung one ends the
#: wait then, not at the request's timeout.
SILENCE_CHECK = 2.0
MAX_EXEC_TIMEOUT = 24 * 3600.0
#: Bytes of stdout, and of stderr, an exec returns by default (the agent's default too).
EXEC_OUTPUT_LIMIT = 16 << 20
#: The most an exec may be asked to return per stream (it is held in memory, twice).
MAX_EXEC_OUTPUT_LIMIT = 256 << 20
#: An answer other than exec's (ping, wake, sleep-prep, a refusal) is a short line.
MAX_LINE = 64 << 10
#: Bytes of lines that are not protocol lines, skipped per request before giving up.
NOISE_LIMIT = 64 << 10
DISCARD_LINE = b"\x01\n"  # sent first on every connection; see _connect
_HINT = "look at the instance's console log; the guest may still be booting or hung"
_ID = re.compile(rb"[A-Za-z0-9._:*-]{1,64}")
_PROTOCOL_TEXT = re.compile(rb"[A-Za-z0-9+/=._:* -]*")  # ids, verbs, numbers, base64, flags
_ID_MAX = 64
_EXEC_FLAGS = ("timeout", "stdout-truncated", "stderr-truncated")


def exec_frame(output_limit: int) -> int:
    """The longest exec answer an agent sends with this output limit per stream."""
    return 2 * 4 * math.ceil(output_limit / 3) + 256


#: Bytes of well-formed lines for others skipped per request (a stale exec answer fits).
STALE_LIMIT = exec_frame(EXEC_OUTPUT_LIMIT)


def check_exec_limits(timeout: float, output_limit: int) -> None:
    """Refuse a timeout or output limit out of range (nan and inf included), with one line."""
    if not 0 < timeout <= MAX_EXEC_TIMEOUT:  # (nan fails both comparisons)
        raise InvalidInput(f"--timeout must be more than 0 and at most {MAX_EXEC_TIMEOUT:g} "
                           f"seconds (got {timeout:g})", "give the seconds the command may run")
    if not 0 <= output_limit <= MAX_EXEC_OUTPUT_LIMIT:
        raise InvalidInput(f"--max-output must be between 0 and {MAX_EXEC_OUTPUT_LIMIT} bytes "
                           f"(got {output_limit})",
                           "give the bytes of stdout (and of stderr) to keep, e.g. 16M")


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    #: Streams cut at the output limit ("stdout", "stderr") → bytes the command wrote to it.
    truncated: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class _Timeout(Exception):
    pass


class _Refused(GuestError):
    """The agent answered `err`: it read the request and said no (and for an exec, ran nothing)."""

    def __init__(self, message: str, guest_message: str) -> None:
        super().__init__(message)
        #: An agent that does not know the verb; one from before `run` says either.
        self.unknown_verb = guest_message.startswith(("unknown verb:", "request line too long"))


class GuestAgentClient:
    """Talks to one guest's agent over a channel. Connects lazily and reconnects after the
    socket drops (e.g. after a snapshot restore the new QEMU has a new socket). Waits end
    early when the channel says its hypervisor is gone."""

    def __init__(self, channel: AgentChannel | Path, *, connect_timeout: float = 5.0) -> None:
        self.channel: AgentChannel = (VirtioSerialChannel(channel) if isinstance(channel, Path)
                                      else channel)
        self.socket_path = self.channel.path
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        # What was received and not yet consumed; a line always starts at its index 0.
        self._buf = bytearray()
        self._scanned = 0  # bytes of the line at the front already searched for its newline
        self._skipping: str | None = None  # "noise" or "stale": dropping a line's rest
        self._lock = threading.Lock()

    # -------------------------------------------------------------- public verbs

    def wait_ready(self, timeout: float) -> None:
        """Block until the agent answers a ping: the boot (or restore) handshake.

        Pings with a fresh id and nonce each try; an answer to any of them counts, since the
        guest may read pings queued before its agent opened the port.
        """
        deadline = time.monotonic() + timeout
        nonces: set[str] = set()
        ids: set[bytes] = set()
        per_try = 0.25
        last_error = "no answer"
        with self._lock:
            while True:
                self._check_alive("while waiting for the guest agent")
                if time.monotonic() >= deadline:
                    raise GuestError(
                        f"guest agent at {self.socket_path} not ready after {timeout:g}s "
                        f"({last_error})", _HINT)
                if self._sock is None:
                    try:
                        self._connect(min(self.connect_timeout, _left(deadline)))
                    except OSError as e:
                        last_error = f"cannot connect: {e.strerror or e}"
                        time.sleep(min(0.02, max(_left(deadline), 0)))  # socket not there yet
                        continue
                nonce, rid = secrets.token_hex(8), _new_id()
                nonces.add(nonce)
                ids.add(rid.encode())
                try:
                    self._send(f"{rid} ping {nonce}")
                    try_deadline = min(deadline, time.monotonic() + per_try)
                    spent: dict[str, int] = {}
                    while True:
                        fields = _fields(self._read_line(try_deadline, MAX_LINE, ids.__contains__,
                                                         spent))
                        if len(fields) == 3 and fields[1] == "ok" and fields[2] in nonces:
                            return
                except _Timeout:
                    last_error = "no answer to ping"
                    per_try = min(per_try * 1.5, 1.0)
                except _Overrun as e:
                    raise GuestError(f"guest agent sent {e} while mvm waited for its answer to "
                                     "ping; the connection was reset", e.hint) from None
                except OSError as e:
                    last_error = f"connection lost: {e}"
                    self._drop()
                    time.sleep(min(0.02, max(_left(deadline), 0)))

    def ping(self, timeout: float = 5.0) -> float:
        """Round trip to the agent; returns its duration in seconds."""
        nonce = secrets.token_hex(8)
        start = time.monotonic()
        fields = self._request("ping", [nonce], timeout)
        if fields != [nonce]:
            raise GuestError(f"guest agent answered ping with {fields!r}", _HINT)
        return time.monotonic() - start

    def exec(self, argv: Sequence[str | bytes], timeout: float = 60.0,
             output_limit: int = EXEC_OUTPUT_LIMIT) -> ExecResult:
        """Run argv in the guest (no shell; stdin /dev/null); the guest kills it at timeout.
        Keeps at most `output_limit` bytes of stdout and of stderr (see `ExecResult.truncated`)."""
        if not argv:
            raise ValueError("exec needs a command")
        check_exec_limits(timeout, output_limit)
        if output_limit != EXEC_OUTPUT_LIMIT:
            # (an agent from before output limits refuses it: the output is then cut here)
            with contextlib.suppress(_Refused):
                self._request("output-limit", [str(output_limit)], min(timeout, 10.0))
        args = [f"{timeout:.3f}", *(_b64(a if isinstance(a, bytes) else os.fsencode(a)) for a in argv)]
        frame = exec_frame(max(output_limit, EXEC_OUTPUT_LIMIT))
        try:
            line = self._request_line("run", args, timeout + EXEC_GRACE, frame, confirm=True)
        except _Refused as e:
            if not e.unknown_verb:
                raise
            # An agent from before `run`: it ran nothing, and runs `exec` on the request alone.
            line = self._request_line("exec", args, timeout + EXEC_GRACE, frame, confirm=False)
        return _exec_result(line, output_limit)

    def sleep_prep(self, timeout: float = 30.0) -> None:
        """Before a snapshot: the guest syncs its disks and drops its clean caches."""
        self._request("sleep-prep", [], timeout)

    def wake(self, now: float | None = None, timeout: float = 10.0, fresh_secrets: bool = False) -> None:
        """After a restore: set the guest clock (to the second); with `fresh_secrets` the
        guest re-reads the secrets disk, whose content changed while it slept."""
        # The time is read when the request goes out (after the lock and the connection), not
        # before: a wake queued behind another request must not send a stale time.
        def args() -> list[str]:
            t = time.time() if now is None else now
            return [f"{t:.6f}", *(["fresh"] if fresh_secrets else [])]

        self._request("wake", args, timeout)

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> GuestAgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- plumbing

    def _request(self, verb: str, args: list[str] | Callable[[], list[str]], timeout: float) -> list[str]:
        """One request with a short answer; returns the fields after `ok`."""
        fields = _fields(self._request_line(verb, args, timeout, MAX_LINE))
        if len(fields) >= 2 and fields[1] == "ok":
            return fields[2:]
        raise GuestError(f"malformed answer to {verb} from guest agent: {fields[:3]!r}", _HINT)

    def _request_line(self, verb: str, args: list[str] | Callable[[], list[str]], timeout: float,
                      limit: int, confirm: bool | None = None) -> bytearray:
        """One request; returns its answer line (at most `limit` bytes), refusals raised.
        `args` may be a function, called right before the line is sent.

        An exec's (`confirm` not None): with `confirm`, the first answer must be `ready` and
        the host then sends `go`; any failure once the command may have started (after `go`, or
        after the request itself without `confirm`) is `ExecLost`."""
        may_run: list[bool] = []  # (set once the guest may run the command)
        try:
            return self._exchange(verb, args, timeout, limit, confirm, may_run)
        except _Refused:
            raise  # (the agent ran nothing)
        except GuestError as e:
            if not may_run:
                raise
            how = ("the guest was told to start it" if confirm else
                   "the request reached an agent that starts it at once (one from before `run`)")
            raise ExecLost(f"the command's result was lost: {how}, then {e.message}",
                           "it ran, or runs still: look at what it does before running it again"
                           ) from e

    def _exchange(self, verb: str, args: list[str] | Callable[[], list[str]], timeout: float,
                  limit: int, confirm: bool | None, may_run: list[bool]) -> bytearray:
        deadline = time.monotonic() + timeout
        rid = _new_id()
        said = "exec" if verb == "run" else verb  # (`run` is how an exec is asked for now)
        with self._lock:
            try:
                if self._sock is None:
                    self._connect(min(self.connect_timeout, timeout))
                line = " ".join([rid, verb, *(args() if callable(args) else args)])
                try:
                    self._send(line, deadline)
                except (BrokenPipeError, ConnectionResetError, ConnectionRefusedError):
                    # A connection left over from a QEMU that is gone (e.g. before a
                    # restore): nothing was delivered, so sending again is safe.
                    self._drop()
                    self._connect(min(self.connect_timeout, max(_left(deadline), 0.001)))
                    self._send(line, deadline)
                answer = None
                if confirm:
                    first = self._read_line(deadline, limit, rid.encode().__eq__, {})
                    if first != f"{rid} ready".encode():
                        answer = first  # (a refusal; or, from an odd agent, an answer)
                    else:
                        # Sent whole, or not at all: a line torn by a dropped connection is
                        # dropped by the agent, and the command does not start.
                        self._send(f"{rid} go", deadline)
                if answer is None:
                    if confirm is not None:
                        may_run.append(True)
                    answer = self._read_line(deadline, limit, rid.encode().__eq__, {})
            except _Timeout:
                self._check_alive(f"while waiting for the answer to {said}")
                raise GuestError(
                    f"guest agent did not answer {said} within {timeout:g}s", _HINT) from None
            except _Silent as e:
                self._drop()
                raise GuestError(f"the hypervisor does not answer (during {said}): {e}",
                                 "it is ended after its pool's unresponsive grace and started "
                                 "again by the agent or `mvm pool scale`; or stop the instance") from None
            except _Overrun as e:
                raise GuestError(f"guest agent sent {e} while mvm waited for its answer to {said}; "
                                 "the connection was reset", e.hint) from None
            except OSError as e:
                self._drop()
                self._check_alive(f"during {said}")
                raise GuestError(
                    f"guest agent at {self.socket_path}: {e.strerror or e}", _HINT) from e
        head = bytes(answer[:len(rid) + 5]).split(b" ")
        if len(head) > 1 and head[1] == b"err":
            fields = _fields(answer[:MAX_LINE])
            msg = _unb64(fields[2]).decode(errors="replace") if len(fields) >= 3 else "?"
            raise _Refused(f"guest agent refused {verb}: {printable(msg)}", msg)
        return answer

    def _check_alive(self, when: str) -> None:
        if not self.channel.alive():
            words = self.channel.last_words()
            raise GuestError(f"the hypervisor exited {when}" + (f"\n{words}" if words else ""),
                             "look at `mvm instance logs` for the guest's console")

    def _connect(self, timeout: float) -> None:
        s = self.channel.connect(timeout)
        try:
            # A line that a previous connection left unfinished (its host died or gave
            # up mid-send) must not run glued to our first request: \001 ends it, and the
            # agent drops every line that contains one.
            s.sendall(DISCARD_LINE)
        except OSError:
            s.close()
            raise
        self._sock = s
        self._reset_buffer()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._reset_buffer()

    def _reset_buffer(self) -> None:
        self._buf = bytearray()
        self._scanned = 0
        self._skipping = None

    def _send(self, line: str, deadline: float | None = None) -> None:
        assert self._sock is not None
        if deadline is not None:
            left = _left(deadline)
            if left <= 0:
                raise _Timeout
            self._sock.settimeout(left)
        try:
            self._sock.sendall(line.encode() + b"\n")
        except TimeoutError:
            # A partial line would corrupt the next request: start over on a new connection.
            self._drop()
            raise _Timeout from None

    def _read_line(self, deadline: float, limit: int, wanted: Callable[[bytes], bool],
                   spent: dict[str, int]) -> bytearray:
        """The next line whose id `wanted` accepts, without its newline. Lines for others are
        dropped as they arrive, counted in `spent` against their limits. A wanted line longer
        than `limit`, or too much skipped, drops the connection and raises _Overrun."""
        while True:
            line = self._take_line(limit, wanted, spent)
            if line is not None:
                return line
            self._recv(deadline)

    def _take_line(self, limit: int, wanted: Callable[[bytes], bool],
                   spent: dict[str, int]) -> bytearray | None:
        buf = self._buf
        while buf:
            if self._skipping is not None:
                nl = buf.find(b"\n")
                n = len(buf) if nl < 0 else nl + 1
                del buf[:n]
                self._spend(spent, self._skipping, n)
                if nl >= 0:
                    self._skipping = None
                continue
            # A line is told by its first bytes (at most an id and a space), never by more.
            head = bytes(buf[:_ID_MAX + 1])
            nl = head.find(b"\n")
            sp = head.find(b" ", 0, nl if nl >= 0 else len(head))
            if sp >= 0 and _ID.fullmatch(head[:sp]) and wanted(head[:sp]):
                nl = buf.find(b"\n", self._scanned)
                if nl < 0:
                    if len(buf) > limit:
                        raise self._overrun(f"an answer longer than {limit} bytes", _limit_hint(limit))
                    self._scanned = len(buf)
                    return None
                if nl > limit:
                    raise self._overrun(f"an answer longer than {limit} bytes", _limit_hint(limit))
                self._buf = buf[nl + 1:]
                self._scanned = 0
                del buf[nl:]
                return buf
            if sp < 0 and nl < 0 and len(buf) <= _ID_MAX:
                return None  # the id may go on
            # Not for us. Protocol text (a line for another request, or the rest of one torn
            # when an earlier host went away, which may be a whole exec's output) counts as
            # stale; anything else (binary, control bytes) as noise.
            kind = "stale" if _PROTOCOL_TEXT.fullmatch(head[:nl] if nl >= 0 else head) else "noise"
            if nl >= 0:
                del buf[:nl + 1]
                self._spend(spent, kind, nl + 1)
            else:
                self._skipping = kind
        return None

    def _spend(self, spent: dict[str, int], kind: str, n: int) -> None:
        spent[kind] = spent.get(kind, 0) + n
        limit = NOISE_LIMIT if kind == "noise" else STALE_LIMIT
        if spent[kind] > limit:
            what = ("bytes that are not protocol lines" if kind == "noise"
                    else "bytes of answers to other requests")
            raise self._overrun(f"more than {limit} {what}",
                                "the guest's agent is not mvm's, or it is broken: "
                                "restart the instance")

    def _overrun(self, what: str, hint: str) -> _Overrun:
        self._drop()
        return _Overrun(what, hint)

    def _recv(self, deadline: float) -> None:
        """More bytes, by the deadline; every `SILENCE_CHECK` seconds of silence the channel is
        asked whether its hypervisor still answers (`_Silent` when it does not)."""
        assert self._sock is not None
        while True:
            left = _left(deadline)
            if left <= 0:
                raise _Timeout
            self._sock.settimeout(min(left, SILENCE_CHECK))
            try:
                chunk = self._sock.recv(1 << 16)
                break
            except TimeoutError:
                if left <= SILENCE_CHECK:
                    raise _Timeout from None
                if cause := self.channel.unanswered():
                    raise _Silent(cause) from None
        if not chunk:
            raise ConnectionResetError(0, "QEMU closed the agent socket (VM gone?)")
        self._buf += chunk


class _Silent(Exception):
    """The hypervisor does not answer its control socket (the message: why)."""


class _Overrun(Exception):
    def __init__(self, what: str, hint: str) -> None:
        super().__init__(what)
        self.hint = hint


def _limit_hint(limit: int) -> str:
    if limit > MAX_LINE:
        return ("the guest's agent did not keep to the output limit: rebuild the pool for "
                "the current agent, or give a larger --max-output")
    return "the guest's agent is not mvm's, or it is broken: restart the instance"


def _fields(line: bytes | bytearray) -> list[str]:
    """A short line split on single spaces."""
    return line.decode("ascii", errors="replace").rstrip("\r").split(" ")


def _exec_result(line: bytearray, output_limit: int) -> ExecResult:
    """`<id> ok <exit> <b64 stdout> <b64 stderr> [timeout] [stdout-truncated=N] [stderr-truncated=N]`,
    parsed without copying the (long) line."""
    spans: list[tuple[int, int]] = []
    start = 0
    while len(spans) < 5 + len(_EXEC_FLAGS):
        end = line.find(b" ", start)
        spans.append((start, len(line) if end < 0 else end))
        if end < 0:
            break
        start = end + 1
    else:
        raise GuestError("malformed exec answer from guest agent: too many fields", _HINT)
    if len(spans) < 5:
        raise GuestError(f"malformed exec answer from guest agent: {_fields(line[:200])[:5]!r}",
                         _HINT)
    view = memoryview(line)
    try:
        code_field = bytes(view[spans[2][0]:spans[2][1]])
        try:
            code = int(code_field)
        except ValueError:
            raise GuestError(f"malformed exit code from guest agent: {code_field[:20]!r}") from None
        timed_out = False
        truncated: dict[str, int] = {}
        for a, b in spans[5:]:
            flag = bytes(view[a:b]).decode("ascii", errors="replace")
            name, _, value = flag.partition("=")
            if flag == "timeout":
                timed_out = True
            elif name in ("stdout-truncated", "stderr-truncated") and value.isdigit():
                truncated[name.split("-")[0]] = int(value)
            else:
                raise GuestError(f"malformed exec answer from guest agent: flag {flag[:40]!r}",
                                 _HINT)
        streams = [_unb64(view[a:b]) for a, b in spans[3:5]]
    finally:
        view.release()
    for n, name in enumerate(("stdout", "stderr")):
        if len(streams[n]) > output_limit:  # an agent that does not know the limit
            truncated[name] = len(streams[n])
            streams[n] = streams[n][:output_limit]
    return ExecResult(exit_code=code, stdout=streams[0], stderr=streams[1], timed_out=timed_out,
                      truncated=truncated)


def _left(deadline: float) -> float:
    return deadline - time.monotonic()


def _new_id() -> str:
    return secrets.token_hex(4)


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode() if data else "-"


def _unb64(field: str | bytes | memoryview) -> bytes:
    if isinstance(field, str):
        field = field.encode("ascii", errors="replace")
    if len(field) == 0 or field == b"-":
        return b""
    try:
        return binascii.a2b_base64(field, strict_mode=True)
    except (binascii.Error, ValueError) as e:
        raise GuestError(f"guest agent sent invalid base64 ({len(field)} chars)") from e
