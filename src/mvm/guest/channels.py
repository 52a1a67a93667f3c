"""How the host reaches a guest's agent: a byte stream over a channel the hypervisor provides.

QEMU offers a virtio-serial port whose host end is a Unix socket it listens on (one client at
a time); Firecracker's vsock is a Unix socket too, on which a `CONNECT <port>` line opens the
stream. A channel also says whether the hypervisor behind it still lives, whether it still
answers its control socket, and what it and the guest said last, so that a wait for a guest
whose VM died or hung ends soon, with the reason.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from mvm.errors import GuestError

#: The guest agent's vsock port (AF_VSOCK, in the guest); the host asks Firecracker for it.
VSOCK_AGENT_PORT = 1024
#: The longest answer to `CONNECT <port>` we read: `OK <host port>` is at most 15 bytes.
VSOCK_ANSWER_MAX = 64


class AgentChannel(Protocol):
    path: Path  # where it is, for messages

    def connect(self, timeout: float) -> socket.socket: ...

    def alive(self) -> bool: ...

    def unanswered(self) -> str:
        """Why the hypervisor does not answer its control socket ('' when it does)."""
        ...

    def last_words(self) -> str: ...


class VirtioSerialChannel:
    """QEMU's virtio-serial chardev socket (server=on, wait=off)."""

    def __init__(self, path: Path, *, alive: Callable[[], bool] | None = None,
                 last_words: Callable[[], str] | None = None,
                 unanswered: Callable[[], str] | None = None) -> None:
        self.path = Path(path)
        self._alive = alive
        self._last_words = last_words
        self._unanswered = unanswered

    def connect(self, timeout: float) -> socket.socket:
        """Connect, retrying while QEMU is between two clients (it accepts one at a time)."""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                s.connect(os.fspath(self.path))
                return s
            except (BlockingIOError, ConnectionRefusedError):
                s.close()
                if deadline - time.monotonic() <= 0:
                    raise
                time.sleep(min(0.01, max(deadline - time.monotonic(), 0)))
            except OSError:
                s.close()
                raise

    def alive(self) -> bool:
        return self._alive() if self._alive is not None else True

    def unanswered(self) -> str:
        return self._unanswered() if self._unanswered is not None else ""

    def last_words(self) -> str:
        return self._last_words() if self._last_words is not None else ""


class VsockChannel:
    """Firecracker's vsock: a Unix socket it listens on (`uds_path` of `/vsock`). Each host
    connection asks for a guest port with `CONNECT <port>\\n`; Firecracker answers
    `OK <host port>\\n` once the guest accepted, or closes the connection when nothing in the
    guest listens on that port (yet). The answer is read a byte at a time, up to
    `VSOCK_ANSWER_MAX` bytes, so what the guest sends after it stays in the socket."""

    def __init__(self, path: Path, port: int, *, alive: Callable[[], bool] | None = None,
                 last_words: Callable[[], str] | None = None,
                 unanswered: Callable[[], str] | None = None) -> None:
        if not 0 <= port < 1 << 32:
            raise ValueError(f"vsock port out of range: {port}")
        self.path = Path(path)
        self.port = port
        self._alive = alive
        self._last_words = last_words
        self._unanswered = unanswered

    def connect(self, timeout: float) -> socket.socket:
        """Connect and open the stream to the guest port, retrying while Firecracker's socket
        is not there yet, refuses, or closes because the guest does not listen yet. At the
        timeout raises the last OSError; a wrong answer raises GuestError at once."""
        deadline = time.monotonic() + timeout
        last: OSError | None = None
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                s.connect(os.fspath(self.path))
                s.sendall(f"CONNECT {self.port}\n".encode())
                self._read_answer(s, deadline)
                s.settimeout(None)
                return s
            except (FileNotFoundError, BlockingIOError, ConnectionRefusedError,
                    ConnectionResetError, BrokenPipeError) as e:
                s.close()
                if deadline - time.monotonic() <= 0:
                    raise
                last = e
                time.sleep(min(0.01, max(deadline - time.monotonic(), 0)))
            except TimeoutError:
                s.close()
                if last is not None:  # (the time ran out during a retry: say why it retried)
                    raise last from None
                raise TimeoutError(errno.ETIMEDOUT, f"no answer from the vsock socket {self.path} "
                                   f"to CONNECT {self.port} within {timeout:g}s") from None
            except BaseException:
                s.close()
                raise

    def _read_answer(self, s: socket.socket, deadline: float) -> None:
        line = bytearray()
        while not line.endswith(b"\n"):
            if len(line) >= VSOCK_ANSWER_MAX:
                raise GuestError(
                    f"the vsock socket {self.path} answered CONNECT {self.port} with more than "
                    f"{VSOCK_ANSWER_MAX} bytes without a newline: {_show(line)}",
                    "the socket is not Firecracker's vsock: check the VM's vsock uds_path")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            s.settimeout(left)
            b = s.recv(1)
            if not b:
                raise ConnectionResetError(
                    errno.ECONNRESET, f"the vsock socket {self.path} closed the connection to "
                    f"port {self.port} before answering (nothing listens there in the guest yet)")
            line += b
        words = bytes(line[:-1]).split(b" ")
        if not (len(words) == 2 and words[0] == b"OK" and words[1].isdigit()):
            raise GuestError(
                f"the vsock socket {self.path} answered CONNECT {self.port} with {_show(line)} "
                "(expected 'OK <port>')",
                "the socket is not Firecracker's vsock: check the VM's vsock uds_path")

    def alive(self) -> bool:
        return self._alive() if self._alive is not None else True

    def unanswered(self) -> str:
        return self._unanswered() if self._unanswered is not None else ""

    def last_words(self) -> str:
        return self._last_words() if self._last_words is not None else ""


def _show(data: bytes | bytearray) -> str:
    return repr(bytes(data[:VSOCK_ANSWER_MAX]))[1:]
