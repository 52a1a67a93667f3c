# ruff: noqa: F811  (the `world` fixture, imported from test_api, is a parameter)
"""The API's request bodies are bounded (8 MiB): a larger one is answered 413 without being
read whole — by its Content-Length before any of it is read, and chunked or longer than it
said, as it arrives. (Before: a 200 MB body took the agent from 72 to 267 MB.)"""

from __future__ import annotations

import asyncio
import json
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.types import Message, Receive, Scope, Send

from mvm.api.limits import MAX_BODY, BodyLimit
from tests.test_api import Served, World, world  # noqa: F401 (a fixture)

CHUNK = 64 << 10


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.fixture
def served(world: World) -> Iterator[Served]:
    s = Served(world)
    yield s
    s.stop()


def connect(served: Served) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(served.socket))
    s.settimeout(30)
    return s


def response(s: socket.socket) -> tuple[int, dict[str, object]]:
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass  # (the server closed with our unread bytes queued: what it sent came first)
    head, _, rest = data.partition(b"\r\n\r\n")  # (the first answer: others may follow it)
    length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))
    return int(head.split(b" ")[1]), json.loads(rest[:length])


def send_until_answered(s: socket.socket, total: int) -> int:
    """Send up to `total` body bytes in chunks of CHUNK (chunked encoding), stopping when the
    server answers or closes (else ending the body); returns how many were sent."""
    sent = 0
    block = b"x" * CHUNK
    while sent < total:
        if select.select([s], [], [], 0)[0]:
            break
        try:
            s.sendall(f"{CHUNK:x}\r\n".encode() + block + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += CHUNK
    else:
        s.sendall(b"0\r\n\r\n")  # all of it: the body ends
    return sent


def test_a_declared_length_above_the_limit_is_refused_before_the_body(served: Served) -> None:
    s = connect(served)
    s.sendall(b"POST /tenants HTTP/1.1\r\nhost: agent\r\ncontent-type: application/json\r\n"
              b"content-length: 209715200\r\n\r\n")  # 200 MB announced, not a byte of it sent
    status, body = response(s)
    assert status == 413 and body["error"] == f"request body of 209715200 bytes, larger than {MAX_BODY}"
    assert body["hint"] == "the API takes request bodies of at most 8 MiB"


def test_a_chunked_body_is_refused_as_it_crosses_the_limit_and_costs_no_memory(served: Served) -> None:
    before = peak_rss_kib(served.proc.pid)
    s = connect(served)
    s.sendall(b"POST /tenants HTTP/1.1\r\nhost: agent\r\ncontent-type: application/json\r\n"
              b"transfer-encoding: chunked\r\n\r\n")
    sent = send_until_answered(s, 64 << 20)
    status, body = response(s)
    grew = peak_rss_kib(served.proc.pid) - before
    print(f"\nchunked: sent {sent >> 20} MiB before the answer; the agent's peak RSS grew {grew >> 10} MiB")
    assert status == 413 and body["error"] == f"request body larger than {MAX_BODY} bytes"
    assert sent < 64 << 20  # refused while it came
    assert grew < 24 << 10  # the limit and buffers, not the body (before: 64 MiB grew it 128 MiB)
    # the agent goes on serving
    with served.client() as c:
        assert c.get("/tenants").status_code == 200


def test_a_body_longer_than_its_length_says_is_never_read_past_it(served: Served) -> None:
    before = peak_rss_kib(served.proc.pid)
    s = connect(served)
    s.sendall(b"POST /tenants HTTP/1.1\r\nhost: agent\r\ncontent-type: application/json\r\n"
              b"content-length: 10\r\n\r\n")
    sent = send_until_answered(s, 64 << 20)  # 64 MiB after a body said to be 10 bytes
    status, _ = response(s)
    grew = peak_rss_kib(served.proc.pid) - before
    assert status in (400, 422) and sent < 64 << 20  # the 10 bytes: not a tenant; the rest: no request
    assert grew < 24 << 10


def asgi(limit: int, chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[int, int, bool]:
    """BodyLimit(limit) in front of an app that reads the whole body: (status sent, bytes the
    app received, whether the app was called)."""
    got = {"bytes": 0, "called": False}
    sent: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        got["called"] = True
        try:
            while True:
                m = await receive()
                got["bytes"] += len(m.get("body", b""))
                if not m.get("more_body"):
                    break
        except Exception as e:  # as the app's HTTP error handler answers it
            await send({"type": "http.response.start", "status": getattr(e, "status_code", 500), "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    queue = [{"type": "http.request", "body": c, "more_body": n < len(chunks) - 1} for n, c in enumerate(chunks)]

    async def receive() -> Message:
        return queue.pop(0)

    async def send(m: Message) -> None:
        sent.append(m)

    asyncio.run(BodyLimit(app, limit)({"type": "http", "headers": headers}, receive, send))
    return int(sent[0]["status"]), int(got["bytes"]), bool(got["called"])


def test_the_app_never_receives_more_than_the_limit() -> None:
    chunks = [b"x" * 300] * 10
    assert asgi(1000, chunks, []) == (413, 900, True)  # chunked: stopped at the chunk crossing it
    assert asgi(1000, chunks, [(b"content-length", b"10")]) == (413, 900, True)  # a length that lies
    assert asgi(1000, chunks, [(b"content-length", b"3000")]) == (413, 0, False)  # refused unread
    assert asgi(3000, chunks, []) == (200, 3000, True)  # at the limit: read
