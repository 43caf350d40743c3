"""An HTTP proxy in front of a real server that faults chosen requests, a set number of times.

It forwards everything else untouched (websockets too), so the client meets a real server:
- ``fault="refuse"``: s3fs meets a node that turns down, say, its first object write with
  ``403 AccessDenied``;
- ``fault="lose-reply"``: the request reaches the server and is done, but its reply is lost
  (the connection closes), as when a busy server answers after the client gave up.
"""

from __future__ import annotations

import http.client
import select
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from tests.helpers import sf_servers

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-connection", "content-length"}

_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
           b"<Message>Access Denied (refused by the test proxy)</Message></Error>")


def _splice(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes (a websocket, after its upgrade)."""
    sockets = [a, b]
    while True:
        ready, _, _ = select.select(sockets, [], [], 60)
        if not ready:
            return
        for sock in ready:
            data = sock.recv(65536)
            if not data:
                return
            (b if sock is a else a).sendall(data)


class RefusingProxy:
    """Forwards to ``upstream``; the first ``times`` requests that ``match`` (and whose body
    matches ``match_body``, where given) meet ``fault``."""

    def __init__(self, upstream: str, match: Callable[[str, str], bool], times: int = 1,
                 fault: Literal["refuse", "lose-reply"] = "refuse",
                 match_body: Callable[[bytes], bool] | None = None) -> None:
        target = urlsplit(upstream)
        self.upstream_host = target.hostname or "127.0.0.1"
        self.upstream_port = target.port or 80
        self.match = match
        self.match_body = match_body
        self.left = times
        self.fault = fault
        self.refused: list[str] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _upgrade(self) -> None:
                upstream = socket.create_connection((proxy.upstream_host, proxy.upstream_port))
                head = f"{self.command} {self.path} {self.request_version}\r\n"
                head += "".join(f"{k}: {v}\r\n" for k, v in self.headers.items()) + "\r\n"
                upstream.sendall(head.encode("latin-1"))
                try:
                    _splice(self.connection, upstream)
                finally:
                    upstream.close()
                    self.close_connection = True

            def _handle(self) -> None:
                if self.headers.get("Upgrade", "").lower() == "websocket":
                    self._upgrade()
                    return
                body = self._body()
                faulted = proxy._refuse(self.command, self.path, body)
                if faulted and proxy.fault == "refuse":
                    self.send_response(403)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_DENIED)))
                    self.end_headers()
                    self.wfile.write(_DENIED)
                    return
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port,
                                                  timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                conn.close()
                if faulted:  # lose-reply: the server did it; the client hears nothing back
                    self.close_connection = True
                    return
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP:
                        self.send_header(key, value)
                length = response.getheader("Content-Length")
                self.send_header("Content-Length",
                                 length if self.command == "HEAD" and length else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _refuse(self, method: str, path: str, body: bytes) -> bool:
        path = unquote(path)
        with self._lock:
            if (self.left > 0 and self.match(method, path)
                    and (self.match_body is None or self.match_body(body))):
                self.left -= 1
                self.refused.append(f"{method} {path}")
                return True
        return False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> RefusingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def chunk_upload(method: str, path: str) -> bool:
    """The upload of a chunk object (not a probe sentinel, not a manifest)."""
    return method == "PUT" and "/batch=" in path and path.split("?")[0].endswith(".parquet")


def refusing_topology(path: Path, home: Path, endpoint: str, bucket: str = "refusing") -> Path:
    """Three nodes, one per cloud; aws-node-1 is the S3 ``bucket`` behind ``endpoint``."""
    s3 = (f'{{key: "{sf_servers.S3_KEY}", secret: "{sf_servers.S3_SECRET}", '
          f'endpoint_url: "{endpoint}"}}')
    path.write_text(f"""\
catalog: "{home}/catalog"
nodes:
  - {{name: aws-node-1, cloud: aws, region: us-east-1, url: "s3://{bucket}/data",
     storage_options: {s3}, work_pool: aws-pool}}
  - {{name: gcp-node-1, cloud: gcp, region: us-east1, url: "{home}/nodes/gcp-node-1",
     work_pool: gcp-pool}}
  - {{name: azure-node-1, cloud: azure, region: eastus, url: "{home}/nodes/azure-node-1",
     work_pool: azure-pool}}
""")
    return path
