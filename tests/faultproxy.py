"""A small threaded loopback HTTP proxy that injects transient S3 faults.

Put it in front of the SeaweedFS test server and point a client at `proxy.url`.
Requests are forwarded byte for byte (the Host header too, so SigV4 signatures
stay valid) unless a queued fault applies:

    with FaultProxy(server.endpoint) as proxy:
        proxy.fail(2, 503, "SlowDown")   # next 2 requests: 503 SlowDown, not forwarded
        proxy.reset(1)                   # next request: TCP reset half-way through it
        proxy.truncate(1)                # next GET: half the body, then a reset
        proxy.corrupt(1)                 # next GET body: one byte flipped
        proxy.corrupt(1, strip_checksums=True)  # ... and x-amz-checksum-* removed
        proxy.requests                   # what it saw: [Seen(method, path, outcome)]

Faults apply in the order they were queued, each to the next request(s) that match
its methods. It is bounded: every socket has a timeout, and the server stops itself
after `lifetime` seconds even if nobody calls `stop()`.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",  # answered here (100 Continue); SigV4 does not sign it
}
ALL_METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE"})


@dataclass
class Fault:
    kind: str  # fail | reset | truncate | corrupt
    remaining: int
    methods: frozenset[str]
    status: int = 503
    code: str = "SlowDown"
    strip_checksums: bool = False


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    outcome: str  # forwarded | fail:<status> | reset | truncate | corrupt


@dataclass
class _State:
    faults: list[Fault] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _error_xml(code: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>faultproxy</RequestId></Error>"
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue for botocore uploads
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    # --- faults ---------------------------------------------------------------------

    def _take(self, kinds: Iterable[str], body_ok: bool = True) -> Fault | None:
        """Consume one unit of the first queued fault matching this request."""
        state = self.server.state
        with state.lock:
            for fault in state.faults:
                if fault.remaining > 0 and self.command in fault.methods:
                    if fault.kind not in kinds or not body_ok:
                        return None  # the head of the queue is for a later step
                    fault.remaining -= 1
                    return fault
            return None

    def _record(self, outcome: str) -> None:
        with self.server.state.lock:
            self.server.state.seen.append(Seen(self.command, self.path, outcome))

    def _rst(self) -> None:
        """Close with a TCP reset (SO_LINGER 0), not a polite FIN."""
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        self.close_connection = True

    # --- forwarding -----------------------------------------------------------------

    def _proxy(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._answer(501, _error_xml("NotImplemented", "faultproxy: chunked request"))
            return
        length = int(self.headers.get("Content-Length") or 0)
        fault = self._take(("fail", "reset"))
        if fault is not None and fault.kind == "reset":
            self.rfile.read(length // 2)  # mid-request: part of the body, then RST
            self._record("reset")
            self._rst()
            return
        body = self.rfile.read(length) if length else b""
        if fault is not None:  # fail
            self._record(f"fail:{fault.status}")
            self._answer(fault.status, _error_xml(fault.code, "injected by faultproxy"))
            return

        up = self.server.upstream
        conn = http.client.HTTPConnection(
            up.hostname or "127.0.0.1", up.port, timeout=self.server.io_timeout
        )
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    conn.putheader(name, value)
            if length or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
            status, reason = resp.status, resp.reason
        finally:
            conn.close()

        has_body = self.command != "HEAD" and 200 <= status < 300 and len(data) > 1
        fault = self._take(("truncate", "corrupt"), body_ok=has_body)
        if fault is not None and fault.kind == "corrupt":
            i = len(data) // 2
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
            if fault.strip_checksums:
                headers = [(k, v) for k, v in headers if not k.lower().startswith("x-amz-checksum")]
        # Recorded before answering, so a client that has its answer sees it in `requests`.
        self._record(fault.kind if fault is not None else "forwarded")
        self.send_response_only(status, reason)
        for name, value in headers:
            if self.command == "HEAD" or name.lower() != "content-length":
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault is not None and fault.kind == "truncate":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._rst()
            return
        if self.command != "HEAD":
            self.wfile.write(data)

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body) if self.command != "HEAD" else 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: str, io_timeout: float) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = urlparse(upstream)
        self.io_timeout = io_timeout
        self.state = _State()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        sock.settimeout(self.io_timeout)  # a stuck client cannot hold a thread forever
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # resets and client hang-ups are the point here


class FaultProxy:
    def __init__(self, upstream: str, lifetime: float = 300.0, io_timeout: float = 30.0) -> None:
        self._server = _Server(upstream, io_timeout)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._stopped = False

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- fault queue ----------------------------------------------------------------

    def _queue(self, fault: Fault) -> FaultProxy:
        with self._server.state.lock:
            self._server.state.faults.append(fault)
        return self

    def fail(
        self,
        n: int,
        status: int = 503,
        code: str = "SlowDown",
        methods: Iterable[str] = ALL_METHODS,
    ) -> FaultProxy:
        """Answer the next n matching requests with `status` and an S3 error `code`."""
        return self._queue(Fault("fail", n, frozenset(methods), status=status, code=code))

    def reset(self, n: int, methods: Iterable[str] = ALL_METHODS) -> FaultProxy:
        """Reset the connection half-way through reading the next n matching requests."""
        return self._queue(Fault("reset", n, frozenset(methods)))

    def truncate(self, n: int, methods: Iterable[str] = ("GET",)) -> FaultProxy:
        """Send the headers and half the body of the next n responses, then reset."""
        return self._queue(Fault("truncate", n, frozenset(methods)))

    def corrupt(
        self, n: int, strip_checksums: bool = False, methods: Iterable[str] = ("GET",)
    ) -> FaultProxy:
        """Flip one byte in the next n response bodies; optionally drop botocore's
        x-amz-checksum-* headers so that only the store's own sha256 can notice."""
        return self._queue(Fault("corrupt", n, frozenset(methods), strip_checksums=strip_checksums))

    def clear(self) -> None:
        with self._server.state.lock:
            self._server.state.faults.clear()

    @property
    def pending(self) -> int:
        with self._server.state.lock:
            return sum(f.remaining for f in self._server.state.faults)

    @property
    def requests(self) -> list[Seen]:
        with self._server.state.lock:
            return list(self._server.state.seen)
