"""A loopback proxy in front of a real server that misbehaves on a fixed share of requests.

Every ``every``-th POST is answered by the proxy itself, cycling through ``faults``: an HTTP
status (429, 500, 503...) or ``"stall"`` (holds the connection for ``stall_seconds`` and
closes it without an answer, as an overloaded server behind a load balancer does). All other
requests are forwarded unchanged. A request whose body has already drawn ``max_faults_per_body``
faults is forwarded whatever its place in the count, so a client's retries always get through
in the end, however the requests of a busy machine interleave. It only ever talks to loopback
addresses.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        *,
        every: int = 3,
        faults=(429, 500, "stall"),
        stall_seconds: float = 4.0,
        max_faults_per_body: int = 2,
    ):
        if not upstream.startswith(("http://127.", "http://localhost")):
            raise ValueError("the fault proxy forwards to loopback only")
        self.upstream = upstream.rstrip("/")
        self.every = every
        self.stall_seconds = stall_seconds
        self._faults = itertools.cycle(faults)
        self._lock = threading.Lock()
        self.posts = 0
        self.max_faults_per_body = max_faults_per_body
        self._faults_by_body: dict[int, int] = {}
        self.injected: list[int | str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next_fault(self, body: bytes) -> int | str | None:
        with self._lock:
            self.posts += 1
            key = hash(body)
            if self.posts % self.every or self._faults_by_body.get(key, 0) >= self.max_faults_per_body:
                return None
            self._faults_by_body[key] = self._faults_by_body.get(key, 0) + 1
            fault = next(self._faults)
            self.injected.append(fault)
            return fault

    def _forward(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        # The API under /v1 as the upstream's, the server's own routes (vLLM's /tokenize) at its root.
        if path.startswith("/v1/"):
            target = self.upstream + path.removeprefix("/v1")
        else:
            target = self.upstream.removesuffix("/v1") + path
        request = urllib.request.Request(target, data=body, method=method)
        request.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=600) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._reply(*proxy._forward("GET", self.path, None))

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                fault = proxy._next_fault(body)
                if fault == "stall":
                    time.sleep(proxy.stall_seconds)
                    self.close_connection = True
                    return
                if fault is not None:
                    self._reply(int(fault), json.dumps({"error": {"message": f"injected {fault}"}}).encode())
                    return
                self._reply(*proxy._forward("POST", self.path, body))

            def _reply(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
