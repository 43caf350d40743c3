"""A PostgreSQL server on loopback for a real ``prefect server``: Prefect's database for many
workers (its docs: SQLite for light use, PostgreSQL where runs and workers are many).

The cluster lives in a temporary folder; as root, it runs as the ``postgres`` user (initdb
refuses root). :func:`available` says whether Debian's server binaries are here
(``apt-get install postgresql``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

from tests.helpers.sf_servers import free_port

__all__ = ["PostgresServer", "available"]

_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def _tool(name: str) -> str | None:
    for folder in _BIN_DIRS:
        if (folder / name).exists():
            return str(folder / name)
    return shutil.which(name)


def available() -> bool:
    return all(_tool(t) for t in ("initdb", "pg_ctl", "createdb"))


class PostgresServer:
    """``initdb`` + ``pg_ctl start`` on a free loopback port; :attr:`url` for Prefect."""

    def __init__(self, root: Path, database: str = "prefect") -> None:
        self.root, self.database = root, database
        self.data, self.socket = root / "data", root / "socket"
        self.port = free_port()
        self._user: list[str] = []
        if os.geteuid() == 0:
            self._user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *cmd: str) -> None:
        done = subprocess.run([*self._user, *cmd], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr[-2000:]}")

    def start(self) -> PostgresServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket.mkdir(exist_ok=True)
        if self._user:
            owner = pwd.getpwnam("postgres")
            for path in (self.root, self.socket):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._run(str(_tool("initdb")), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                  "--no-sync", "-E", "UTF8")
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                   f"-c unix_socket_directories={self.socket} "
                   "-c max_connections=200")
        self._run(str(_tool("pg_ctl")), "-D", str(self.data), "-l", str(self.root / "pg.log"),
                  "-o", options, "-w", "start")
        self._run(str(_tool("createdb")), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                  "postgres", self.database)
        return self

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{self.database}"

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run([*self._user, str(_tool("pg_ctl")), "-D", str(self.data), "-m", "fast",
                            "-w", "stop"], capture_output=True, timeout=60)
