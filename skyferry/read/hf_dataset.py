"""The Hugging Face front end: a ``datasets.IterableDataset`` of one rank's rows, whose shards
are the dataset's chunks (needs the ``hf`` extra).

    dataset = hf_dataset(ReaderConfig("train", rank=rank, world_size=world, seed=17))

With one worker the rows come in the plan's order. Hugging Face gives each DataLoader worker
a share of the shards, so with workers each reads the rank's rows of its chunks, and the
order is the loader's mix of theirs; every row still comes once. ``dataset.state_dict()``
(Hugging Face's own: the shard and the row within it) resumes exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import datasets

from skyferry.read.reader import ReaderConfig, TrainingReader, pin_snapshot
from skyferry.topology import load_topology

__all__ = ["hf_dataset"]


def hf_dataset(config: ReaderConfig, *, topology: str | None = None) -> datasets.IterableDataset:
    config = pin_snapshot(config, load_topology(topology))  # every shard: one snapshot
    reader = TrainingReader(config, topology=load_topology(topology))
    shards = [chunk.digest for chunk in reader.plan.chunks]  # the epoch's order
    reader.close()
    return datasets.IterableDataset.from_generator(
        _rows, gen_kwargs={"shards": shards, "config": config, "topology": topology})


def _rows(shards: list[str], config: ReaderConfig, topology: str | None
          ) -> Iterator[dict[str, Any]]:
    reader = TrainingReader(config, topology=load_topology(topology))
    try:
        for table in reader.tables(chunks=set(shards)):
            yield from table.to_pylist()
    finally:
        reader.close()
