"""A chunk's stored bytes encrypted on their way to the replicas.

A :class:`Sealing` belongs to one chunk for all its attempts: its data key and nonce prefix
stay the same, so a second pass over the same plaintext (a replacement node, a retry that
writes only the missing replicas) writes the same ciphertext. A pass whose plaintext
changes (the chunk's columns widened) must :meth:`Sealing.renew` first: the same key and
nonce over other bytes would give the XOR of the two away.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from skyferry.crypto import DataKey, Encryptor, Keyring, chunk_context
from skyferry.hashing import Hasher, new_hasher
from skyferry.models import SealedChunk

__all__ = ["Sealer", "Sealing", "chunk_context"]


@dataclass(eq=False)
class Sealing:
    keyring: Keyring
    key: DataKey = field(default_factory=DataKey.new)
    prefix: bytes | None = None
    wrapped: dict[str, str] = field(default_factory=dict)

    def renew(self) -> None:
        """A fresh nonce prefix, for a pass whose plaintext differs from the last one's."""
        self.prefix = None

    def sealer(self, context: bytes, *, hash_plain: bool = True) -> Sealer:
        """One pass's encryption. ``hash_plain=False`` when the caller knows the
        plaintext's hash already (a binary chunk's is its source hash)."""
        encryptor = Encryptor(self.key, context, self.prefix)
        self.prefix = encryptor.prefix
        if not self.wrapped:
            self.wrapped = self.keyring.wrap(self.key)
        return Sealer(encryptor, self, new_hasher() if hash_plain else None)


class Sealer:
    """One pass: plaintext in (hashed, unless its hash is known), ciphertext out."""

    def __init__(self, encryptor: Encryptor, sealing: Sealing, hasher: Hasher | None) -> None:
        self._encryptor, self._sealing, self._hasher = encryptor, sealing, hasher
        self.size = 0

    def update(self, data: Any) -> bytes:
        if self._hasher is not None:
            self._hasher.update(memoryview(data).cast("B"))
        self.size += memoryview(data).nbytes
        return self._encryptor.update(data)

    def finish(self) -> bytes:
        return self._encryptor.finish()

    def record(self, plain_digest: str | None = None) -> SealedChunk:
        """What the manifest keeps; ``plain_digest`` when this pass did not hash."""
        digest = plain_digest if self._hasher is None else self._hasher.hexdigest()
        assert digest is not None
        return SealedChunk(key_id=self._sealing.key.name, wrapped=dict(self._sealing.wrapped),
                           plain_digest=digest, plain_size=self.size)
