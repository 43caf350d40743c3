"""Faults injected through real transforms: they run inside the pipeline's process stage.

These helpers are test code; they read the environment the test set up.
"""

from __future__ import annotations

import os
import shutil
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
    """On the 2nd chunk, replace the folder of node $SF_BREAK_NODE with a plain file."""
    if _count() == 2:
        node_dir = Path(os.environ["SKYFERRY_HOME"]) / "nodes" / os.environ["SF_BREAK_NODE"]
        shutil.rmtree(node_dir, ignore_errors=True)
        node_dir.write_bytes(b"this node's disk is gone")
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
