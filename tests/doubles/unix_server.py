"""One Unix-socket server for the tests' doubles of whatever listens on a socket (QEMU's
chardev with a guest agent behind it, Firecracker's vsock socket, a hostile guest): a
thread accepts connections and hands each to `serve(conn)`; closing the server ends it."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from pathlib import Path


class UnixServer:
    """Listens on `path`. Connections are served one after another, or each in a thread of
    its own (`concurrent=True`); `connections` counts those accepted. Errors of a connection
    the client dropped (`OSError`) end that connection only."""

    def __init__(self, path: Path, serve: Callable[[socket.socket], None], *,
                 backlog: int = 1, concurrent: bool = False) -> None:
        self.path = path
        self.connections = 0
        self._serve_one = serve
        self._concurrent = concurrent
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(str(path))
        self._srv.listen(backlog)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return  # closed
            self.connections += 1
            if self._concurrent:
                threading.Thread(target=self._one, args=(conn,), daemon=True).start()
            else:
                self._one(conn)

    def _one(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self._serve_one(conn)

    def close(self) -> None:
        self._srv.close()

    def __enter__(self) -> UnixServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_line(conn: socket.socket, limit: int) -> bytes:
    """One line (its newline kept) read byte by byte, so that nothing after it is consumed, as
    a peer reading a handshake does (Firecracker's `CONNECT <port>`); at most `limit` bytes,
    fewer when the client closes first."""
    line = b""
    while not line.endswith(b"\n") and len(line) < limit:
        b = conn.recv(1)
        if not b:
            break
        line += b
    return line
