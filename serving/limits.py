"""What one HTTP request may cost the ingress, as ASGI middleware: bytes, time and uploads in flight.

FastAPI parses multipart uploads before a route runs, so a route cannot refuse a 10 GB body, a body sent at
1 byte/s or the 70th concurrent upload in time. This middleware does, before the app reads anything:

- **size**: a ``Content-Length`` above the cap is a 413 without reading; bytes are also counted as they
  stream in. A body without ``Content-Length`` (chunked) is a 411: Ray's proxy buffers what a client
  streams ahead of the app (a 300 MiB chunked body cost it +354 MB before the app's 413).
- **time**: the body must arrive within ``grace + Content-Length / min_rate`` seconds and no chunk may be
  more than ``grace`` seconds late (408), and the whole request must finish within ``request_timeout_s``
  (504). These are the server's own clocks: a client's ``x-request-timeout-seconds`` header (which Ray's
  proxy honours, 0 disabling its timeout) cannot lengthen them.
- **uploads in flight**: requests with a body beyond ``max_uploads_in_flight`` in all, ``max_uploads_per_client``
  from one client address or ``max_bytes_in_flight`` of declared bodies are refused at once with 503 and
  ``Retry-After`` rather than queued, so slow uploads can never hold every slot of the ingress replica,
  ``GET /healthz`` keeps answering, and the bodies held at once (each costs ~5x its size between Ray's proxy
  and the replica, measured) are bounded in bytes, not only in count.

The limits are read per request from :func:`upload_limits`: ``serve.ingress`` runs a pickled *copy* of the
FastAPI app in each replica, so the ingress deployment's constructor sets the limits of its own process
with :func:`set_upload_limits` rather than by mutating the app object.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_MAX_UPLOAD_BYTES", "BodySizeLimit", "UploadLimits", "set_upload_limits", "upload_limits"]

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 256 * 2**20

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class UploadLimits:
    """Per-process request limits of the ingress (``AppArgs`` fields of the same names).

    Args:
        max_upload_bytes: request body cap in bytes (413 above).
        max_uploads_in_flight: requests with a body served at once by this replica (503 beyond).
        max_uploads_per_client: of those, from one client address (503 beyond).
        max_bytes_in_flight: sum of the declared ``Content-Length`` of those (503 beyond).
        upload_grace_s: seconds a body may take on top of its size / ``min_upload_rate``, and the longest
            wait for its next chunk (408 beyond).
        min_upload_rate: bytes per second a body must average after the grace (a 256 MiB body at 1 MiB/s:
            266 s).
        request_timeout_s: seconds a whole request may take, body and model included (504 beyond).
    """

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_uploads_in_flight: int = 16
    max_uploads_per_client: int = 16
    max_bytes_in_flight: int = 2 * DEFAULT_MAX_UPLOAD_BYTES
    upload_grace_s: float = 10.0
    min_upload_rate: float = 2.0**20
    request_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{f.name} must be a positive number, not {value!r}")
        if self.max_bytes_in_flight < self.max_upload_bytes:
            raise ValueError(
                f"max_bytes_in_flight ({self.max_bytes_in_flight}) must be at least max_upload_bytes "
                f"({self.max_upload_bytes}), or the largest allowed body could never be served"
            )
        if self.max_uploads_per_client > self.max_uploads_in_flight:
            raise ValueError(
                f"max_uploads_per_client ({self.max_uploads_per_client}) must not exceed "
                f"max_uploads_in_flight ({self.max_uploads_in_flight})"
            )

    def body_deadline_s(self, declared_bytes: int) -> float:
        """Seconds a body of ``declared_bytes`` may take to arrive."""
        return self.upload_grace_s + declared_bytes / self.min_upload_rate


_limits = UploadLimits()
_in_flight: dict[str, int] = {}  # client address -> uploads being served; one event loop, so no lock
_bytes_in_flight = 0  # declared body bytes of those


def set_upload_limits(limits: UploadLimits) -> None:
    """Set this process's request limits (called by the ingress replica's constructor)."""
    global _limits
    _limits = limits


def upload_limits() -> UploadLimits:
    """This process's request limits."""
    return _limits


