"""The user's transforms: ``module:function`` names, each a ``DataFrame -> DataFrame``,
applied to one block's rows at a time; the rows they add or drop are counted."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence

import pandas as pd
import pyarrow as pa

from skyferry.errors import TransformError

__all__ = ["Transform", "apply_transforms", "load_transforms"]

logger = logging.getLogger("skyferry.process")

Transform = Callable[[pd.DataFrame], pd.DataFrame]


def load_transforms(names: Sequence[str]) -> list[tuple[str, Transform]]:
    """Each ``module:function`` imported, with its name; a typed error naming the one that
    cannot be."""
    loaded = []
    for name in names:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise TransformError(f"cannot import transform {name!r}: {exc}",
                                 transform=name) from exc
        if not callable(fn):
            raise TransformError(f"transform {name!r} is not callable", transform=name)
        loaded.append((name, fn))
    return loaded



def apply_transforms(table: pa.Table, transforms: Sequence[tuple[str, Transform]],
                     where: str) -> tuple[pa.Table, int, int]:
    """``table`` through each transform in turn; with the rows they added and dropped."""
    added = dropped = 0
    frame = table.to_pandas()
    for name, fn in transforms:
        before = len(frame)
        try:
            result = fn(frame)
        except Exception as exc:
            raise TransformError(f"transform {name} failed on {where}: {exc}",
                                 transform=name, source=where) from exc
        if not isinstance(result, pd.DataFrame):
            raise TransformError(f"transform {name} returned {type(result).__name__}, "
                                 "not a DataFrame", transform=name, source=where)
        change = len(result) - before
        if change:
            logger.info("transform %s %s %d rows of %s", name,
                        "added" if change > 0 else "dropped", abs(change), where)
        added += max(change, 0)
        dropped += max(-change, 0)
        frame = result
    return pa.Table.from_pandas(frame, preserve_index=False), added, dropped
