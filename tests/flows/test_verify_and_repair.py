"""The verify-and-repair flow: its state says whether data is at risk, its artifact says
where, and with repair=True the replicas are whole again."""

from __future__ import annotations

from pathlib import Path

import blake3
import pytest
from prefect.client.orchestration import get_client

from flows.verify_and_repair import verify_and_repair
from skyferry.commit.manifest import Catalog
from skyferry.errors import ReplicasAtRiskError
from skyferry.topology import load_topology
from tests.helpers.sf_data import commit_without_prefect, write_ml_csv

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def _artifact_rows(key: str) -> list[dict[str, object]]:
    import json

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key])))
    assert found, key
    data = found[0].data
    return list(json.loads(data) if isinstance(data, str) else data)


def test_a_damaged_dataset_fails_verify_and_repair_makes_it_whole(
        home: Path, tmp_path: Path) -> None:
    write_ml_csv(tmp_path / "src" / "a.csv", 3_000, seed=41)
    manifest = commit_without_prefect(tmp_path / "src", "vr", chunk_size="24KB")
    chunk = manifest.chunks[1]
    node = chunk.verified[0].node
    (home / "nodes" / node / chunk.key).unlink()

    state = verify_and_repair(dataset="vr", return_state=True)
    assert state.is_failed()
    with pytest.raises(ReplicasAtRiskError, match="1 missing"):
        state.result()
    rows = {r["node"]: r for r in _artifact_rows("vr-verify")}
    assert rows[node]["missing"] == 1
    assert sum(int(str(r["ok"])) for r in rows.values()) == sum(
        len(c.verified) for c in manifest.chunks) - 1

    body = verify_and_repair(dataset="vr", repair=True, deep=True)
    assert body["complete"] and body["recreated"] == [f"batch={manifest.batch_id} chunk "
                                                      f"{chunk.index} -> {node}"]
    assert verify_and_repair(dataset="vr", deep=True)["healthy"]
    repaired = Catalog(load_topology().catalog_store()).manifest("vr")
    for c in repaired.chunks:
        for replica in c.verified:
            path = home / "nodes" / replica.node / c.key
            assert blake3.blake3(path.read_bytes()).hexdigest() == c.digest
