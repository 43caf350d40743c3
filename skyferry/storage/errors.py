"""Backend errors translated into skyferry's :class:`~skyferry.errors.StorageError` family:
one lookup table, one translating context manager (as s3fs's ``errors.py`` and httpx's
``map_exceptions``). s3fs, gcsfs and adlfs raise different types for the same failure; the
exception's type, its HTTP status and the cloud's error code tell them apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from skyferry.errors import (
    AccessDeniedError,
    NodeUnavailableError,
    ObjectNotFoundError,
    StorageError,
)
from skyferry.secrets import scrub

__all__ = ["translate", "translating"]

# what a backend's failure means, by the first that matches: its type, HTTP status or error code
_BY_TYPE: tuple[tuple[type[BaseException], type[StorageError]], ...] = (
    (PermissionError, AccessDeniedError), (FileNotFoundError, ObjectNotFoundError))
_BY_STATUS: dict[int, type[StorageError]] = {
    401: AccessDeniedError, 403: AccessDeniedError, 404: ObjectNotFoundError}
_BY_CODE: dict[str, type[StorageError]] = {
    **{code: AccessDeniedError for code in (
        "AccessDenied", "AuthorizationFailure", "AuthenticationFailed",
        "AuthorizationPermissionMismatch", "InvalidAccessKeyId", "SignatureDoesNotMatch",
        "Forbidden")},
    "NoSuchBucket": ObjectNotFoundError,
}
_SAYS = {AccessDeniedError: "access denied: {where}", ObjectNotFoundError: "not found: {where}",
         NodeUnavailableError: "failed to {where}"}


def _kind(exc: BaseException) -> type[StorageError]:
    for found, kind in _BY_TYPE:
        if isinstance(exc, found):
            return kind
    status = getattr(exc, "status_code", None) or getattr(
        getattr(exc, "response", None), "status_code", None)
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    text = str(exc)
    for code, kind in _BY_CODE.items():
        if code in text:
            return kind
    return NodeUnavailableError


def translate(exc: BaseException, node: str, key: str | None, action: str) -> StorageError:
    """``exc`` as a StorageError naming the node and the key. Only the first line of the
    backend's message is kept, secrets scrubbed: enough to act on, and no request dumps."""
    if isinstance(exc, StorageError):
        return exc
    where = f"{action} {key!r} on node {node}" if key else f"{action} on node {node}"
    text = str(exc).strip()
    detail = scrub(f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text
                   else type(exc).__name__)
    kind = _kind(exc)
    return kind(f"{_SAYS[kind].format(where=where)}: {detail}", node=node, key=key)


@contextlib.contextmanager
def translating(node: str, key: str | None, action: str) -> Iterator[None]:
    """Raise what the block raises as :func:`translate` says (a StorageError as it is)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        raise translate(exc, node, key, action) from exc
