"""Serving the API with uvicorn: on a Unix socket (root only: the socket 0600 in a 0700
directory, and each peer's uid checked with SO_PEERCRED — anyone but root, or the user the
agent runs as, gets 403), and on TCP only with a bearer token.

    python -m mvm.api.server [--socket PATH] [--listen HOST:PORT --token-file FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket as sockets
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from mvm.api.app import create_app
from mvm.context import Host
from mvm.errors import Conflict, InvalidInput, MvmError
from mvm.util import private

#: A Unix socket's path must fit in sun_path.
MAX_SOCKET_PATH = 107
ALLOWED_UIDS = frozenset({0, os.geteuid()})


def _refusal() -> bytes:
    body = json.dumps({"error": "only root may use the agent's socket", "hint": "run the command as root",
                       "kind": "Forbidden"}).encode()
    return (b"HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class PeerCheckedH11(H11Protocol):
    """HTTP/1.1 that answers 403 to a Unix-socket peer that is not root (SO_PEERCRED)."""

    refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == sockets.AF_UNIX:
            creds = sock.getsockopt(sockets.SOL_SOCKET, sockets.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            self.refused = uid not in ALLOWED_UIDS

    def data_received(self, data: bytes) -> None:
        if self.refused:
            if not self.transport.is_closing():
                self.transport.write(_refusal())
                self.transport.close()
            return
        super().data_received(data)


class Server(uvicorn.Server):
    """uvicorn's server, which ends the responses that never end by themselves (the events
    streams, through `closing`) as soon as its shutdown begins: otherwise it waits out its
    graceful timeout for them and then cancels them, with a traceback."""

    def __init__(self, config: uvicorn.Config, closing: threading.Event) -> None:
        super().__init__(config)
        self.closing = closing

    async def shutdown(self, sockets: list[sockets.socket] | None = None) -> None:
        self.closing.set()
        await super().shutdown(sockets)


def unix_socket(path: Path, private_dir: bool) -> sockets.socket:
    """A listening socket at `path`, mode 0600; its directory is made 0700 when mvm owns it
    (`private_dir`) or when it is new. A live agent already there is an error; a stale file
    is replaced."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise InvalidInput(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes", "give a shorter --socket")
    if not path.parent.is_dir():
        private.mkdirs(path.parent)
        path.parent.chmod(0o700)
    elif private_dir:
        path.parent.chmod(0o700)
    if path.exists() or path.is_symlink():
        probe = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise Conflict(f"an agent already serves on {path}", "stop it first, or give another --socket")
        finally:
            probe.close()
    sock = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    path.chmod(0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def tcp_socket(listen: str) -> sockets.socket:
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"--listen {listen!r} is not HOST:PORT", "e.g. --listen 127.0.0.1:8471")
    try:
        info = sockets.getaddrinfo(host, int(port), type=sockets.SOCK_STREAM)[0]
    except OSError as e:
        raise InvalidInput(f"--listen {listen!r}: {e}") from None
    sock = sockets.socket(info[0], sockets.SOCK_STREAM)
    sock.setsockopt(sockets.SOL_SOCKET, sockets.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
    except OSError as e:
        sock.close()
        raise Conflict(f"cannot listen on {listen}: {e.strerror}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def read_token(token_file: Path | None) -> str:
    if token_file is None:
        raise InvalidInput("TCP needs a bearer token", "pass --token-file FILE (a file holding the token)")
    try:
        mode = token_file.stat().st_mode
        token = token_file.read_text().strip()
    except OSError as e:
        raise InvalidInput(f"cannot read the token file {token_file}: {e.strerror}") from None
    if mode & 0o077:
        raise InvalidInput(f"the token file {token_file} is open to other users (mode {mode & 0o777:04o})",
                           f"chmod 600 {token_file}")
    if len(token) < 16 or any(c.isspace() for c in token):
        raise InvalidInput(f"the token in {token_file} is shorter than 16 characters or has spaces",
                           "put one long random token in it, e.g. `openssl rand -hex 32`")
    return token


def serve(ctx_factory: Callable[[], Host], *, socket: Path | None = None, listen: str | None = None,
          token_file: Path | None = None, on_ready: Callable[[], None] | None = None,
          stop: threading.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (in the main thread) or until `stop` is set. The Unix socket
    (default: `Layout.agent_socket()`) always; TCP too with `listen`, and only with a token."""
    token = read_token(token_file) if listen is not None else None
    layout = ctx_factory().layout
    path = socket or layout.agent_socket()
    listeners = [unix_socket(path, private_dir=socket is None)]
    try:
        if listen is not None:
            listeners.append(tcp_socket(listen))
        closing = threading.Event()
        app = create_app(ctx_factory, token, closing)
        config = uvicorn.Config(app, http=PeerCheckedH11, lifespan="off", log_level="warning", log_config=None,
                                access_log=False, timeout_graceful_shutdown=2, ws="none")
        server = Server(config, closing)

        def watch() -> None:
            while not server.started and not server.should_exit:
                threading.Event().wait(0.02)
            if server.started and on_ready is not None:
                on_ready()
            if stop is not None:
                stop.wait()
                server.should_exit = True

        threading.Thread(target=watch, name="mvm-api-ready", daemon=True).start()
        server.run(sockets=listeners)
    finally:
        for s in listeners:
            s.close()
        with contextlib.suppress(OSError):
            path.unlink()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mvm.api.server", description=__doc__.splitlines()[0])
    p.add_argument("--socket", type=Path, help="Unix socket path (default: under the state home)")
    p.add_argument("--listen", help="also serve on TCP HOST:PORT (needs --token-file)")
    p.add_argument("--token-file", type=Path, help="file holding the bearer token for TCP")
    args = p.parse_args(argv)
    from mvm.context.compose import compose

    def ready() -> None:
        print("ready", flush=True)

    try:
        serve(compose, socket=args.socket, listen=args.listen, token_file=args.token_file, on_ready=ready)
    except MvmError as e:
        print(f"error: {e.line()}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
