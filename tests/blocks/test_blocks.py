"""Nodes saved as StorageNode blocks, and a topology built from them (Prefect test API)."""

from __future__ import annotations

from pathlib import Path

import pytest

from blocks.storage_node import StorageNode, topology_from_blocks
from flows.pipeline import run_pipeline
from skyferry.config import PipelineConfig
from skyferry.ops.export import DatasetReader
from tests.helpers.sf_data import verified_chunks

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def test_a_topology_from_saved_blocks_runs_and_keeps_secrets_secret(home: Path,
                                                                   tmp_path: Path) -> None:
    for name, cloud, max_writes in (("blk-aws", "aws", None), ("blk-gcp", "gcp", 1)):
        StorageNode(cloud=cloud, region="r1", url=str(home / "nodes" / name),
                    storage_options={"auto_mkdir": "true"}, work_pool=f"{cloud}-pool",
                    max_writes=max_writes).save(name, overwrite=True)
    topology = topology_from_blocks(["blk-aws", "blk-gcp"], catalog=str(home / "catalog"))
    assert [(n.name, n.cloud, n.work_pool, n.max_writes) for n in topology.nodes] == [
        ("blk-aws", "aws", "aws-pool", None), ("blk-gcp", "gcp", "gcp-pool", 1)]
    loaded = StorageNode.load("blk-aws")
    assert "true" not in repr(loaded.storage_options)  # SecretStr masks stored options
    topo_file = tmp_path / "t.yaml"
    topo_file.write_text(topology.model_dump_json())  # JSON is YAML
    src = tmp_path / "x.bin"
    src.write_bytes(b"block-backed" * 500)
    result = run_pipeline(PipelineConfig(source=str(src), dataset="blk", topology=str(topo_file),
                                         replicas=2, quorum=2, chunk_size=2000))
    assert result.status == "completed", result.error
    assert result.stages["storage"].by_node == {"blk-aws": 3, "blk-gcp": 3}
    reader = DatasetReader("blk", topology=topology)
    assert b"".join(verified_chunks(reader)) == src.read_bytes()
