"""A DOUBLE of QEMU's QMP monitor (not QEMU): strict about what QMP refuses.

Written from QEMU's QMP specification (docs/interop/qmp-spec) and its QAPI schema, no code of
it. It greets (`{"QMP": {...}}`), refuses every command before `qmp_capabilities` and that
one after it, refuses unknown commands and unknown, missing or mistyped arguments, each with
QMP's own error class (`CommandNotFound`, `GenericError`) and text, and echoes each command's
`id`. qemu.qmp sends JSON without a trailing newline, so the stream is split with
`JSONDecoder.raw_decode`, never `readline()`. Like QEMU it serves one client at a time with a
listen backlog of one, and takes descriptors passed with SCM_RIGHTS for `getfd`.

Its VM is a RunState (qapi/run-state.json) and nothing runs: `stop` and `cont` move it between
`running` and `paused` (events STOP, RESUME); `migrate` to `fd:<name>` writes a stream that
starts with QEMU's `QEVM` magic into that descriptor and ends in `postmigrate`, or — with
`max-bandwidth` below `SLOW_BANDWIDTH` — stays `active` until `migrate_cancel`;
`migrate-incoming` into a monitor started with `incoming` loads such a stream and leaves the VM
`paused`; `system_powerdown` sends POWERDOWN, which its guest ignores (a guest without ACPI
handling); `quit` answers, sends SHUTDOWN and ends the session for good.

Two faces: `Monitor(path)` serves in a thread of the test (a handler can override any answer);
run as QEMU is run, `python tests/doubles/qmp.py <QEMU's arguments>` (e.g. as QemuRuntime's
binary, through a script), it reads from QEMU's arguments the QMP and agent sockets, the
console, `-pidfile`, `-D`, `-daemonize` and `-incoming defer -S`, daemonizes as QEMU does
(the parent exits once the sockets listen), and ends at `quit` or on a failed incoming
migration (QEMU exits then too, its reason in the `-D` log). A jailed QEMU's descriptors
(`fd=`) are not simulated. Test seam (environment): `QMP_DOUBLE_STATE=<RunState>` starts its
VM in that state (e.g. `io-error`, `guest-panicked`).

Standard library only: it runs as a script.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                    "capabilities": []}}
QEVM_MAGIC = b"QEVM"
#: A `max-bandwidth` below this keeps an outgoing migration `active` (until cancelled).
SLOW_BANDWIDTH = 64 * 1024**2
NEGOTIATE = "Expecting capabilities negotiation with 'qmp_capabilities'"
NEGOTIATED = "Capabilities negotiation is already complete, command ignored"
MIGRATING = "There's a migration process in progress"
RESET_NEEDED = "Resetting the Virtual Machine is required"
#: A command's arguments: name -> (JSON type, required).
Args = dict[str, tuple[type, bool]]
SCHEMA: dict[str, Args] = {
    "qmp_capabilities": {"enable": (list, False)},
    "query-status": {},
    "stop": {},
    "cont": {},
    "system_powerdown": {},
    "quit": {},
    "query-migrate": {},
    "migrate_cancel": {},
    "getfd": {"fdname": (str, True)},
    "migrate": {"uri": (str, True), "blk": (bool, False), "inc": (bool, False),
                "detach": (bool, False), "resume": (bool, False)},
    "migrate-incoming": {"uri": (str, True)},
    "migrate-set-parameters": {"max-bandwidth": (int, False), "downtime-limit": (int, False),
                               "multifd-channels": (int, False), "max-postcopy-bandwidth": (int, False)},
}
_TYPE_NAME = {str: "string", int: "integer", bool: "boolean", list: "array"}
#: States in which the guest cannot run again without a reset.
DEAD = ("shutdown", "guest-panicked", "internal-error", "watchdog")

Reply = dict[str, Any]
#: (command, arguments, passed descriptors) -> a reply, or None for the monitor's own answer.
Handler = Callable[[str, dict[str, Any], list[int]], Reply | None]


class QmpError(Exception):
    def __init__(self, desc: str, klass: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc, self.klass = desc, klass


class Vm:
    """The monitor's VM: a RunState, its migrations and the descriptors QMP was handed."""

    def __init__(self, state: str = "running", incoming: bool = False) -> None:
        self.state = "inmigrate" if incoming else state
        self.incoming = incoming
        self.migration: str | None = None
        self.bandwidth = 128 * 1024**2
        self.fds: dict[str, int] = {}
        self.quit = False
        self.failed: str | None = None  # why an incoming migration failed: QEMU exits
        self.lock = threading.Lock()

    def run(self, cmd: str, args: dict[str, Any], fds: list[int]) -> tuple[Any, list[Reply]]:
        """A command's return value and the events it sends."""
        if cmd == "query-status":
            return {"status": self.state, "running": self.state == "running", "singlestep": False}, []
        if cmd == "stop":
            if self.state != "running":
                return {}, []
            self.state = "paused"
            return {}, [event("STOP")]
        if cmd == "cont":
            return self.cont()
        if cmd == "system_powerdown":
            return {}, [event("POWERDOWN")]  # (the guest ignores it)
        if cmd == "quit":
            self.quit = True
            return {}, [event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})]
        if cmd == "getfd":
            if not fds:
                raise QmpError("No file descriptor supplied via SCM_RIGHTS")
            self.fds[args["fdname"]] = fds.pop(0)
            return {}, []
        if cmd == "query-migrate":
            return ({"status": self.migration} if self.migration else {}), []
        if cmd == "migrate-set-parameters":
            self.bandwidth = args.get("max-bandwidth", self.bandwidth)
            return {}, []
        if cmd == "migrate":
            return self.migrate(args["uri"])
        if cmd == "migrate_cancel":
            if self.migration == "active":
                self.migration = "cancelled"
            return {}, []
        if cmd == "migrate-incoming":
            return self.migrate_incoming(args["uri"])
        raise AssertionError(cmd)  # (SCHEMA lists only these)

    def cont(self) -> tuple[Any, list[Reply]]:
        if self.state in DEAD:
            raise QmpError(RESET_NEEDED)
        if self.state == "inmigrate":
            raise QmpError("Guest cannot be started before the incoming migration ends", "GenericError")
        if self.state == "running":
            return {}, []
        self.state = "running"
        return {}, [event("RESUME")]

    def _fd(self, uri: str) -> int:
        if not uri.startswith("fd:"):
            raise QmpError(f"unknown migration protocol: {uri}")
        name = uri[3:]
        if name not in self.fds:
            raise QmpError(f"File descriptor named '{name}' has not been found")
        return self.fds.pop(name)

    def migrate(self, uri: str) -> tuple[Any, list[Reply]]:
        if self.migration == "active":
            raise QmpError(MIGRATING)
        if self.state in DEAD or self.state == "inmigrate":
            raise QmpError(f"Operation is not allowed in this state: {self.state}")
        fd = self._fd(uri)
        try:
            os.write(fd, QEVM_MAGIC + b"\0" * 4092)
        finally:
            os.close(fd)
        if self.bandwidth < SLOW_BANDWIDTH:
            self.migration = "active"
            return {}, []
        self.migration = "completed"
        self.state = "postmigrate"  # as QEMU: the vCPUs stop at the stream's end
        return {}, [event("STOP")]

    def migrate_incoming(self, uri: str) -> tuple[Any, list[Reply]]:
        if not self.incoming:
            raise QmpError("'-incoming' was not specified on the command line")
        if self.state != "inmigrate":
            raise QmpError("The incoming migration has already been started")
        fd = self._fd(uri)
        try:
            head = os.read(fd, 4)
        finally:
            os.close(fd)
        if head != QEVM_MAGIC:
            self.migration = "failed"
            self.failed = "load of migration failed: Invalid argument"
            return {}, []
        self.migration, self.state = "completed", "paused"
        return {}, []


