"""serving.limits over real HTTP on 127.0.0.1: a uvicorn server runs a small FastAPI app behind the middleware.

No Ray here (tests/test_serving_http.py drives the same middleware inside Ray Serve): the clocks and caps are
checked with test-sized limits, raw sockets for the slow and chunked clients, and httpx for the rest.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Annotated

import httpx
import pytest
from fastapi import FastAPI, File, Request, UploadFile

from serving.limits import BodySizeLimit, UploadLimits, set_upload_limits, upload_limits

LIMITS = UploadLimits(
    max_upload_bytes=10_000,
    max_uploads_in_flight=4,
    max_uploads_per_client=3,
    max_bytes_in_flight=15_000,
    upload_grace_s=1.0,
    min_upload_rate=5_000,
    request_timeout_s=3.0,
)


def _app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(BodySizeLimit)

    @app.post("/echo")
    async def echo(request: Request):
        return {"bytes": len(await request.body())}

    @app.post("/form")
    async def form(file: Annotated[UploadFile, File()]):
        return {"bytes": len(await file.read())}

    @app.post("/sleep")
    async def sleep(request: Request):
        await request.body()
        await asyncio.sleep(30)
        return {"slept": True}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    return app


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    """uvicorn on a free 127.0.0.1 port in a thread of this process, with :data:`LIMITS`."""
    import uvicorn

    previous = upload_limits()
    set_upload_limits(LIMITS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield "127.0.0.1", port
    finally:
        srv.should_exit = True
        thread.join(10)
        set_upload_limits(previous)


def _open(server: tuple[str, int], head: bytes, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(server, timeout=30, source_address=(source, 0))
    sock.sendall(head)
    return sock


def _answer(sock: socket.socket) -> tuple[int, bytes]:
    """Status and raw answer of a raw-socket request (read until the server closes or the body is complete)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
        if length and len(body) >= int(length[0].split(b":")[1]):
            break
    sock.close()
    return int(data.split(b" ", 2)[1]), data


def _post_head(path: str, length: int | None, extra: str = "") -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n{size}{extra}\r\n").encode()


def test_limits_serve_ordinary_requests(server):
    """Check a body under the caps, a multipart upload and a GET pass through unchanged."""
    base = f"http://{server[0]}:{server[1]}"
    assert httpx.post(base + "/echo", content=b"x" * 9_000).json() == {"bytes": 9_000}
    assert httpx.post(base + "/form", files={"file": ("a.bin", b"y" * 5_000)}).json() == {"bytes": 5_000}
    assert httpx.get(base + "/healthz").status_code == 200


@pytest.mark.parametrize(
    "head, body, status, match",
    [
        (_post_head("/echo", 10_001), b"", 413, "Content-Length 10001; the limit is 10000 bytes"),
        (_post_head("/echo", None), b"5\r\nhello\r\n0\r\n\r\n", 411, "Content-Length header"),
    ],
    ids=["declared too large", "chunked"],
)
def test_limits_refuse_bodies_before_reading(server, head, body, status, match):
    """Check oversize, chunked and malformed declarations are answered at once with JSON naming the header."""
    t = time.monotonic()
    sock = _open(server, head + body)
    got, raw = _answer(sock)
    assert got == status, raw
    assert match.encode() in raw and b"application/json" in raw
    assert time.monotonic() - t < 1.0


def test_limits_cut_off_a_slow_body(server):
    """Check a body sent at 1 byte/s is answered 408 after the grace, not held open."""
    t = time.monotonic()
    sock = _open(server, _post_head("/echo", 100))
    for _ in range(3):
        try:
            sock.sendall(b"x")
        except OSError:
            break
        time.sleep(0.5)
    got, raw = _answer(sock)
    elapsed = time.monotonic() - t
    assert got == 408, raw
    assert b"request body too slow" in raw
    assert LIMITS.upload_grace_s - 0.1 < elapsed < LIMITS.upload_grace_s + 2.0, elapsed


def test_limits_client_timeout_header_cannot_extend_the_deadline(server):
    """Check ``x-request-timeout-seconds: 0`` (Ray's proxy reads it as "no timeout") leaves our deadline at 3 s."""
    t = time.monotonic()
    r = httpx.post(f"http://{server[0]}:{server[1]}/sleep", content=b"z", headers={"x-request-timeout-seconds": "0"},
                   timeout=30)  # fmt: skip
    assert r.status_code == 504, r.text
    assert "request_timeout_s = 3 s" in r.json()["error"]
    assert LIMITS.request_timeout_s - 0.1 < time.monotonic() - t < LIMITS.request_timeout_s + 2.0


def test_limits_shed_uploads_beyond_the_in_flight_caps_and_health_answers(server):
    """Check that with uploads stalled, the 4th from one client and the 5th in all get 503 at once, while
    ``GET /healthz`` answers in milliseconds; the stalled ones end 408."""
    stalled = [_open(server, _post_head("/echo", 100) + b"x") for _ in range(LIMITS.max_uploads_per_client)]
    time.sleep(0.3)  # the server has taken all three
    t = time.monotonic()
    got, raw = _answer(_open(server, _post_head("/echo", 100)))
    assert got == 503 and b"3 from 127.0.0.1" in raw and b"retry-after: 1" in raw.lower()
    assert time.monotonic() - t < 0.5
    # other loopback addresses are other clients: one more fills the in-flight cap, the next is shed
    stalled.append(_open(server, _post_head("/echo", 100) + b"x", source="127.0.0.2"))
    time.sleep(0.3)
    got, raw = _answer(_open(server, _post_head("/echo", 100), source="127.0.0.3"))
    assert got == 503 and b"4 in all, 0 from 127.0.0.3" in raw
    t = time.monotonic()
    health = httpx.get(f"http://{server[0]}:{server[1]}/healthz")
    assert health.status_code == 200 and time.monotonic() - t < 0.5
    answers = [_answer(s)[0] for s in stalled]
    assert answers == [408] * len(stalled)
    # slots are released: an ordinary upload passes again
    assert httpx.post(f"http://{server[0]}:{server[1]}/echo", content=b"ok").json() == {"bytes": 2}


def test_limits_shed_uploads_beyond_the_bytes_in_flight(server):
    """Check a second body that would take the declared bytes in flight past 15,000 gets 503 at once, though
    the count caps are far away; a small one still passes beside the stalled one."""
    stalled = _open(server, _post_head("/echo", 9_000) + b"x", source="127.0.0.4")
    time.sleep(0.3)
    got, raw = _answer(_open(server, _post_head("/echo", 9_000), source="127.0.0.5"))
    assert got == 503 and b"9000 bytes; limits 4, 3 and 15000 bytes" in raw, raw
    assert httpx.post(f"http://{server[0]}:{server[1]}/echo", content=b"y" * 5_000).json() == {"bytes": 5_000}
    assert _answer(stalled)[0] == 408


def test_upload_limits_validate_their_fields():
    """Check nonsense limits are refused naming the field."""
    with pytest.raises(ValueError, match="upload_grace_s must be a positive number, not 0"):
        UploadLimits(upload_grace_s=0)
    with pytest.raises(ValueError, match="max_uploads_per_client \\(9\\) must not exceed max_uploads_in_flight"):
        UploadLimits(max_uploads_in_flight=8, max_uploads_per_client=9)
    with pytest.raises(ValueError, match="max_bytes_in_flight \\(10\\) must be at least max_upload_bytes"):
        UploadLimits(max_upload_bytes=11, max_bytes_in_flight=10)
