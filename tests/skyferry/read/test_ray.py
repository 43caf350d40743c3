"""The Ray Data front end in real Ray: one read task per chunk carrying its chosen replica,
every row once, and a corrupt chosen replica read around (`make test-frameworks`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from skyferry.commit.manifest import Manifest, open_catalog
from skyferry.topology import load_topology
from tests.helpers.sf_data import commit_drifted, commit_without_prefect, write_ml_csv

pytestmark = pytest.mark.frameworks
ray = pytest.importorskip("ray")

ROWS = 2_000


@pytest.fixture
def committed(home: Path, tmp_path: Path) -> Manifest:
    write_ml_csv(tmp_path / "src" / "a.csv", ROWS, seed=9)
    return commit_without_prefect(tmp_path / "src", "train", chunk_size="20KB")


def test_a_ray_dataset_reads_each_chunk_in_its_own_task(committed: Manifest, home: Path,
                                                       tmp_path: Path) -> None:
    from skyferry.read.ray_datasource import SkyferryDatasource

    source = SkyferryDatasource("train", seed=3, cloud="gcp", cache_dir=tmp_path / "cache")
    assert len(source.get_read_tasks(2)) == len(committed.chunks)
    chosen = {chunk.index: nodes[0] for chunk, _, nodes in source.chunks}
    gcp = {n.name for n in load_topology().nodes if n.cloud == "gcp"}
    for chunk in committed.chunks:
        if any(r.node in gcp for r in chunk.verified):
            assert chosen[chunk.index] in gcp
    bad = committed.chunks[0]
    path = home / "nodes" / chosen[bad.index] / bad.key
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"SKYFERRY_HOME": os.environ["SKYFERRY_HOME"]}})
    try:
        rows = ray.data.read_datasource(source).take_all()
    finally:
        ray.shutdown()
    assert sorted(r["id"] for r in rows) == list(range(ROWS))
    suspects = open_catalog(load_topology()).suspects("train")
    assert {(c, n) for _, c, n in suspects} == {(bad.index, chosen[bad.index])}


def test_a_ray_dataset_reads_a_drifted_dataset_through_its_one_schema(home: Path,
                                                                      tmp_path: Path) -> None:
    from skyferry.read.ray_datasource import SkyferryDatasource

    expected = commit_drifted(tmp_path / "src", "drift")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"SKYFERRY_HOME": os.environ["SKYFERRY_HOME"]}})
    try:
        rows = ray.data.read_datasource(SkyferryDatasource("drift")).take_all()
    finally:
        ray.shutdown()
    assert {r["id"]: r for r in rows} == expected