class _Refused(Exception):
    """Raised out of the app's ``receive`` to abandon a request whose answer the middleware sends."""


class BodySizeLimit:
    """ASGI middleware enforcing :class:`UploadLimits`; refusals answer ``{"error": ...}`` JSON."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limits = upload_limits()
        headers = dict(scope.get("headers") or [])
        declared_header = headers.get(b"content-length")
        chunked = b"transfer-encoding" in headers
        if declared_header is None and chunked:
            await _reply(send, 411, "send the body with a Content-Length header (chunked uploads are refused)")
            return
        try:
            declared = int(declared_header or 0)
        except ValueError:
            await _reply(send, 400, "invalid Content-Length header")
            return
        if declared < 0:
            await _reply(send, 400, "invalid Content-Length header")
            return
        if declared > limits.max_upload_bytes:
            await _reply(send, 413, _too_large(limits.max_upload_bytes, f"Content-Length {declared}"))
            return
        if declared == 0:
            await self._run(scope, receive, send, limits, declared)
            return

        global _bytes_in_flight
        client = str((scope.get("client") or ("unknown",))[0])
        total, mine = sum(_in_flight.values()), _in_flight.get(client, 0)
        if (total >= limits.max_uploads_in_flight or mine >= limits.max_uploads_per_client
                or _bytes_in_flight + declared > limits.max_bytes_in_flight):  # fmt: skip
            await _reply(
                send,
                503,
                f"too many uploads in flight ({total} in all, {mine} from {client}, {_bytes_in_flight} bytes; "
                f"limits {limits.max_uploads_in_flight}, {limits.max_uploads_per_client} and "
                f"{limits.max_bytes_in_flight} bytes); retry later",
                retry_after=1,
            )
            return
        _in_flight[client] = mine + 1
        _bytes_in_flight += declared
        try:
            await self._run(scope, receive, send, limits, declared)
        finally:
            _bytes_in_flight -= declared
            _in_flight[client] -= 1
            if not _in_flight[client]:
                del _in_flight[client]

    async def _run(self, scope: Scope, receive: Receive, send: Send, limits: UploadLimits, declared: int) -> None:
        """The app under the body clocks and the request deadline; our refusal replaces the app's answer."""
        start = time.monotonic()
        body_deadline = start + limits.body_deadline_s(declared)
        received = 0
        refusal: tuple[int, str] | None = None
        started = False

        async def guarded_receive() -> Message:
            nonlocal received, refusal
            if refusal is not None:
                return {"type": "http.disconnect"}
            now = time.monotonic()
            wait = min(limits.upload_grace_s, body_deadline - now)
            try:
                if wait <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), wait)
            except TimeoutError:
                refusal = (408, _too_slow(received, declared, time.monotonic() - start, limits))
                raise _Refused from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limits.max_upload_bytes:
                    refusal = (413, _too_large(limits.max_upload_bytes, f"more than {limits.max_upload_bytes} bytes received"))
                    raise _Refused
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refusal is not None:
                return  # the app's own answer to the cut-off body is replaced by ours below
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, guarded_receive, guarded_send), limits.request_timeout_s)
        except _Refused:
            pass
        except TimeoutError:
            if refusal is None:
                refusal = (504, f"request took longer than request_timeout_s = {limits.request_timeout_s:g} s")
                log.warning("%s %s: %s", scope.get("method"), scope.get("path"), refusal[1])
        if refusal is not None and not started:
            await _reply(send, *refusal)


def _too_large(limit: int, what: str) -> str:
    return f"request body too large: {what}; the limit is {limit} bytes ({limit / 2**20:.1f} MiB)"


def _too_slow(received: int, declared: int, elapsed: float, limits: UploadLimits) -> str:
    return (
        f"request body too slow: {received} of {declared} bytes in {elapsed:.1f} s; a body must arrive within "
        f"{limits.upload_grace_s:g} s plus 1 s per {limits.min_upload_rate:.0f} bytes, no chunk more than "
        f"{limits.upload_grace_s:g} s apart"
    )


async def _reply(send: Send, status: int, error: str, retry_after: int | None = None) -> None:
    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # fmt: skip
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
