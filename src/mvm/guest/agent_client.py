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
AgentClient per instance and do not share it between processes.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mvm.errors import GuestError
from mvm.guest.channels import AgentChannel, VirtioSerialChannel

AGENT_PORT_NAME = "mvm.agent"  # the virtserialport name the guest agent looks for
EXEC_GRACE = 10.0  # host waits this much longer than the guest-side exec timeout
DISCARD_LINE = b"\x01\n"  # sent first on every connection; see _connect
_HINT = "look at the instance's console log; the guest may still be booting or hung"


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class _Timeout(Exception):
    pass


class AgentClient:
    """Talks to one guest's agent over a channel. Connects lazily and reconnects after the
    socket drops (e.g. after a snapshot restore the new QEMU has a new socket). Waits end
    early when the channel says its hypervisor is gone."""

    def __init__(self, channel: AgentChannel | Path, *, connect_timeout: float = 5.0) -> None:
        self.channel: AgentChannel = (VirtioSerialChannel(channel) if isinstance(channel, Path)
                                      else channel)
        self.socket_path = self.channel.path
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._lock = threading.Lock()

    # -------------------------------------------------------------- public verbs

    def wait_ready(self, timeout: float) -> None:
        """Block until the agent answers a ping: the boot (or restore) handshake.

        Pings with a fresh nonce each try; an answer to any of them counts, since the
        guest may read pings queued before its agent opened the port.
        """
        deadline = time.monotonic() + timeout
        nonces: set[str] = set()
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
                nonce = secrets.token_hex(8)
                nonces.add(nonce)
                try:
                    self._send(f"{_new_id()} ping {nonce}")
                    try_deadline = min(deadline, time.monotonic() + per_try)
                    while True:
                        fields = self._read_fields(try_deadline)
                        if len(fields) == 3 and fields[1] == "ok" and fields[2] in nonces:
                            return
                except _Timeout:
                    last_error = "no answer to ping"
                    per_try = min(per_try * 1.5, 1.0)
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

    def exec(self, argv: Sequence[str | bytes], timeout: float = 60.0) -> ExecResult:
        """Run argv in the guest (no shell; stdin /dev/null); the guest kills it at timeout."""
        if not argv:
            raise ValueError("exec needs a command")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        args = [_b64(a if isinstance(a, bytes) else os.fsencode(a)) for a in argv]
        fields = self._request("exec", [f"{timeout:.3f}", *args], timeout + EXEC_GRACE)
        if len(fields) not in (3, 4) or (len(fields) == 4 and fields[3] != "timeout"):
            raise GuestError(f"malformed exec answer from guest agent: {fields[:4]!r}", _HINT)
        try:
            code = int(fields[0])
        except ValueError as e:
            raise GuestError(f"malformed exit code from guest agent: {fields[0]!r}") from e
        return ExecResult(exit_code=code, stdout=_unb64(fields[1]), stderr=_unb64(fields[2]),
                          timed_out=len(fields) == 4)

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

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- plumbing

    def _request(self, verb: str, args: list[str] | Callable[[], list[str]], timeout: float) -> list[str]:
        """One request; `args` may be a function, called right before the line is sent."""
        deadline = time.monotonic() + timeout
        rid = _new_id()
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
                while True:
                    fields = self._read_fields(deadline)
                    if fields and fields[0] == rid:
                        break
            except _Timeout:
                self._check_alive(f"while waiting for the answer to {verb}")
                raise GuestError(
                    f"guest agent did not answer {verb} within {timeout:g}s", _HINT) from None
            except OSError as e:
                self._drop()
                self._check_alive(f"during {verb}")
                raise GuestError(
                    f"guest agent at {self.socket_path}: {e.strerror or e}", _HINT) from e
        if len(fields) >= 2 and fields[1] == "ok":
            return fields[2:]
        if len(fields) >= 3 and fields[1] == "err":
            msg = _unb64(fields[2]).decode(errors="replace")
            raise GuestError(f"guest agent refused {verb}: {msg}")
        raise GuestError(f"malformed answer to {verb} from guest agent: {fields[:3]!r}", _HINT)

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
        self._buf.clear()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._buf.clear()

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

    def _read_fields(self, deadline: float) -> list[str]:
        """The next line from the guest, split on single spaces."""
        assert self._sock is not None
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                raw = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                return raw.decode("ascii", errors="replace").rstrip("\r").split(" ")
            left = _left(deadline)
            if left <= 0:
                raise _Timeout
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(1 << 16)
            except TimeoutError:
                raise _Timeout from None
            if not chunk:
                raise ConnectionResetError(0, "QEMU closed the agent socket (VM gone?)")
            self._buf += chunk


def _left(deadline: float) -> float:
    return deadline - time.monotonic()


def _new_id() -> str:
    return secrets.token_hex(4)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode() if data else "-"


def _unb64(field: str) -> bytes:
    if field in ("", "-"):
        return b""
    try:
        return base64.b64decode(field, validate=True)
    except (binascii.Error, ValueError) as e:
        raise GuestError(f"guest agent sent invalid base64 ({len(field)} chars)") from e
