"""Fault injection for the chaos suite: a TCP proxy in front of a server, and a store that
fails on purpose.

- :class:`FaultProxy` forwards TCP connections to a server on 127.0.0.1 and, when told,
  adds latency, caps bandwidth, resets connections, hangs them, or refuses new ones.
- ``faulty://`` is an fsspec filesystem over a local folder that reads its faults from a
  JSON file beside the folder (``<root>.faults.json``): ``{"enospc": true}`` fails every
  write with ENOSPC, ``{"flip_writes": 2}`` flips a byte in the next two objects written,
  ``{"down": true}`` fails every call. It is not a local filesystem to skyferry's Store, so
  writes go through ``pipe_file`` and replicas are verified by reading them back.
"""

from __future__ import annotations

import errno
import io
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

__all__ = ["FaultProxy", "FaultyFileSystem", "set_faults"]


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream_port``; its faults change live."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.latency_s = 0.0  # each block sent back to the client arrives this much later
        self.bandwidth = 0.0  # bytes/s each way per connection; 0: no cap
        self.mode = "pass"  # pass | hang | refuse
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="fault-proxy").start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def heal(self) -> None:
        self.latency_s, self.bandwidth, self.mode = 0.0, 0.0, "pass"

    def reset_all(self) -> None:
        """Reset every open connection (RST), as a crashed peer or a middlebox would."""
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for conn in conns:
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00"
                                b"\x00\x00\x00\x00")
                conn.close()
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.reset_all()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.mode == "refuse":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00"
                                  b"\x00\x00\x00\x00")
                client.close()
                continue
            # connected on a thread of its own: a connect that waits (a busy single-threaded
            # server) must not hold up every other connection, the node's probes included
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), 5)
        except OSError:
            client.close()
            return
        # the 5 s was for connecting: a reply that takes longer (a request trickling in under
        # a bandwidth cap) must not end the connection
        upstream.settimeout(None)
        with self._lock:
            self._conns.update((client, upstream))
        for src, dst, back in ((client, upstream, False), (upstream, client, True)):
            threading.Thread(target=self._pump, args=(src, dst, back), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, back: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                received = time.monotonic()
                if not data:
                    break
                while self.mode == "hang" and not self._closed:
                    time.sleep(0.05)
                if back and self.latency_s:  # a delay line: each block latency_s after it
                    wait = received + self.latency_s - time.monotonic()  # arrived, not after
                    if wait > 0:                                         # the block before
                        time.sleep(wait)
                if self.bandwidth:
                    for i in range(0, len(data), 16384):
                        piece = data[i:i + 16384]
                        dst.sendall(piece)
                        time.sleep(len(piece) / self.bandwidth)
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                # shutdown first: a close alone neither wakes the other direction's thread
                # blocked in recv on the socket nor sends the FIN while that recv holds it,
                # so the peer would wait on a connection that is over
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                try:
                    sock.close()
                except OSError:
                    pass
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)


def set_faults(root: str | Path, **faults: Any) -> None:
    """Set the faults of the ``faulty://`` node rooted at ``root`` (none: heal it)."""
    Path(f"{root}.faults.json").write_text(json.dumps(faults))


class FaultyFileSystem(AbstractFileSystem):
    """A local folder behind faults read from ``<root>.faults.json`` on every call."""

    protocol = "faulty"
    root_marker = "/"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.local = LocalFileSystem(auto_mkdir=True)
        self._lock = threading.Lock()

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        path = path[len("faulty://"):] if path.startswith("faulty://") else path
        return "/" + path.lstrip("/") if path else "/"

    def _faults(self, path: str) -> dict[str, Any]:
        probe = Path(path)
        for parent in (probe, *probe.parents):
            control = Path(f"{parent}.faults.json")
            if control.is_file():
                faults: dict[str, Any] = json.loads(control.read_text() or "{}")
                faults["_control"] = str(control)
                return faults
        return {}

    def _check(self, path: str, writing: bool = False) -> dict[str, Any]:
        faults = self._faults(path)
        if faults.get("down"):
            raise ConnectionRefusedError(errno.ECONNREFUSED, "node is down (injected)")
        if writing and faults.get("enospc"):
            raise OSError(errno.ENOSPC, "No space left on device (injected)", path)
        return faults

    def pipe_file(self, path: str, value: bytes, **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        faults = self._check(path, writing=True)
        if faults.get("flip_writes") and "/_probe/" not in path:
            with self._lock:
                faults = self._faults(path)
                left = int(faults.get("flip_writes", 0))
                if left:
                    value = bytes([value[0] ^ 0xFF]) + value[1:] if value else value
                    faults["flip_writes"] = left - 1
                    control = faults.pop("_control")
                    Path(control).write_text(json.dumps(faults))
        self.local.pipe_file(path, value)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        """A streamed write lands through :meth:`pipe_file` when it is closed, faults and
        all (a discarded one lands nowhere); reads are the local file's."""
        if "w" not in mode:
            path = self._strip_protocol(path)
            self._check(path)
            return self.local._open(path, mode, **kwargs)
        return _FaultyWrite(self, path)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                 **kwargs: Any) -> bytes:
        path = self._strip_protocol(path)
        self._check(path)
        return bytes(self.local.cat_file(path, start=start, end=end))

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        self._check(path)
        return dict(self.local.info(path))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        self._check(path)
        return self.local.ls(path, detail=detail)

    def exists(self, path: str, **kwargs: Any) -> bool:
        path = self._strip_protocol(path)
        self._check(path)
        return bool(self.local.exists(path))

    def rm_file(self, path: str) -> None:
        path = self._strip_protocol(path)
        self._check(path)
        self.local.rm_file(path)

    def _rm(self, path: str) -> None:
        self.rm_file(path)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self.local.mkdir(self._strip_protocol(path), create_parents=create_parents)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.local.makedirs(self._strip_protocol(path), exist_ok=exist_ok)


class _FaultyWrite(io.BytesIO):
    def __init__(self, fs: FaultyFileSystem, path: str) -> None:
        super().__init__()
        self.fs, self.path, self.discarded = fs, path, False
        fs._check(fs._strip_protocol(path), writing=True)

    def discard(self) -> None:
        self.discarded = True
        super().close()

    def close(self) -> None:
        if not self.closed and not self.discarded:
            data = self.getvalue()
            super().close()
            self.fs.pipe_file(self.path, data)
        super().close()


fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)
