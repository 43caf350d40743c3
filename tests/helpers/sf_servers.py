"""Real local servers for the three clouds' APIs, started once per test session.

Each runs in its own process group on a free 127.0.0.1 port, logs to a file, and is
stopped by its PID. See shared/EMULATORS.md for the measured facts behind the flags.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AZURITE = ROOT / "tools" / "node_modules" / ".bin" / "azurite-blob"
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
               "KBHBeksoGMGw==")
S3_KEY, S3_SECRET = "skyferry-test-key", "skyferry-test-secret-do-not-log"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    cmd: list[str]
    port: int
    ready_path: str
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env={**os.environ, **self.env})
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; "
                                   f"see {self.log}")
            try:
                with urllib.request.urlopen(self.endpoint + self.ready_path, timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # it answered: the server is up
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready after {timeout}s; "
                                       f"see {self.log}") from None
                try:
                    self.proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def restart(self) -> None:
        self.stop()
        self.start()


def moto(logs: Path) -> Server:
    port = free_port()
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    return Server("moto", [exe, "-H", "127.0.0.1", "-p", str(port)], port, "/moto-api/",
                  logs / "moto.log")


def gcs(logs: Path) -> Server:
    port = free_port()
    exe = (shutil.which("gcp-storage-emulator", path=str(Path(sys.executable).parent))
           or "gcp-storage-emulator")
    return Server("gcs", [exe, "start", "--host", "127.0.0.1", "--port", str(port),
                          "--in-memory"], port, "/", logs / "gcs.log")


def azurite(logs: Path, data: Path) -> Server:
    port = free_port()
    if not AZURITE.exists():
        raise RuntimeError(f"Azurite is not installed at {AZURITE}: run `make setup`")
    return Server("azurite", [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port),
                              "--location", str(data), "--skipApiVersionCheck",
                              "--disableTelemetry", "--silent", "--inMemoryPersistence"],
                  port, "/devstoreaccount1?comp=list", logs / "azurite.log")


def azure_connection_string(server: Server) -> str:
    return ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={server.endpoint}/devstoreaccount1;")
