"""Request body size cap as ASGI middleware: answer 413 before an oversize body is read, not after.

FastAPI parses multipart uploads before a route runs, so a route cannot refuse a 10 GB body in time.
This middleware refuses a too-large ``Content-Length`` without reading anything and counts the bytes of
chunked or lying bodies as they stream in, cutting them off at the cap.

The cap is read per request from :func:`upload_limit`: ``serve.ingress`` runs a pickled *copy* of the
FastAPI app in each replica, so the ingress deployment's constructor sets the cap of its own process with
:func:`set_upload_limit` rather than by mutating the app object.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["DEFAULT_MAX_UPLOAD_BYTES", "BodySizeLimit", "set_upload_limit", "upload_limit"]

DEFAULT_MAX_UPLOAD_BYTES = 256 * 2**20

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_limit = DEFAULT_MAX_UPLOAD_BYTES


def set_upload_limit(max_bytes: int) -> None:
    """Set this process's request body cap in bytes (called by the ingress replica's constructor)."""
    global _limit
    if int(max_bytes) <= 0:
        raise ValueError(f"max_upload_bytes must be a positive number of bytes, not {max_bytes!r}")
    _limit = int(max_bytes)


def upload_limit() -> int:
    """This process's request body cap in bytes."""
    return _limit


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware refusing request bodies above ``upload_limit()`` bytes with ``413 {"error": ...}``."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = upload_limit()
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                await _reply(send, 400, "invalid Content-Length header")
                return
            if too_big:
                await _reply(send, 413, _message(limit, f"Content-Length {int(declared)}"))
                return

        received = 0
        refused = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the app's own error answer to the cut-off body is replaced by the 413 below
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _TooLarge:
            pass
        if refused and not started:
            await _reply(send, 413, _message(limit, f"more than {limit} bytes received"))


def _message(limit: int, what: str) -> str:
    return f"request body too large: {what}; the limit is {limit} bytes ({limit / 2**20:.1f} MiB)"


async def _reply(send: Send, status: int, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close")],
        }
    )  # fmt: skip
    await send({"type": "http.response.body", "body": body})
