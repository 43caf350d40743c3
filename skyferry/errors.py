"""skyferry's exceptions.

Every error names the thing that failed and the place it failed. Context is carried as
keyword-only attributes so callers (and retry conditions) never parse messages.

    SkyferryError
    ├── ConfigError ................................ TerminalException
    │   ├── TopologyError            (invalid topology file or block)
    │   ├── SchemaError              (invalid schema, or data missing a schema column)
    │   │   └── SchemaEvolutionError (a chunk's column cannot take the dataset's type exactly)
    │   ├── TransformError           (a transform that cannot be imported or fails)
    │   ├── BatchIdReusedError       (a committed batch id named for another listing)
    │   └── ReadPlanError            (a training read asked for what the dataset cannot give)
    ├── SourceError ................................ TerminalException
    │   ├── SourceNotFoundError      (the source URL does not exist)
    │   ├── EmptySourceError         (the source matches no files)
    │   ├── ZeroByteFileError        (a source file holds no bytes)
    │   ├── FormatError              (a file is not in the declared format)
    │   └── SourceChangedError       (bytes changed between ingest and processing)
    ├── UnsafeKeyError (ValueError) ................ TerminalException
    ├── StorageError (OSError)
    │   ├── ObjectNotFoundError (FileNotFoundError)  TerminalException
    │   ├── AccessDeniedError (PermissionError) .... TerminalException
    │   ├── NodeUnavailableError ................... TransientException
    │   └── ReplicaVerificationError ............... TransientException
    ├── PlacementError
    │   ├── InsufficientNodesError   (fewer healthy nodes than the quorum) TerminalException
    │   ├── InsufficientCloudsError  (healthy nodes span fewer clouds than min_clouds) Terminal
    │   └── QuorumNotMetError        (a chunk reached < W verified replicas) TransientException
    ├── IntegrityError               (no healthy replica of a chunk is left) TerminalException
    ├── ReplicasAtRiskError          (a verify or repair left replicas damaged) TerminalException
    ├── BatchNotFoundError           (no committed manifest for a dataset/batch)
    ├── SnapshotError                (a snapshot that does not exist or cannot be read) Terminal
    ├── ManifestError                (a committed manifest that cannot be read) TerminalException
    │   └── ManifestConflictError    (copies of one manifest disagree on its chunks)
    ├── ManifestQuorumError          (too few copies of a manifest were written) Transient
    └── StageError                   (wraps any of the above with the stage and batch)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from skyferry.stages import Stage

__all__ = [
    "AccessDeniedError",
    "BatchIdReusedError",
    "BatchNotFoundError",
    "ConfigError",
    "DecryptionError",
    "EgressBudgetError",
    "EmptySourceError",
    "FormatError",
    "InsufficientCloudsError",
    "InsufficientNodesError",
    "IntegrityError",
    "KeyUnavailableError",
    "ManifestConflictError",
    "ManifestError",
    "ManifestQuorumError",
    "NodeUnavailableError",
    "ObjectNotFoundError",
    "PlacementError",
    "QuorumNotMetError",
    "ReadPlanError",
    "ReplicasAtRiskError",
    "ReplicaVerificationError",
    "SchemaError",
    "SchemaEvolutionError",
    "SkyferryError",
    "SnapshotError",
    "SourceChangedError",
    "SourceError",
    "SourceNotFoundError",
    "StageError",
    "StorageError",
    "TableError",
    "TerminalException",
    "TopologyError",
    "TransformError",
    "TransientException",
    "UnsafeKeyError",
    "ZeroByteFileError",
    "failing_as",
    "is_transient",
]


class TerminalException(Exception):
    """Marker: retrying will not help."""


class TransientException(Exception):
    """Marker: the same call may succeed if retried."""


class SkyferryError(Exception):
    """Base of every skyferry error."""


class ConfigError(SkyferryError, TerminalException):
    def __init__(self, message: str, *, source: str | None = None) -> None:
        super().__init__(message)
        self.source = source


class TopologyError(ConfigError):
    pass


class EgressBudgetError(ConfigError):
    """A run's planned egress is over the limit it was given (``--max-egress-usd``)."""

    def __init__(self, message: str, *, planned_usd: float, limit_usd: float) -> None:
        super().__init__(message)
        self.planned_usd = planned_usd
        self.limit_usd = limit_usd


class SchemaError(ConfigError):
    pass


class SchemaEvolutionError(SchemaError):
    def __init__(self, message: str, *, column: str) -> None:
        super().__init__(message, source=column)
        self.column = column


class ReadPlanError(ConfigError):
    pass


class BatchIdReusedError(ConfigError):
    def __init__(self, message: str, *, dataset: str, batch_id: str) -> None:
        super().__init__(message, source=batch_id)
        self.dataset = dataset
        self.batch_id = batch_id


class TransformError(ConfigError):
    def __init__(self, message: str, *, transform: str, source: str | None = None) -> None:
        super().__init__(message, source=source)
        self.transform = transform


class SourceError(SkyferryError, TerminalException):
    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


class SourceNotFoundError(SourceError, FileNotFoundError):
    pass


class EmptySourceError(SourceError):
    pass


class ZeroByteFileError(SourceError):
    pass


class FormatError(SourceError):
    def __init__(self, message: str, *, url: str, fmt: str) -> None:
        super().__init__(message, url=url)
        self.fmt = fmt


class SourceChangedError(SourceError):
    pass


class UnsafeKeyError(SkyferryError, ValueError, TerminalException):
    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


class StorageError(SkyferryError, OSError):
    def __init__(self, message: str, *, node: str, key: str | None = None) -> None:
        super().__init__(message)
        self.node = node
        self.key = key

    def __str__(self) -> str:  # OSError.__str__ would print errno tuples
        return str(self.args[0]) if self.args else ""


