"""The guest agent's line protocol (src/mvm/data/guest/agent), written once for the tests.

Tests that play the agent (a double behind a socket) or talk to a real one by hand parse and
write its lines here, not each in its own way. This is the tests' own reading of the protocol,
kept apart from the host's client (mvm.guest.agent_client) so that a mistake there is not
copied into what the tests expect:

    request  `<id> <verb> <arg>...`            (exec: `<id> exec <timeout> <b64 argv>...`)
    answer   `<id> ok <field>...`              (exec: `<id> ok <exit> <b64 out> <b64 err> [flags]`)
             `<id> err <b64 message>`
    noise    `* hello mvm-agent 1` (a new connection), and answers to requests of other hosts

Base64 fields are `-` when empty; a host starts each connection with `\\x01\\n`, which ends a
line an earlier host left torn.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from dataclasses import dataclass

HELLO = "* hello mvm-agent 1"
#: What a host sends first on a connection: ends any line torn by an earlier host.
RESYNC = b"\x01\n"


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode() if raw else "-"


def unb64(field: str | bytes) -> bytes:
    text = field.decode() if isinstance(field, bytes) else field
    return b"" if text == "-" else base64.b64decode(text, validate=True)


def _fields(line: str | bytes) -> list[str]:
    text = line.decode(errors="replace") if isinstance(line, bytes) else line
    return text.rstrip("\r\n").split(" ")


@dataclass(frozen=True)
class Request:
    rid: str
    verb: str
    args: list[str]

    @classmethod
    def parse(cls, line: str | bytes) -> Request | None:
        """A request line; None for the resync byte or a blank line, which the agent skips."""
        raw = line.encode() if isinstance(line, str) else line
        if b"\x01" in raw or not raw.strip():
            return None
        rid, verb, *args = _fields(raw)
        return cls(rid, verb, args)

    @property
    def argv(self) -> list[bytes]:
        """An exec's command line (after its timeout)."""
        assert self.verb == "exec", self
        return [unb64(a) for a in self.args[1:]]

    @property
    def timeout(self) -> float:
        assert self.verb == "exec", self
        return float(self.args[0])


def request(rid: str, verb: str, *args: str) -> str:
    return " ".join([rid, verb, *args])


def exec_request(rid: str, timeout: float, argv: list[str | bytes]) -> str:
    return request(rid, "exec", f"{timeout:g}", *(b64(a) for a in argv))


@dataclass(frozen=True)
class Answer:
    rid: str
    ok: bool
    fields: list[str]

    @classmethod
    def parse(cls, line: str | bytes) -> Answer | None:
        """An answer line; None for the agent's `* hello` line."""
        f = _fields(line)
        if f[:2] == ["*", "hello"]:
            return None
        assert len(f) >= 2 and f[1] in ("ok", "err"), f"not an agent answer: {line!r}"
        return cls(f[0], f[1] == "ok", f[2:])

    @property
    def message(self) -> str:
        assert not self.ok, self
        return unb64(self.fields[0]).decode(errors="replace")

    @property
    def exit_code(self) -> int:
        return int(self.fields[0])

    @property
    def stdout(self) -> bytes:
        return unb64(self.fields[1])

    @property
    def stderr(self) -> bytes:
        return unb64(self.fields[2])

    @property
    def flags(self) -> list[str]:
        return self.fields[3:]


def ok(rid: str, *fields: str) -> str:
    return " ".join([rid, "ok", *fields])


def err(rid: str, message: str) -> str:
    return f"{rid} err {b64(message)}"


def exec_ok(rid: str, code: int, out: bytes = b"", err: bytes = b"", *flags: str) -> str:
    return " ".join([rid, "ok", str(code), b64(out), b64(err), *flags])


def lines(conn: socket.socket) -> Iterator[bytes]:
    """The lines a peer sends on `conn` (without their newline) until it closes or resets."""
    buf = b""
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
            yield line
