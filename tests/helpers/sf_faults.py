"""Faults injected through real transforms: they run inside the pipeline's process stage.

These helpers are test code; they read the environment the test set up.
"""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path

import pandas as pd

_calls = 0
_lock = threading.Lock()


def _count() -> int:
    global _calls
    with _lock:
        _calls += 1
        return _calls


def reset() -> None:
    global _calls
    _calls = 0


def break_node_on_second_chunk(df: pd.DataFrame) -> pd.DataFrame:
    """On the 2nd chunk, replace the folder of node $SF_BREAK_NODE with a plain file.

    Other chunks write to the node concurrently, and a writer may create the folder again
    between its removal and the file's creation; each attempt moves the folder aside in one
    rename, and the swap is retried until the file wins.
    """
    if _count() == 2:
        node_dir = Path(os.environ["SKYFERRY_HOME"]) / "nodes" / os.environ["SF_BREAK_NODE"]
        for attempt in itertools.count():
            if node_dir.is_dir():
                node_dir.rename(node_dir.with_name(f"{node_dir.name}.gone-{attempt}"))
            try:
                with open(node_dir, "xb") as disk:
                    disk.write(b"this node's disk is gone")
                break
            except (FileExistsError, IsADirectoryError):
                continue
    return df


def block_on_sixth_chunk(df: pd.DataFrame) -> pd.DataFrame:
    """With $SF_BLOCK_MARKER set: on the 6th chunk, write the marker and hang forever."""
    marker = os.environ.get("SF_BLOCK_MARKER")
    if marker and _count() == 6:
        Path(marker).write_text("blocked")
        threading.Event().wait()
    return df


def signal_server_on_second_chunk(df: pd.DataFrame) -> pd.DataFrame:
    """On the 2nd chunk, send $SF_SIGNAL (SIGKILL, SIGSTOP) to the server group $SF_SIGNAL_PID."""
    import signal

    if _count() == 2:
        os.killpg(int(os.environ["SF_SIGNAL_PID"]), getattr(signal, os.environ["SF_SIGNAL"]))
    return df


def hold_on_second_chunk(df: pd.DataFrame) -> pd.DataFrame:
    """On the 2nd chunk, open the FIFO $SF_HELD for writing (the test's read returns once
    the run is held here), then wait until the test writes to the FIFO $SF_RELEASE."""
    if _count() == 2:
        with open(os.environ["SF_HELD"], "w") as held:
            held.write("held\n")
        with open(os.environ["SF_RELEASE"]) as release:
            release.read()
    return df


def kill_own_process_once(df: pd.DataFrame) -> pd.DataFrame:
    """On the 3rd chunk this process sees, SIGKILL the process itself (a Dask or Ray worker
    dying mid-task), once per run: the marker file $SF_KILL_MARKER says it happened."""
    import signal

    marker = Path(os.environ["SF_KILL_MARKER"])
    if _count() == 3:
        try:
            with open(marker, "x") as fh:
                fh.write(str(os.getpid()))
        except FileExistsError:
            return df
        os.kill(os.getpid(), signal.SIGKILL)
    return df
