"""``skyferry rekey``: every chunk's data key wrapped by another master key; no data rewritten.

A chunk's data key lives in its manifest, wrapped by master keys; its replicas hold only the
data key's id. Rekeying unwraps each data key with a key this process holds and wraps it by
the new one alone, then commits each manifest again (a new revision, with the same chunks,
digests and sizes). The replicas and their hashes are untouched. The old master key can be
retired once every dataset it wrapped is rekeyed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from skyferry.commit.lease import DatasetLease
from skyferry.commit.manifest import Manifest, open_catalog
from skyferry.commit.names import rewrap as rewrap_names
from skyferry.crypto import Keyring, keys_spec, load_keyring
from skyferry.errors import ConfigError, KeyUnavailableError
from skyferry.models import StoredChunk
from skyferry.topology import Topology

__all__ = ["RekeyReport", "rekey_dataset"]

logger = logging.getLogger("skyferry.ops")


@dataclass
class RekeyReport:
    dataset: str
    to: str
    manifests: list[str] = field(default_factory=list)  # rewritten
    chunks: int = 0  # data keys rewrapped
    unchanged: int = 0  # already wrapped by the new key alone, or not encrypted


def _keyring(topology: Topology, keys: str | None) -> Keyring:
    spec = keys_spec(keys, topology.encryption)
    if not spec:
        raise KeyUnavailableError("rekey needs the old and the new master keys: pass --keys, "
                                  "set SKYFERRY_KEYS or the topology's encryption.master_keys",
                                  key_id=None)
    return load_keyring(spec)


def _rewrapped(keyring: Keyring, chunk: StoredChunk, to: str) -> StoredChunk | None:
    sealed = chunk.sealed
    if sealed is None or set(sealed.wrapped) == {to}:
        return None
    key = keyring.unwrap(bytes.fromhex(sealed.key_id), sealed.wrapped)
    return chunk.model_copy(update={"sealed": sealed.model_copy(
        update={"wrapped": keyring.wrap(key, [to])})})


def rekey_dataset(topology: Topology, dataset: str, *, to: str, keys: str | None = None
                  ) -> RekeyReport:
    """Wrap every data key of ``dataset`` by master key ``to`` alone (see the module)."""
    keyring = _keyring(topology, keys)
    if keyring.get(to) is None:
        raise KeyUnavailableError(f"master key {to} is not in {keyring.source}: add it there "
                                  "beside the old one", key_id=to)
    catalog = open_catalog(topology)
    report = RekeyReport(dataset, to)
    with DatasetLease(catalog.store, dataset):  # no run of the dataset writes meanwhile
        pending = [p.batch_id for p, _ in catalog.pending_plans() if p.dataset == dataset]
        if pending:
            raise ConfigError(f"dataset {dataset} has a batch in flight ({', '.join(pending)}): "
                              "let it commit (a run resumes it) before rekeying",
                              source=dataset)
        rewrap_names(catalog.store, dataset, keyring, to)
        for manifest in catalog.manifests(dataset):
            rewritten = _rekey_manifest(keyring, manifest, to, report)
            if rewritten is not None:
                catalog.commit(rewritten, previous=manifest)
                report.manifests.append(catalog.key_of(manifest))
    logger.info("rekeyed %s to %s: %d data keys in %d manifests", dataset, to, report.chunks,
                len(report.manifests))
    return report


def _rekey_manifest(keyring: Keyring, manifest: Manifest, to: str,
                    report: RekeyReport) -> Manifest | None:
    chunks: list[StoredChunk] = []
    freed: list[StoredChunk] = []
    changed = False
    for held, out in ((manifest.chunks, chunks), (manifest.freed, freed)):
        for chunk in held:
            new = _rewrapped(keyring, chunk, to)
            if new is None:
                report.unchanged += 1
                out.append(chunk)
            else:
                report.chunks += 1
                out.append(new)
                changed = True
    update: dict[str, object] = {"chunks": chunks, "freed": freed}
    sealed = manifest.sealed_names
    if sealed is not None and set(sealed.wrapped) != {to}:
        key = keyring.unwrap(bytes.fromhex(sealed.key_id), sealed.wrapped)
        update["sealed_names"] = sealed.model_copy(update={"wrapped": keyring.wrap(key, [to])})
        changed = True
    if not changed:
        return None
    return manifest.model_copy(update={**update, "revision": manifest.revision + 1})