class ObjectNotFoundError(StorageError, FileNotFoundError, TerminalException):
    pass


class AccessDeniedError(StorageError, PermissionError, TerminalException):
    pass


class NodeUnavailableError(StorageError, TransientException):
    pass


class ReplicaVerificationError(StorageError, TransientException):
    pass


class PlacementError(SkyferryError):
    pass


class InsufficientNodesError(PlacementError, TerminalException):
    def __init__(self, message: str, *, healthy: int, required: int) -> None:
        super().__init__(message)
        self.healthy = healthy
        self.required = required


class InsufficientCloudsError(PlacementError, TerminalException):
    def __init__(self, message: str, *, clouds: list[str], required: int) -> None:
        super().__init__(message)
        self.clouds = clouds
        self.required = required


class QuorumNotMetError(PlacementError, TransientException):
    """``done`` names the nodes whose replicas did verify, and ``expect`` is the chunk's
    ``(digest, size)`` when it was produced: a retry writes only the rest."""

    def __init__(self, message: str, *, chunk: int, verified: int, quorum: int,
                 done: tuple[str, ...] = (), expect: tuple[str, int] | None = None) -> None:
        super().__init__(message)
        self.chunk = chunk
        self.verified = verified
        self.quorum = quorum
        self.done = done
        self.expect = expect


class IntegrityError(SkyferryError, TerminalException):
    def __init__(self, message: str, *, dataset: str, batch_id: str, chunk: int) -> None:
        super().__init__(message)
        self.dataset = dataset
        self.batch_id = batch_id
        self.chunk = chunk


class KeyUnavailableError(SkyferryError, TerminalException):
    """A master key is missing, unreadable, or not the one a data key was wrapped by."""

    def __init__(self, message: str, *, key_id: str | None) -> None:
        super().__init__(message)
        self.key_id = key_id


class DecryptionError(SkyferryError, TerminalException):
    """An encrypted object fails its checks: a changed, cut or reordered segment, or a key
    that does not open it. Nothing of the object is yielded."""


class ReplicasAtRiskError(SkyferryError, TerminalException):
    """A verify found damaged replicas, or a repair could not bring every chunk back to R."""

    def __init__(self, message: str, *, dataset: str) -> None:
        super().__init__(message)
        self.dataset = dataset


class BatchNotFoundError(SkyferryError, LookupError, TerminalException):
    def __init__(self, message: str, *, dataset: str, batch_id: str | None = None) -> None:
        super().__init__(message)
        self.dataset = dataset
        self.batch_id = batch_id


class SnapshotError(SkyferryError, LookupError, TerminalException):
    def __init__(self, message: str, *, dataset: str) -> None:
        super().__init__(message)
        self.dataset = dataset


class TableError(SkyferryError, TerminalException):
    """A snapshot that cannot be published as a table (see skyferry/ops/tables.py)."""

    def __init__(self, message: str, *, dataset: str) -> None:
        super().__init__(message)
        self.dataset = dataset


class ManifestError(SkyferryError, TerminalException):
    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


class ManifestConflictError(ManifestError):
    """Copies of one batch's manifest list different chunks or digests. No reader picks
    one: which is right is an operator's decision (``skyferry verify`` names the copies)."""

    def __init__(self, message: str, *, key: str, batch_id: str, places: list[str]) -> None:
        super().__init__(message, key=key)
        self.batch_id = batch_id
        self.places = places


class ManifestQuorumError(SkyferryError, TransientException):
    """A commit wrote too few copies of its manifest, or too few clouds held them; the batch
    is not committed, and the copies that were written are removed."""

    def __init__(self, message: str, *, key: str, written: list[str],
                 failed: dict[str, str]) -> None:
        super().__init__(message)
        self.key = key
        self.written = written
        self.failed = failed


class StageError(SkyferryError):
    """The one boundary of a stage's failure: names the stage, the dataset, the batch and,
    where there is one, the chunk. Raised once, ``from`` its cause."""

    def __init__(self, message: str, *, stage: Stage, batch_id: str, dataset: str,
                 chunk: int | None = None) -> None:
        where = f"{dataset}/batch={batch_id}" + (f" chunk {chunk}" if chunk is not None else "")
        super().__init__(f"stage {stage} failed for {where}: {message}")
        self.message = message
        self.stage = stage
        self.batch_id = batch_id
        self.dataset = dataset
        self.chunk = chunk

    def __reduce__(self) -> tuple[object, ...]:  # a worker process sends it back pickled
        return (_stage_error, (self.message, self.stage, self.batch_id, self.dataset,
                               self.chunk))


def _stage_error(message: str, stage: Stage, batch_id: str, dataset: str,
                 chunk: int | None) -> StageError:
    return StageError(message, stage=stage, batch_id=batch_id, dataset=dataset, chunk=chunk)


@contextmanager
def failing_as(stage: Stage, *, dataset: str, batch_id: str,
               chunk: int | None = None) -> Iterator[None]:
    """A failure inside is ``stage``'s: raised as a :class:`StageError` from its cause. A
    :class:`StageError` from a step inside keeps the stage it names."""
    try:
        yield
    except StageError:
        raise
    except Exception as exc:
        raise StageError(str(exc), stage=stage, batch_id=batch_id, dataset=dataset,
                         chunk=chunk) from exc


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same call may succeed (a stage's failure: when its cause may)."""
    if isinstance(exc, StageError) and exc.__cause__ is not None:
        return is_transient(exc.__cause__)
    if isinstance(exc, TerminalException):
        return False
    if isinstance(exc, TransientException):
        return True
    return isinstance(exc, (OSError, TimeoutError, ConnectionError))