def event(name: str, data: dict[str, Any] | None = None) -> Reply:
    now = time.time()
    return {"event": name, "data": data or {},
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}}


def check_args(cmd: str, args: Any) -> None:
    """Refuse arguments as QMP does: not an object, unexpected, missing or mistyped."""
    if not isinstance(args, dict):
        raise QmpError("QMP input member 'arguments' must be an object")
    schema = SCHEMA[cmd]
    for name, value in args.items():
        if name not in schema:
            raise QmpError(f"Parameter '{name}' is unexpected")
        kind = schema[name][0]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise QmpError(f"Invalid parameter type for '{name}', expected: {_TYPE_NAME[kind]}")
    for name, (_, required) in schema.items():
        if required and name not in args:
            raise QmpError(f"Parameter '{name}' is missing")


class Session:
    """One client's connection: negotiation first, then commands, each answered in order."""

    def __init__(self, vm: Vm, handler: Handler | None = None,
                 on_command: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.vm, self.handler, self.on_command = vm, handler, on_command
        self.negotiated = False

    def answer(self, msg: Any, fds: list[int]) -> list[Reply] | None:
        """The replies (and events) to one message; None: hang up (see Monitor)."""
        if not isinstance(msg, dict):
            return [{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}]
        ident = {"id": msg["id"]} if "id" in msg else {}
        if self.on_command is not None:
            self.on_command(msg)
        try:
            cmd = msg.get("execute")
            if not isinstance(cmd, str):
                raise QmpError("QMP input lacks member 'execute'")
            if set(msg) - {"execute", "arguments", "id"}:
                raise QmpError(f"QMP input member '{sorted(set(msg) - {'execute', 'arguments', 'id'})[0]}' "
                               "is unexpected")
            if cmd not in SCHEMA:
                raise QmpError(f"The command {cmd} has not been found", "CommandNotFound")
            if not self.negotiated and cmd != "qmp_capabilities":
                raise QmpError(NEGOTIATE, "CommandNotFound")
            if self.negotiated and cmd == "qmp_capabilities":
                raise QmpError(NEGOTIATED, "CommandNotFound")
            args = msg.get("arguments", {})
            check_args(cmd, args)
            if cmd == "qmp_capabilities":
                for cap in args.get("enable", []):
                    raise QmpError(f"Parameter 'enable' does not accept value '{cap}'")
                self.negotiated = True
                return [{"return": {}, **ident}]
            if self.handler is not None and (reply := self.handler(cmd, args, fds)) is not None:
                return None if reply.get("close") else [] if reply.get("mute") else [{**reply, **ident}]
            with self.vm.lock:
                value, events = self.vm.run(cmd, args, fds)
            return [{"return": value, **ident}, *events]
        except QmpError as e:
            return [{"error": {"class": e.klass, "desc": e.desc}, **ident}]


def serve_connection(conn: socket.socket, session: Session, fds_seen: list[int] | None = None) -> None:
    """Greet, then answer each message in the stream until the client or `quit` ends it."""
    conn.sendall(json.dumps(GREETING).encode() + b"\r\n")
    decoder = json.JSONDecoder()
    buf = ""
    pending: list[int] = []
    while True:
        got = array.array("i")
        try:
            data, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(16 * got.itemsize))
        except OSError:
            return
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                pending.extend(got)
                if fds_seen is not None:
                    fds_seen.extend(got)
        if not data:
            return
        buf += data.decode()
        while buf.strip():
            stripped = buf.lstrip()
            try:
                msg, end = decoder.raw_decode(stripped)
            except json.JSONDecodeError:
                break  # incomplete: read more
            buf = stripped[end:]
            replies = session.answer(msg, pending)
            if replies is None:
                return  # (a handler asked for a hang-up)
            for reply in replies:
                conn.sendall(json.dumps(reply).encode() + b"\r\n")
            if session.vm.quit or session.vm.failed:
                return


