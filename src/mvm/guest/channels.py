"""How the host reaches a guest's agent: a byte stream over a channel the hypervisor provides.

QEMU offers a virtio-serial port whose host end is a Unix socket it listens on (one client at
a time); Firecracker's vsock is a Unix socket too, on which a `CONNECT <port>` line opens the
stream. A channel also says whether the hypervisor behind it still lives, and what it and the
guest said last, so that a wait for a guest whose VM died ends at once, with the reason.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol


class AgentChannel(Protocol):
    path: Path  # where it is, for messages

    def connect(self, timeout: float) -> socket.socket: ...

    def alive(self) -> bool: ...

    def last_words(self) -> str: ...


class VirtioSerialChannel:
    """QEMU's virtio-serial chardev socket (server=on, wait=off)."""

    def __init__(self, path: Path, *, alive: Callable[[], bool] | None = None,
                 last_words: Callable[[], str] | None = None) -> None:
        self.path = Path(path)
        self._alive = alive
        self._last_words = last_words

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

    def last_words(self) -> str:
        return self._last_words() if self._last_words is not None else ""
