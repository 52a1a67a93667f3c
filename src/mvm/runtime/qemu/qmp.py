"""A thin synchronous face on `qemu.qmp`: one connection, a deadline on every call.

Each `Qmp` owns a private event loop rather than the thread's default one, so it works the
same from the CLI, from tests, and from a daemon's worker threads (it must not be called from
inside a running event loop: use a thread there). Errors become `RuntimeFailure` carrying
QEMU's own text.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError

from mvm.errors import RuntimeFailure

T = TypeVar("T")

CONNECT_TIMEOUT = 5.0
CALL_TIMEOUT = 10.0

# qemu.qmp logs every disconnect at WARNING/ERROR; our errors already say what happened.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class Qmp:
    """`with Qmp(sock) as q: q.execute("stop")` — connect, negotiate, call, disconnect."""

    def __init__(self, path: Path, *, timeout: float = CALL_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT, name: str | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)

    def _sync(self, aw: Awaitable[T], timeout: float) -> T:
        return self._loop.run_until_complete(asyncio.wait_for(aw, timeout))

    def connect(self) -> Qmp:
        """Connect and negotiate, all within connect_timeout."""
        deadline = time.monotonic() + self.connect_timeout
        try:
            sock = self._open_socket(deadline)
            self._sync(self._client.connect(sock), max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            self.close()
            raise RuntimeFailure(f"QEMU did not answer on {self.path} within "
                                 f"{self.connect_timeout:g}s",
                                 "the hypervisor may be hung, or busy with another client; "
                                 "stop the instance if this persists") from None
        except (ConnectError, OSError) as e:
            self.close()
            cause = e.exc if isinstance(e, ConnectError) else e
            raise RuntimeFailure(f"cannot connect to QEMU at {self.path}: {cause}",
                                 "the hypervisor is not running (see the console log)") from e
        return self

    def _open_socket(self, deadline: float) -> socket.socket:
        """A connected socket. QEMU serves one QMP client at a time with a listen backlog of
        one; when that slot is taken connect() fails with EAGAIN (asyncio would mistake it
        for "in progress" and hand back an unconnected socket), so wait and try again."""
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(str(self.path))
                return sock
            except BlockingIOError:
                sock.close()
                if time.monotonic() >= deadline:
                    raise TimeoutError from None
                time.sleep(0.005)
            except OSError:
                sock.close()
                raise

    def execute(self, cmd: str, args: dict[str, Any] | None = None, *,
                timeout: float | None = None) -> Any:
        """Run one QMP command and return its `return` value."""
        limit = self.timeout if timeout is None else timeout
        try:
            return self._sync(self._client.execute(cmd, args), limit)
        except ExecuteError as e:
            raise RuntimeFailure(f"QEMU refused {cmd}: {e}") from e
        except TimeoutError:
            raise RuntimeFailure(f"QEMU did not answer {cmd} within {limit:g}s",
                                 "the hypervisor may be hung; stop the instance") from None
        except ExecInterruptedError as e:
            raise RuntimeFailure(f"QEMU closed the connection during {cmd}",
                                 "the hypervisor exited; see the console log") from e
        except (QMPError, OSError) as e:
            raise RuntimeFailure(f"QMP {cmd} failed: {e}") from e

    def send_fd(self, fd: int, name: str) -> None:
        """Hand QEMU an open file descriptor under `name` (SCM_RIGHTS + `getfd`)."""
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as e:
            raise RuntimeFailure(f"cannot pass a file descriptor to QEMU: {e}") from e
        self.execute("getfd", {"fdname": name})

    def quit(self) -> None:
        """Ask QEMU to exit. It may close the connection before or after answering."""
        try:
            self.execute("quit", timeout=self.timeout)
        except RuntimeFailure as e:
            if not isinstance(e.__cause__, ExecInterruptedError):
                raise

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._sync(self._client.disconnect(), self.connect_timeout)
        except Exception:
            pass  # disconnect re-raises whatever ended the session (EOFError, ...): it is over
        finally:
            self._loop.close()

    def __enter__(self) -> Qmp:
        return self.connect()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def call(path: Path, cmd: str, args: dict[str, Any] | None = None, *,
         timeout: float = CALL_TIMEOUT) -> Any:
    """One command on a fresh connection."""
    with Qmp(path, timeout=timeout) as q:
        return q.execute(cmd, args)
