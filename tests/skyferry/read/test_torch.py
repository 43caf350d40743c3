"""The PyTorch front end in real PyTorch: DataLoader workers give the rank's batches in the
plan's order, and a StatefulDataLoader resumes exactly (`make test-frameworks`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from skyferry.commit.manifest import Manifest
from skyferry.read.reader import ReaderConfig, TrainingReader
from tests.helpers.sf_data import commit_drifted, commit_without_prefect, write_ml_csv

pytestmark = pytest.mark.frameworks
torch = pytest.importorskip("torch")

ROWS = 3_000


@pytest.fixture
def committed(home: Path, tmp_path: Path) -> Manifest:
    write_ml_csv(tmp_path / "src" / "a.csv", ROWS, seed=5)
    return commit_without_prefect(tmp_path / "src", "train", chunk_size="20KB")


def _config(tmp_path: Path) -> ReaderConfig:
    return ReaderConfig("train", rank=1, world_size=2, batch_size=40, seed=6,
                        cache_dir=tmp_path / "cache")


def _plan_ids(tmp_path: Path) -> list[int]:
    return [i for t in TrainingReader(_config(tmp_path)) for i in t.column("id").to_pylist()]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataloader_gives_the_ranks_batches_in_order(committed: Manifest, tmp_path: Path,
                                                      workers: int) -> None:
    from torch.utils.data import DataLoader

    from skyferry.read.torch_dataset import SkyferryIterableDataset

    loader = DataLoader(SkyferryIterableDataset(_config(tmp_path)), batch_size=None,
                        num_workers=workers)
    batches = list(loader)
    assert all(isinstance(b["id"], torch.Tensor) and b["id"].dtype == torch.int64
               for b in batches)
    assert [int(i) for b in batches for i in b["id"]] == _plan_ids(tmp_path)
    assert all(len(b["category"]) == len(b["id"]) for b in batches)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stateful_dataloader_resumes_exactly(committed: Manifest, tmp_path: Path,
                                               workers: int) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    from skyferry.read.torch_dataset import SkyferryIterableDataset

    first = StatefulDataLoader(SkyferryIterableDataset(_config(tmp_path)), batch_size=None,
                               num_workers=workers)
    seen = []
    for n, batch in enumerate(first):
        seen += [int(i) for i in batch["id"]]
        if n == 6:
            break
    state = first.state_dict()
    del first
    again = StatefulDataLoader(SkyferryIterableDataset(_config(tmp_path)), batch_size=None,
                               num_workers=workers)
    again.load_state_dict(state)
    seen += [int(i) for batch in again for i in batch["id"]]
    assert seen == _plan_ids(tmp_path)


def test_a_dataloader_reads_a_drifted_dataset_through_its_one_schema(home: Path,
                                                                     tmp_path: Path) -> None:
    """Batches that added, dropped and retyped columns (nested too): every batch has the
    resolved columns, text columns as lists, numbers as tensors where they have no nulls."""
    from torch.utils.data import DataLoader

    from skyferry.read.torch_dataset import SkyferryIterableDataset

    expected = commit_drifted(tmp_path / "src", "drift")
    loader = DataLoader(SkyferryIterableDataset(ReaderConfig("drift", batch_size=16)),
                        batch_size=None, num_workers=2)
    rows = {}
    for batch in loader:
        assert set(batch) == {"id", "a", "tags", "gone", "new"}
        ids = [int(i) for i in batch["id"]]
        for n, i in enumerate(ids):
            rows[i] = {k: (v[n].item() if isinstance(v, torch.Tensor) else v[n])
                       for k, v in batch.items()}
    assert rows == expected
