"""Bounds on what a request may cost the agent: its body is at most `MAX_BODY` bytes.

A body is never read whole to be measured: a Content-Length above the limit is answered 413
before a byte of the body is read, and a body without one (chunked) or longer than it said is
counted as it arrives and refused (413) when what arrived crosses the limit — the
application never receives more than the limit.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The largest request body the API reads: above the largest thing a request carries (a
#: tenant's secrets, at most 3 MiB as a file, more as escaped JSON).
MAX_BODY = 8 << 20
HINT = f"the API takes request bodies of at most {MAX_BODY >> 20} MiB"


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        # (the rest of the body is not read: the server closes the connection after the answer)
        super().__init__(413, f"request body larger than {limit} bytes", headers={"connection": "close"})
        self.hint = HINT


class BodyLimit:
    """ASGI middleware: 413 for a request body of more than `limit` bytes."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"").strip()
        if declared.isdigit() and int(declared) > self.limit:  # (the server checked its form)
            await _refuse(send, f"request body of {int(declared)} bytes, larger than {self.limit}")
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)  # (answered by the app's HTTP error handler)
            return message

        await self.app(scope, counted, send)


async def _refuse(send: Send, error: str) -> None:
    """413 without reading the body (the server then closes the connection)."""
    body = json.dumps({"error": error, "hint": HINT, "kind": "HTTPError"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
