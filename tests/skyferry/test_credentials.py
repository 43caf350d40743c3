"""A node that names credentials is resolved through the one installed resolver, in any
process, without an entry point having to install it first."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest

from skyferry import topology
from skyferry.errors import TopologyError
from skyferry.topology import CREDENTIALS_GROUP, Node, credential_resolver


def test_the_installed_resolver_reads_prefect_blocks() -> None:
    from blocks.credentials import options_from_block

    credential_resolver.cache_clear()
    assert credential_resolver() is options_from_block


def test_a_node_with_credentials_gets_the_resolved_options(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[str, str]] = []

    def resolve(reference: str, node: str) -> dict[str, Any]:
        asked.append((reference, node))
        return {"auto_mkdir": True}

    monkeypatch.setattr(topology, "credential_resolver", lambda: resolve)
    node = Node(name="n1", cloud="local", region="r", url=str(home / "n1"),
                credentials="aws-credentials/prod")
    store = node.open_store()
    store.put("a/b", b"x")
    assert asked == [("aws-credentials/prod", "n1")] and store.get("a/b") == b"x"


@pytest.mark.parametrize("installed", [0, 2])
def test_no_resolver_or_two_is_a_typed_error_naming_the_group(
        installed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    points = [EntryPoint(f"r{i}", f"mod{i}:fn", CREDENTIALS_GROUP) for i in range(installed)]
    monkeypatch.setattr(topology, "entry_points", lambda group: points)
    credential_resolver.cache_clear()
    try:
        with pytest.raises(TopologyError, match=f"{installed} resolvers .*{CREDENTIALS_GROUP}"):
            credential_resolver()
    finally:
        credential_resolver.cache_clear()
