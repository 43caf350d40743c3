"""Real local servers for the three clouds' APIs, started once per test session.

Each runs in its own process group on a free 127.0.0.1 port, logs to a file, and is
stopped by its PID. See shared/EMULATORS.md for the measured facts behind the flags.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
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
    # --location keeps its debug files out of the work tree; blobs stay on that temp disk
    return Server("azurite", [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port),
                              "--location", str(data), "--skipApiVersionCheck",
                              "--disableTelemetry", "--silent"],
                  port, "/devstoreaccount1?comp=list", logs / "azurite.log")


def azure_connection_string(server: Server) -> str:
    return ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={server.endpoint}/devstoreaccount1;")


class CloudEnv:
    """Buckets and containers on the three servers, with the storage options to reach them."""

    def __init__(self, servers: dict[str, Server]) -> None:
        self.servers = servers
        self.s3 = servers["s3"]
        self.gs = servers["gs"]
        self.az = servers["az"]
        self.az_connection_string = azure_connection_string(self.az)

    def options(self, protocol: str) -> dict[str, object]:
        if protocol == "s3":
            return {"key": S3_KEY, "secret": S3_SECRET, "endpoint_url": self.s3.endpoint}
        if protocol == "gs":
            return {"token": "anon", "endpoint_url": self.gs.endpoint}
        return {"connection_string": self.az_connection_string}

    def reset(self) -> None:
        """Wipe the servers' state (moto and GCS have reset calls; Azure containers are
        deleted) and make the buckets the tests use."""
        for server in self.servers.values():
            if server.proc is None or server.proc.poll() is not None:
                server.start()
        urllib.request.urlopen(urllib.request.Request(self.s3.endpoint + "/moto-api/reset",
                                                      method="POST"), timeout=10).close()
        urllib.request.urlopen(self.gs.endpoint + "/wipe", timeout=10).close()
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient.from_connection_string(self.az_connection_string)
        for container in service.list_containers():
            service.delete_container(container.name)

    def make_bucket(self, protocol: str, name: str) -> None:
        import fsspec

        fs = fsspec.filesystem(protocol if protocol != "az" else "az",
                               **self.options(protocol), skip_instance_cache=True)
        fs.mkdir(name)

    def topology(self, path: Path, catalog: Path, nodes: Iterable[tuple[str, str, str]], *,
                 bucket: Callable[[str], str] = lambda name: name,
                 timeout_s: float = 10) -> Path:
        """A topology file at ``path``: one node per (name, protocol, cloud), each in a new
        bucket (``bucket(name)``) on its server, the catalog in the folder ``catalog``."""
        lines = [f'catalog: "{catalog}"', "nodes:"]
        for name, protocol, cloud in nodes:
            self.make_bucket(protocol, bucket(name))
            options = json.dumps({k: str(v) for k, v in self.options(protocol).items()})
            lines.append(f'  - {{name: {name}, cloud: {cloud}, region: r, url: "{protocol}://'
                         f'{bucket(name)}/data", timeout_s: {timeout_s}, '
                         f'storage_options: {options}}}')
        path.write_text("\n".join(lines) + "\n")
        return path

    def read_only_connection_string(self, container: str) -> str:
        """A connection string with a read/list-only SAS for ``container``: writes are refused."""
        from datetime import UTC, datetime, timedelta

        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        sas = generate_container_sas("devstoreaccount1", container, account_key=AZURITE_KEY,
                                     permission=ContainerSasPermissions(read=True, list=True),
                                     expiry=datetime.now(UTC) + timedelta(hours=1))
        return (f"BlobEndpoint={self.az.endpoint}/devstoreaccount1;"
                f"SharedAccessSignature={sas}")
