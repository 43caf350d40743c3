"""Object keys: checked so that none can leave its store's root."""

from __future__ import annotations

import re

from skyferry.errors import UnsafeKeyError

__all__ = ["safe_key", "temp_target"]

_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


def safe_key(*parts: str) -> str:
    """Join key parts with ``/`` and refuse anything that could leave the store's root.

    >>> safe_key("train", "date=2026-01-01", "chunk-00000.parquet")
    'train/date=2026-01-01/chunk-00000.parquet'
    """
    key = "/".join(p for p in parts if p)
    segments = key.split("/")
    if (
        not key
        or any(s in ("", ".", "..") for s in segments)
        or _BAD_CHARS.search(key)
        or ":" in segments[0]
    ):
        raise UnsafeKeyError(f"unsafe object key {key!r}: it must stay inside its prefix", key=key)
    return key


def temp_target(key: str) -> str | None:
    """The key a local write's temp file (``.tmp-<32 hex>-<name>``) will be renamed to."""
    head, _, name = key.rpartition("/")
    if name.startswith(".tmp-") and len(name) > 38 and name[37] == "-":
        return f"{head}/{name[38:]}" if head else name[38:]
    return None
