"""A fault-injecting HTTP proxy in front of an S3 server (moto), for storage-fault tests.

Clients (pyarrow's S3FileSystem, boto3) point at :attr:`FaultyS3Proxy.endpoint` through ``JF_S3_ENDPOINT``;
the proxy forwards every request to the upstream server unchanged (the ``Host`` header included, so
signatures still match) except a seeded fraction, which it answers with one of:

- ``slowdown``: 503 with S3's ``SlowDown`` XML error body (the request never reaches the server);
- ``internal``: 500 with S3's ``InternalError`` body (never reaches the server);
- ``reset``: the request is forwarded, then the connection is reset mid-response: status and headers with
  the full ``Content-Length`` go out, then half the body, then a TCP RST (an answer without a body is
  reset before its status line: the server acted, the client cannot know);
- ``truncate``: as ``reset`` but the connection is closed in order (FIN) after half the body: a short read
  that only the declared ``Content-Length`` reveals;
- ``latency``: the answer is delayed by ``latency_s`` (a spike, not an error);
- ``corrupt`` (only when asked for: no store does this over TLS): one byte of a GET's body is flipped, the
  length kept, so that only a checksum can tell.

``down = True`` makes it refuse everything (every connection is reset before any answer: storage gone).
``injected`` counts what was injected by kind, ``forwarded`` the requests that reached the server.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

FAULT_KINDS = ("slowdown", "internal", "reset", "truncate", "latency")
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}
# Hop-by-hop headers: they describe the client's connection to the proxy, not the request.
_HOP_HEADERS = {"connection", "keep-alive", "expect", "transfer-encoding", "proxy-connection", "te", "upgrade"}


class FaultyS3Proxy:
    """Start with :meth:`start` (or as a context manager); thread-safe counters."""

    def __init__(self, upstream: str, fault_rate: float = 0.0, seed: int = 0, kinds=FAULT_KINDS, latency_s=0.3):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.fault_rate, self.kinds, self.latency_s = fault_rate, tuple(kinds), latency_s
        self.down = False
        self.injected: Counter = Counter()
        self.forwarded = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultyS3Proxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultyS3Proxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def draw_fault(self) -> str | None:
        """The fault to inject into the next request, or None; counts it."""
        with self._lock:
            if self.down:
                self.injected["down"] += 1
                return "down"
            if self._rng.random() >= self.fault_rate:
                return None
            kind = self._rng.choice(self.kinds)
            self.injected[kind] += 1
            return kind

    def count_forwarded(self) -> None:
        with self._lock:
            self.forwarded += 1

    @property
    def total_injected(self) -> int:
        with self._lock:
            return sum(n for kind, n in self.injected.items() if kind != "down")


def _handler_for(proxy: FaultyS3Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(_ProxyHandler):
        pass

    Handler.proxy = proxy
    return Handler


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs use it; also answers Expect: 100-continue
    proxy: FaultyS3Proxy
    upstream_conn: http.client.HTTPConnection | None = None

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's signature
        pass

    def do_GET(self) -> None:
        self._serve()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _serve(self) -> None:
        fault = self.proxy.draw_fault()
        if fault == "down":
            self._close(abort=True)
            return
        body = self._read_body()
        if fault in _ERRORS:
            self._send_error_xml(*_ERRORS[fault])
            return
        status, reason, headers, data = self._forward(body)
        if fault == "latency":
            time.sleep(self.proxy.latency_s)
        if fault == "corrupt" and self.command == "GET" and data:
            data = data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1 :]
        if fault in ("reset", "truncate"):
            if data and self.command != "HEAD":  # a bodiless answer is cut before its status line
                self._send(status, reason, headers, data[: len(data) // 2])
            self._close(abort=fault == "reset")
            return
        self._send(status, reason, headers, data)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        headers["Content-Length"] = str(len(body))
        for attempt in range(2):  # the kept-alive upstream connection may have been closed by the server
            conn = self.upstream_conn or http.client.HTTPConnection(*self.proxy.upstream, timeout=60)
            self.upstream_conn = conn
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in headers.items():
                    conn.putheader(key, value)
                conn.endheaders(body)
                response = conn.getresponse()
                data = response.read()
                break
            except (http.client.HTTPException, OSError):
                conn.close()
                self.upstream_conn = None
                if attempt:
                    raise
        self.proxy.count_forwarded()
        kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_HEADERS]
        return response.status, response.reason, kept, data

    def _send(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response_only(status, reason)
        for key, value in headers:
            if key.lower() not in ("content-length", "date", "server"):
                self.send_header(key, value)
        length = next((v for k, v in headers if k.lower() == "content-length"), None)
        self.send_header("Content-Length", length if length is not None else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def _send_error_xml(self, status: int, code: str, message: str) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>{uuid.uuid4().hex[:16]}</RequestId></Error>"
        ).encode()
        headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
        self._send(status, "Service Unavailable" if status == 503 else "Internal Server Error", headers, body)

    def _close(self, abort: bool) -> None:
        """Close the client's connection: ``abort`` with a TCP RST (SO_LINGER 0), else in order (FIN)."""
        try:
            self.wfile.flush()
        except OSError:
            pass
        if abort:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True
        self.connection.close()