class Monitor:
    """A QMP monitor on a Unix socket, served in a thread. `handler(cmd, args, fds)` may answer
    a negotiated command itself (a reply; {"close": True} hangs up instead, {"mute": True} never
    answers); `received` holds
    every message, `vm` the VM's state."""

    def __init__(self, path: Path, handler: Handler | None = None, *, vm: Vm | None = None) -> None:
        self.path = path
        self.handler = handler
        self.vm = vm or Vm()
        self.received: list[dict[str, Any]] = []
        self._fds: list[int] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.vm.quit:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                serve_connection(conn, Session(self.vm, self.handler, self.received.append), self._fds)

    def commands(self) -> list[str]:
        return [m["execute"] for m in self.received]

    def close(self) -> None:
        self.server.close()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)


# -- run as QEMU ------------------------------------------------------------------------------

def _options(value: str) -> dict[str, str]:
    """A QEMU `kind,key=value,...` option (commas doubled inside values)."""
    parts = value.replace(",,", "\0").split(",")
    out = {"": parts[0].replace("\0", ",")}
    for p in parts[1:]:
        key, _, val = p.partition("=")
        out[key] = val.replace("\0", ",")
    return out


def main(argv: list[str]) -> int:
    chardevs = {}
    opts: dict[str, str] = {}
    flags = set()
    it = iter(argv)
    for a in it:
        if a in ("-daemonize", "-S", "-nodefaults", "-no-user-config", "-no-reboot"):
            flags.add(a)
        elif a == "-chardev":
            o = _options(next(it))
            chardevs[o["id"]] = o
        elif a.startswith("-"):
            opts[a] = next(it, "")
    if any("fd" in c for c in chardevs.values()) or "-sandbox" in opts:
        print("qmp double: a jailed QEMU (descriptors, -sandbox) is not simulated", file=sys.stderr)
        return 1
    log = opts.get("-D")
    incoming = opts.get("-incoming") == "defer"
    initial = os.environ.get("QMP_DOUBLE_STATE") or ("prelaunch" if "-S" in flags else "running")
    vm = Vm(initial, incoming)
    qmp = _listen(chardevs["qmp"]["path"])
    agent = _listen(chardevs["agent"]["path"]) if "agent" in chardevs else None
    if "-daemonize" in flags:
        ready_r, ready_w = os.pipe()
        if os.fork() > 0:
            os.close(ready_w)
            os.read(ready_r, 1)  # as QEMU: the parent exits once the child is ready
            return 0
        os.close(ready_r)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for n in (0, 1, 2):
            os.dup2(null, n)
    else:
        ready_w = -1
    if "-pidfile" in opts:
        Path(opts["-pidfile"]).write_text(f"{os.getpid()}\n")
    console = chardevs.get("console", {}).get("path")
    out = os.open(console, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600) if console else -1
    if out >= 0:
        os.write(out, b"qmp double: a fake guest, nothing runs\n")
    if ready_w >= 0:
        os.write(ready_w, b"1")
        os.close(ready_w)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while not vm.quit and not vm.failed:
        try:
            conn, _ = qmp.accept()
        except OSError:
            break
        with conn:
            serve_connection(conn, Session(vm))
    if vm.failed and log:
        with open(log, "a") as f:
            f.write(f"qemu-system-x86_64: {vm.failed}\n")
    for sock in (qmp, agent):
        if sock is not None:
            path = sock.getsockname()
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
    if "-pidfile" in opts:
        with contextlib.suppress(OSError):
            os.unlink(opts["-pidfile"])
    return 1 if vm.failed else 0


def _listen(path: str) -> socket.socket:
    with contextlib.suppress(OSError):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)
    return s


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
