"""The Ray Data front end: a datasource with one read task per chunk, each carrying the
replica chosen for it (needs the ``ray`` extra).

    ds = ray.data.read_datasource(SkyferryDatasource("train", seed=17, epoch=0, cloud="gcp"))

Each read task verifies its chunk (from the chosen replica, then the others) before it
yields the chunk's live rows, shuffled as the read plan shuffles them. Ray decides which task
runs where and, with ``streaming_split``, which rank gets which rows.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from skyferry.read.reader import ReaderConfig, TrainingReader, pin_snapshot
from skyferry.topology import load_topology

__all__ = ["SkyferryDatasource"]


class SkyferryDatasource(Datasource):  # type: ignore[misc]
    def __init__(self, dataset: str, *, seed: int = 0, epoch: int = 0,
                 cloud: str | None = None, region: str | None = None,
                 topology: str | None = None, cache_dir: Path | None = None,
                 snapshot: str | None = None) -> None:
        self.config = pin_snapshot(  # every read task reads the snapshot newest now
            ReaderConfig(dataset, seed=seed, epoch=epoch, cloud=cloud, region=region,
                         cache_dir=cache_dir, snapshot=snapshot), load_topology(topology))
        self.topology = topology
        reader = TrainingReader(self.config, topology=load_topology(topology))
        plan = reader.plan
        self.chunks = [(chunk, start, tuple(reader.fetcher.nearest(chunk)))
                       for chunk, start in zip(plan.chunks, plan.starts(), strict=True)]
        reader.close()

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(chunk.size for chunk, _, _ in self.chunks)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(functools.partial(_read, self.config, self.topology, chunk.digest,
                                           start, start + chunk.rows, nodes),
                         BlockMetadata(num_rows=chunk.rows, size_bytes=chunk.size,
                                       exec_stats=None),
                         per_task_row_limit=per_task_row_limit)
                for chunk, start, nodes in self.chunks]


def _read(config: ReaderConfig, topology: str | None, digest: str, start: int, stop: int,
          nodes: tuple[str, ...]) -> Iterator[pa.Table]:
    reader = TrainingReader(config, topology=load_topology(topology))
    reader.fetcher.chosen[digest] = nodes
    try:
        yield from reader.span(start, stop)
    finally:
        reader.close()
