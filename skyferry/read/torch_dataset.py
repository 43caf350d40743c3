"""The PyTorch front end: an ``IterableDataset`` over a rank's batches (needs the ``torch``
extra). Use it with ``batch_size=None``: the reader makes the batches.

    dataset = SkyferryIterableDataset(ReaderConfig("train", rank=rank, world_size=world,
                                                   batch_size=256, seed=17, epoch=epoch))
    loader = StatefulDataLoader(dataset, batch_size=None, num_workers=2)

Each DataLoader worker reads the rank's batches whose number is its id modulo the number of
workers; the loader takes one batch from each worker in turn, so the rank's batches come out
in the plan's order. ``state_dict``/``load_state_dict`` follow ``StatefulDataLoader``'s
protocol: each worker saves and restores its own reader's state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from skyferry.read.reader import ReaderConfig, TrainingReader, pin_snapshot
from skyferry.topology import load_topology

__all__ = ["SkyferryIterableDataset", "to_tensors"]


def to_tensors(table: pa.Table) -> dict[str, Any]:
    """A batch as a dict: numeric and boolean columns as tensors, others as Python lists."""
    out: dict[str, Any] = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        kind = column.type
        if (pa.types.is_integer(kind) or pa.types.is_floating(kind)
                or pa.types.is_boolean(kind)) and column.null_count == 0:
            out[name] = torch.from_numpy(np.array(column.to_numpy()))  # a writable copy
        else:
            out[name] = column.to_pylist()
    return out


class SkyferryIterableDataset(IterableDataset):  # type: ignore[type-arg,misc]
    """One rank's batches of a committed dataset, verified and from the nearest replica."""

    def __init__(self, config: ReaderConfig, *, topology: str | None = None,
                 tensors: bool = True) -> None:
        # every worker reads the snapshot that is the newest now
        self.config = pin_snapshot(config, load_topology(topology))
        self.topology, self.tensors = topology, tensors
        self._state: dict[str, Any] | None = None
        self._reader: TrainingReader | None = None

    def _make(self) -> TrainingReader:
        info = get_worker_info()
        config = self.config if info is None else dataclasses.replace(
            self.config, worker=info.id, workers=info.num_workers)
        reader = TrainingReader(config, topology=load_topology(self.topology))
        if self._state:
            reader.load_state_dict(self._state)
            self._state = None
        return reader

    def __iter__(self) -> Iterator[Any]:
        self._reader = self._make()
        for table in self._reader:
            yield to_tensors(table) if self.tensors else table

    def state_dict(self) -> dict[str, Any]:
        if self._reader is not None:
            return self._reader.state_dict()
        return dict(self._state or {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = dict(state) if state else None
        self._reader = None
