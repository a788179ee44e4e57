"""A forwarding HTTP proxy on 127.0.0.1 that makes a store slow or unreliable on purpose.

``blockpredict bench --store`` puts one with a delay in front of a local S3
endpoint (a distant store); the tests put one that answers 503 at times in
front of S3, GCS and HTTP servers (transient errors). Both count requests.
"""

from __future__ import annotations

import http.client
import itertools
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

HOP_HEADERS = {"connection", "transfer-encoding", "keep-alive", "content-length"}


class LoopbackProxy:
    """Forwards every request to ``target`` (``http://host:port``).

    Each request waits ``delay`` seconds first; with ``fail_every`` = n, every
    n-th request is answered ``503`` with no body instead of being forwarded.
    ``requests`` counts what reached the proxy, ``failures`` the 503s it sent.
    """

    def __init__(self, target: str, delay: float = 0.0, fail_every: int = 0) -> None:
        parts = urlsplit(target)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.delay, self.fail_every = delay, fail_every
        self.requests = self.failures = 0
        self._count = itertools.count(1)
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def refuse(self) -> bool:
        """Count one request; True when it is to be answered 503."""
        with self._lock:
            self.requests += 1
            n = next(self._count)
            fail = bool(self.fail_every) and n % self.fail_every == 0
            self.failures += fail
        return fail

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> LoopbackProxy:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _handler(proxy: LoopbackProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            if proxy.delay:
                time.sleep(proxy.delay)
            if proxy.refuse():
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                response = conn.getresponse()
                data = response.read()
            finally:
                conn.close()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in HOP_HEADERS:
                    self.send_header(key, value)
            size = response.getheader("Content-Length", "0")
            self.send_header("Content-Length", size if self.command == "HEAD" else str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = forward

    return Handler
