"""The Hugging Face front end in real `datasets`: shards are chunks, one worker gives the
plan's order, and Hugging Face's own state resumes exactly (`make test-frameworks`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from skyferry.commit.manifest import Manifest
from skyferry.read.reader import ReaderConfig, TrainingReader
from tests.helpers.sf_data import commit_drifted, commit_without_prefect, write_ml_csv

pytestmark = pytest.mark.frameworks
pytest.importorskip("datasets")

ROWS = 2_000


@pytest.fixture
def committed(home: Path, tmp_path: Path) -> Manifest:
    write_ml_csv(tmp_path / "src" / "a.csv", ROWS, seed=8)
    return commit_without_prefect(tmp_path / "src", "train", chunk_size="20KB")


def _config(tmp_path: Path) -> ReaderConfig:
    return ReaderConfig("train", rank=0, world_size=2, batch_size=30, seed=2,
                        cache_dir=tmp_path / "cache")


def test_a_hf_dataset_gives_the_ranks_rows_and_resumes(committed: Manifest,
                                                      tmp_path: Path) -> None:
    from skyferry.read.hf_dataset import hf_dataset

    expected = [i for t in TrainingReader(_config(tmp_path)) for i in t.column("id").to_pylist()]
    dataset = hf_dataset(_config(tmp_path))
    assert dataset.num_shards == len(committed.chunks)
    rows = list(dataset)
    assert [r["id"] for r in rows] == expected
    assert set(rows[0]) == {"id", "f0", "f1", "category", "label"}
    # Hugging Face's own resume state
    again = hf_dataset(_config(tmp_path))
    seen = []
    for n, row in enumerate(again):
        seen.append(row["id"])
        if n == 250:
            break
    state = again.state_dict()
    resumed = hf_dataset(_config(tmp_path))
    resumed.load_state_dict(state)
    assert seen + [r["id"] for r in resumed] == expected


def test_hf_workers_read_every_row_of_the_rank_once(committed: Manifest,
                                                   tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from skyferry.read.hf_dataset import hf_dataset

    expected = [i for t in TrainingReader(_config(tmp_path)) for i in t.column("id").to_pylist()]
    loader = DataLoader(hf_dataset(_config(tmp_path)), batch_size=None, num_workers=2)
    assert sorted(int(r["id"]) for r in loader) == sorted(expected)


def test_a_hf_dataset_reads_a_drifted_dataset_through_its_one_schema(home: Path,
                                                                     tmp_path: Path) -> None:
    from skyferry.read.hf_dataset import hf_dataset

    expected = commit_drifted(tmp_path / "src", "drift")
    rows = list(hf_dataset(ReaderConfig("drift", batch_size=16)))
    assert {r["id"]: r for r in rows} == expected
