"""One epoch of a dataset through skyferry's PyTorch front end, as MosaicML's side of
``reader_throughput_ratio_to_mosaic`` is read: a ``DataLoader`` with 2 workers, batches of
BATCH rows as tensors, from the nodes into a cold CACHE_DIR, every chunk's hash checked.
Prints one JSON line: the rows and the seconds of the epoch.

    reader_loader.py DATASET CACHE_DIR BATCH    (SKYFERRY_HOME names the data directory)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    from torch.utils.data import DataLoader

    from skyferry.read.reader import ReaderConfig
    from skyferry.read.torch_dataset import SkyferryIterableDataset

    dataset, cache, batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    started = time.perf_counter()
    config = ReaderConfig(dataset, batch_size=batch, seed=1, cache_dir=cache)
    rows = 0
    for tensors in DataLoader(SkyferryIterableDataset(config), batch_size=None, num_workers=2):
        rows += len(tensors["id"])
    seconds = time.perf_counter() - started
    sys.stdout.write(json.dumps({"rows": rows, "seconds": seconds}) + "\n")


if __name__ == "__main__":
    main()
