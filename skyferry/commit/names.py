"""Source file names sealed in an encrypted dataset's manifests.

While encryption is on, no manifest copy names a source file. Each source URL is replaced
by a pseudonym, ``sealed:`` and an HMAC of the URL under the dataset's names key. The same
file has the same pseudonym in every batch, so gc, the source index, snapshots and the read
plan still tell versions of one file apart, with no key. The real URLs and paths are in an
encrypted blob in the manifest (``sealed_names``), which export opens for a binary
dataset's file paths.

The names key is random, one per dataset. It is wrapped by the master keys at the catalog
(``keys/<dataset>/names.json``, made once) and again in every manifest, so that any copy
of any manifest can be opened with a master key. ``rekey`` wraps it again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel, ConfigDict

from skyferry.crypto import DataKey, Keyring
from skyferry.errors import DecryptionError, ObjectNotFoundError
from skyferry.models import ChunkPart, SourceFile, StoredChunk
from skyferry.storage import Store, safe_key

__all__ = ["PREFIX", "Names", "SealedNames", "dataset_names", "is_sealed"]

PREFIX = "sealed:"


class SealedNames(BaseModel):
    """In a manifest: the names key, wrapped, and the batch's real names, encrypted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key_id: str
    wrapped: dict[str, str]
    blob: str  # base64 of a nonce and AES-256-GCM of {pseudonym: [url, path]}


def is_sealed(url: str) -> bool:
    return url.startswith(PREFIX)


@dataclass(frozen=True)
class Names:
    """A dataset's names key, unwrapped."""

    dataset: str
    key: DataKey
    wrapped: dict[str, str]

    def of(self, url: str) -> str:
        """The pseudonym of ``url`` in this dataset."""
        mac = hmac.new(self.key.secret, b"skyferry source name|" + url.encode(), hashlib.sha256)
        return PREFIX + mac.hexdigest()[:32]

    def _aead(self) -> AESGCM:
        return AESGCM(hmac.new(self.key.secret, b"skyferry names blob", hashlib.sha256).digest())

    def _aad(self, batch_id: str) -> bytes:
        return f"skyferry names|{self.dataset}|{batch_id}".encode()

    def seal(self, sources: list[SourceFile], chunks: list[StoredChunk], freed: list[StoredChunk],
             batch_id: str) -> tuple[list[SourceFile], list[StoredChunk], list[StoredChunk],
                                     SealedNames]:
        """The lineage's sources and the chunks with pseudonyms, and the sealed names."""
        real: dict[str, list[str]] = {}

        def file(f: SourceFile) -> SourceFile:
            name = self.of(f.url)
            real[name] = [f.url, f.path]
            return f.model_copy(update={"url": name, "path": ""})

        def part(p: ChunkPart) -> ChunkPart:
            name = self.of(p.source)
            real.setdefault(name, [p.source, ""])
            return p.model_copy(update={"source": name})

        def chunk(c: StoredChunk) -> StoredChunk:
            return c.model_copy(update={"parts": tuple(part(p) for p in c.parts)})

        sealed_sources = [file(f) for f in sources]
        sealed_chunks, sealed_freed = [chunk(c) for c in chunks], [chunk(c) for c in freed]
        nonce = secrets.token_bytes(12)
        body = self._aead().encrypt(nonce, json.dumps(real, sort_keys=True).encode(),
                                    self._aad(batch_id))
        return sealed_sources, sealed_chunks, sealed_freed, SealedNames(
            key_id=self.key.name, wrapped=dict(self.wrapped),
            blob=base64.b64encode(nonce + body).decode())

    def open(self, sealed: SealedNames, batch_id: str) -> dict[str, tuple[str, str]]:
        """Pseudonym -> (url, path) of one batch."""
        raw = base64.b64decode(sealed.blob)
        try:
            body = self._aead().decrypt(raw[:12], raw[12:], self._aad(batch_id))
        except InvalidTag:
            raise DecryptionError(f"the source names of batch {batch_id} of {self.dataset} do "
                                  "not open with its names key") from None
        return {k: (v[0], v[1]) for k, v in json.loads(body).items()}


class _KeyFile(BaseModel):
    key_id: str
    wrapped: dict[str, str]


def _key_path(dataset: str) -> str:
    return safe_key("keys", dataset, "names.json")


def dataset_names(store: Store, dataset: str, keyring: Keyring, *, create: bool) -> Names | None:
    """The dataset's names key from the catalog ``store``, made (once, whoever is first)
    when ``create``; None when it has none and ``create`` is false."""
    key = _key_path(dataset)
    for _ in range(2):
        try:
            found = _KeyFile.model_validate_json(store.get(key))
        except ObjectNotFoundError:
            if not create:
                return None
            new = DataKey.new()
            body = _KeyFile(key_id=new.name, wrapped=keyring.wrap(new))
            store.create(key, body.model_dump_json().encode())  # the first maker wins
            continue
        data_key = keyring.unwrap(bytes.fromhex(found.key_id), found.wrapped)
        return Names(dataset, data_key, found.wrapped)
    raise ObjectNotFoundError(f"the names key of {dataset} could not be made at {key}",
                              node="catalog", key=key)


def rewrap(store: Store, dataset: str, keyring: Keyring, to: str) -> bool:
    """Wrap the dataset's names key by master key ``to`` alone; whether it had one."""
    key = _key_path(dataset)
    try:
        found = _KeyFile.model_validate_json(store.get(key))
    except ObjectNotFoundError:
        return False
    data_key = keyring.unwrap(bytes.fromhex(found.key_id), found.wrapped)
    store.put(key, _KeyFile(key_id=found.key_id,
                            wrapped=keyring.wrap(data_key, [to])).model_dump_json().encode())
    return True
