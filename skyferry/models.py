"""Small records that stages hand to each other. They are references, never DataFrames."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BatchLineage",
    "ChunkPart",
    "ChunkPlan",
    "ReplicaRecord",
    "ReplicaState",
    "SealedChunk",
    "SourceFile",
    "StoredChunk",
]

ReplicaState = Literal["verified", "hinted"]
ChunkFormat = Literal["csv", "jsonl", "parquet", "binary"]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SourceFile(_Record):
    url: str
    size: int
    fingerprint: str = Field(..., description="etag, or mtime when the store has no etag")
    path: str = Field(default="", description="Path below the source's root (a folder, or a glob's "
                      "fixed part); an export writes the file there")
    extends: int = Field(
        default=0, description="When this version only grew: the length of the earlier "
        "version whose bytes it keeps; this batch holds the bytes from there on")


class ChunkPart(_Record):
    """A record-aligned byte range of one source file."""

    source: str
    start: int
    end: int
    header_end: int = Field(0, description="CSV: length of the file's header line(s)")
    row_groups: tuple[int, ...] = Field((), description="Parquet: row groups in the range")

    @property
    def size(self) -> int:
        return self.end - self.start


class ChunkPlan(_Record):
    index: int
    format: ChunkFormat
    parts: tuple[ChunkPart, ...]
    nodes: tuple[str, ...] = Field((), description="Planned replica nodes, best first")

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)


_PART_DIGESTS = Field(
    default=(), description="Each part's source hash, when the chunk has more than one part "
    "(with one, it is source_digest); a later run checks that a grown file kept them")
_PART_ROWS = Field(
    default=(), description="Rows stored from each part, in order: a reader skips the rows "
    "of a source version that a newer one superseded")


class ReplicaRecord(_Record):
    node: str
    cloud: str
    state: ReplicaState


class SealedChunk(_Record):
    """How an encrypted chunk is opened. Its replicas hold ciphertext: the chunk's ``digest``,
    ``size`` and ``md5`` are the ciphertext's, so verify and repair need no key."""

    key_id: str = Field(description="the data key's id, as the object's header holds it (hex)")
    wrapped: dict[str, str] = Field(description="master key id -> the data key wrapped by it "
                                 "(AES-256-GCM, base64)")
    plain_digest: str = Field(description="BLAKE3 of the plaintext, checked after decryption")
    plain_size: int


class StoredChunk(_Record):
    index: int
    key: str
    format: ChunkFormat
    digest: str
    size: int
    source_digest: str
    rows_in: int
    rows_out: int
    rows_rejected: int
    rejects_key: str | None
    rows_added: int = Field(default=0, description="rows the transforms added")
    rows_dropped: int = Field(default=0, description="rows the transforms dropped")
    parts: tuple[ChunkPart, ...]
    part_digests: tuple[str, ...] = _PART_DIGESTS
    part_rows: tuple[int, ...] = _PART_ROWS
    replicas: tuple[ReplicaRecord, ...]
    node_failures: int = 0
    attempts: int = 1
    at_risk: bool = Field(
        default=False, description="Its verified replicas are all in one cloud, although the "
        "topology has more")
    md5: str | None = Field(
        default=None, description="MD5 of the bytes, kept when a store that checksums uploads "
        "holds a replica: a verify compares it with the store's own checksum, reading nothing")
    sealed: SealedChunk | None = Field(
        default=None, description="set when the chunk is encrypted at rest (skyferry/crypto.py)")
    columns: str | None = Field(
        default=None, description="the stored file's Arrow schema (base64 of Arrow's "
        "serialization): readers resolve the dataset's schema from these without reading a "
        "chunk (skyferry/evolution.py)")

    @property
    def verified(self) -> list[ReplicaRecord]:
        return [r for r in self.replicas if r.state == "verified"]


class BatchLineage(_Record):
    """Where a committed batch came from: what a snapshot and a run's result record of it."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_by_name=True,
                              serialize_by_alias=True)

    batch_id: str
    sources: list[SourceFile] = Field(description="the source files and their versions")
    chunk_digests: list[str] = Field(description="each chunk's BLAKE3, in chunk order")
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    transforms: list[str] = Field(default_factory=list, description="by name, in order")
    format: str
    code_version: str = Field(description="skyferry's version that wrote the batch")
