from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from skyferry.commit.manifest import Catalog, Manifest
from skyferry.topology import load_topology
from tests.helpers.sf_data import SCHEMA_YAML


@pytest.fixture
def schema_file(tmp_path: Path) -> Path:
    path = tmp_path / "schema.yaml"
    path.write_text(SCHEMA_YAML)
    return path


@pytest.fixture
def committed() -> Callable[[str], list[Manifest]]:
    def read(dataset: str) -> list[Manifest]:
        return Catalog(load_topology().catalog_store()).manifests(dataset)

    return read
