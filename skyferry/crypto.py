"""Client-side envelope encryption of stored objects: AES-256-GCM in 64 KiB segments.

Every encrypted object has its own random 256-bit data key. The data key is wrapped by one
or more master keys (:class:`Keyring`), and the wrapped keys live in the manifest, not in
the object, so that changing master keys rewraps a few hundred bytes and rewrites no data.

An object is a 64-byte header and its segments::

    magic "SKYFENC1" (8) | data key id (16) | nonce prefix (7) | log2 segment size (1)
    | key commitment (32)
    segment 0: up to 64 KiB of ciphertext and its 16-byte tag
    ...

Each segment's nonce is the prefix, the segment's number (4 bytes) and a last-segment flag
(1 byte), as in age's STREAM: a segment moved, dropped, or cut off at the end (truncation)
fails its tag. Each segment's associated data is the header's first 32 bytes and the
object's context (the chunk's key and its batch), so a segment or a whole object moved to
another chunk fails too. AES-GCM does not commit to its key; the header's commitment (an
HMAC of the data key) does, and is checked before any segment is opened.

The ciphertext is what every replica holds, and its hash is what the manifest records
beside the plaintext's: anyone can verify and repair a replica without a key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from skyferry.errors import DecryptionError, KeyUnavailableError, SkyferryError
from skyferry.secrets import register

__all__ = [
    "HEADER_SIZE", "MAGIC", "SEGMENT", "TAG", "DataKey", "Decryptor", "Encryptor", "Keyring",
    "MasterKey", "chunk_context", "cipher_size", "keys_spec", "load_keyring", "new_master_key",
    "plain_size", "run_keyring",
]

MAGIC = b"SKYFENC1"
SEGMENT_LOG2 = 16
SEGMENT = 1 << SEGMENT_LOG2  # plaintext bytes a segment holds
TAG = 16
HEADER_SIZE = 64
_BOUND = 32  # the header's bytes bound into every segment (all but the commitment)
_KEY_ID_SIZE = 16
_PREFIX_SIZE = 7
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def cipher_size(plain: int) -> int:
    """The size of an encrypted object that holds ``plain`` bytes."""
    segments = max(1, -(-plain // SEGMENT))
    return HEADER_SIZE + plain + TAG * segments


def plain_size(cipher: int) -> int:
    """The plaintext's size inside an encrypted object of ``cipher`` bytes."""
    body = cipher - HEADER_SIZE
    full, rest = divmod(body, SEGMENT + TAG)
    if body < TAG or (rest and rest < TAG) or (rest == TAG and full):
        raise DecryptionError(f"an encrypted object cannot be {cipher} bytes long "
                              "(it was truncated or extended)")
    return body - TAG * (full + (1 if rest else 0))


def chunk_context(key: str, batch_id: str) -> bytes:
    """What every segment of a chunk's object is bound to: its key and its batch."""
    return f"skyferry chunk|{batch_id}|{key}".encode()


def _segments(plain: int) -> int:
    return max(1, -(-plain // SEGMENT))


@dataclass(frozen=True, repr=False)
class DataKey:
    """One object's key: its id (the header's), and 32 secret bytes. Never printed."""

    id: bytes
    secret: bytes

    @classmethod
    def new(cls) -> DataKey:
        return cls(secrets.token_bytes(_KEY_ID_SIZE), secrets.token_bytes(32))

    @property
    def name(self) -> str:
        return self.id.hex()

    def __repr__(self) -> str:
        return f"DataKey({self.name})"

    def _derive(self, label: bytes, prefix: bytes) -> bytes:
        return hmac.new(self.secret, label + self.id + prefix, hashlib.sha256).digest()


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    return prefix + counter.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


class Encryptor:
    """Encrypts one object's plaintext as it streams: :meth:`update` returns the ciphertext
    of every segment known not to be the last, and :meth:`finish` the rest.

    ``prefix`` fixes the nonce prefix, so that a second pass over the same plaintext (a
    replacement node fed again) writes the same bytes; it is random otherwise.
    """

    def __init__(self, key: DataKey, context: bytes, prefix: bytes | None = None) -> None:
        self._prefix = prefix if prefix is not None else secrets.token_bytes(_PREFIX_SIZE)
        if len(self._prefix) != _PREFIX_SIZE:
            raise ValueError(f"a nonce prefix is {_PREFIX_SIZE} bytes")
        bound = MAGIC + key.id + self._prefix + bytes([SEGMENT_LOG2])
        self.header = bound + key._derive(b"skyferry commitment", self._prefix)
        self._aead = AESGCM(key._derive(b"skyferry segments", self._prefix))
        self._aad = bound + context
        self._pending = bytearray()
        self._counter = 0
        self._started = False

    @property
    def prefix(self) -> bytes:
        return self._prefix

    def _seal(self, data: bytes | bytearray | memoryview, last: bool) -> bytes:
        out = self._aead.encrypt(_nonce(self._prefix, self._counter, last), data, self._aad)
        self._counter += 1
        return out

    def update(self, data: Any) -> bytes:
        """The ciphertext that ``data`` (any contiguous buffer) completes, the header first.
        Up to one segment of plaintext is held back, since the last segment is sealed
        differently; whole segments are sealed from ``data`` itself, not copied first."""
        out = [] if self._started else [self.header]
        self._started = True
        view = memoryview(data).cast("B")
        if self._pending:
            room = SEGMENT - len(self._pending)
            if len(view) <= room:
                self._pending += view
                return b"".join(out)
            self._pending += view[:room]
            view = view[room:]
            out.append(self._seal(self._pending, False))  # more follows: not the last
            self._pending = bytearray()
        end = (len(view) - 1) // SEGMENT * SEGMENT if len(view) else 0  # keep 1..SEGMENT
        out.extend(self._seal(view[at:at + SEGMENT], False) for at in range(0, end, SEGMENT))
        self._pending += view[end:]
        return b"".join(out)

    def finish(self) -> bytes:
        """The last segment (the header too, for an empty object)."""
        out = b"" if self._started else self.header
        self._started = True
        last = self._seal(self._pending, True)
        self._pending = bytearray()
        return out + last


class Decryptor:
    """Opens the segments of one encrypted object whose header and size are known.

    Any range of plaintext can be read: :meth:`span` says which ciphertext bytes hold it,
    and :meth:`open` decrypts them. A segment's last flag comes from the object's size (the
    manifest's), so a truncated object fails at its new last segment.
    """

    def __init__(self, key: DataKey, context: bytes, header: bytes, size: int) -> None:
        if len(header) < HEADER_SIZE or header[:8] != MAGIC:
            raise DecryptionError("the object is not a skyferry encrypted object (bad magic)")
        if header[8:24] != key.id:
            raise DecryptionError(f"the object's data key is {header[8:24].hex()}, not "
                                  f"{key.name}")
        if header[31] != SEGMENT_LOG2:
            raise DecryptionError(f"the object's segments are 2^{header[31]} bytes; this "
                                  f"skyferry reads 2^{SEGMENT_LOG2}")
        prefix = header[24:31]
        if not hmac.compare_digest(header[32:64], key._derive(b"skyferry commitment", prefix)):
            raise DecryptionError(f"data key {key.name} does not open this object (its key "
                                  "commitment differs)")
        self._prefix = prefix
        self._aead = AESGCM(key._derive(b"skyferry segments", prefix))
        self._aad = header[:_BOUND] + context
        self.plain = size
        self.segments = _segments(size)

    def span(self, start: int, end: int) -> tuple[int, int, int]:
        """For plaintext ``[start, end)``: the first segment, and the ciphertext range of the
        segments that hold it."""
        first = min(start // SEGMENT, self.segments - 1)
        last = min(max(end - 1, start) // SEGMENT, self.segments - 1)
        at = HEADER_SIZE + first * (SEGMENT + TAG)
        stop = min(HEADER_SIZE + (last + 1) * (SEGMENT + TAG), cipher_size(self.plain))
        return first, at, stop

    def open(self, first: int, data: bytes | memoryview) -> bytes:
        """The plaintext of whole segments ``data``, the first being segment ``first``."""
        view = memoryview(data)
        out = []
        for n, at in enumerate(range(0, len(view), SEGMENT + TAG), start=first):
            piece = view[at:at + SEGMENT + TAG]
            last = n == self.segments - 1
            expected = (self.plain - n * SEGMENT if last else SEGMENT) + TAG
            if n >= self.segments or len(piece) != expected:
                raise DecryptionError(f"segment {n} of an encrypted object is cut short")
            try:
                out.append(self._aead.decrypt(_nonce(self._prefix, n, last), bytes(piece),
                                              self._aad))
            except InvalidTag:
                raise DecryptionError(f"segment {n} of {self.segments} fails its tag: the "
                                      "object was changed, cut, or its segments moved") from None
        return b"".join(out)

    def stream(self, read: Callable[[int], bytes], block: int = 16 * SEGMENT) -> Iterator[bytes]:
        """The whole plaintext, reading the segments after the header with ``read(n)``; the
        object must end where its size says."""
        per = (block // SEGMENT) * (SEGMENT + TAG)
        remaining = cipher_size(self.plain) - HEADER_SIZE
        n = 0
        while remaining > 0:
            data = read(min(per, remaining))
            if not data:
                raise DecryptionError(f"the encrypted object ends {remaining} bytes early")
            remaining -= len(data)
            got = self.open(n, data)
            n += -(-len(data) // (SEGMENT + TAG))
            yield got
        if read(1):
            raise DecryptionError("the encrypted object is longer than its size")


# -- master keys -------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class MasterKey:
    id: str
    secret: bytes

    def __repr__(self) -> str:
        return f"MasterKey({self.id})"


@dataclass(frozen=True)
class Keyring:
    """The master keys this process holds; the first wraps new data keys."""

    keys: tuple[MasterKey, ...]
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.keys:
            raise KeyUnavailableError(f"no master key in {self.source or 'the keyring'}",
                                      key_id=None)
        for key in self.keys:
            if not _KEY_ID.match(key.id):
                raise KeyUnavailableError(f"master key id {key.id!r} in {self.source} is not a "
                                          "name (letters, digits, . _ -)", key_id=key.id)
            if len(key.secret) != 32:
                raise KeyUnavailableError(f"master key {key.id} in {self.source} is "
                                          f"{len(key.secret)} bytes, not 32", key_id=key.id)

    @property
    def primary(self) -> MasterKey:
        return self.keys[0]

    def get(self, key_id: str) -> MasterKey | None:
        return next((k for k in self.keys if k.id == key_id), None)

    def wrap(self, key: DataKey, to: Iterable[str] | None = None) -> dict[str, str]:
        """``key`` wrapped by each master key in ``to`` (the primary by default)."""
        out = {}
        for key_id in (to if to is not None else [self.primary.id]):
            master = self.get(key_id)
            if master is None:
                raise KeyUnavailableError(f"master key {key_id} is not in {self.source}",
                                          key_id=key_id)
            nonce = secrets.token_bytes(12)
            sealed = AESGCM(master.secret).encrypt(nonce, key.secret, _wrap_aad(master, key))
            out[master.id] = base64.b64encode(nonce + sealed).decode()
        return out

    def unwrap(self, key_id: bytes, wrapped: dict[str, str]) -> DataKey:
        """The data key ``key_id`` from any of its wrappings this keyring can open."""
        for master_id, text in wrapped.items():
            master = self.get(master_id)
            if master is None:
                continue
            raw = base64.b64decode(text)
            probe = DataKey(key_id, b"")
            try:
                secret = AESGCM(master.secret).decrypt(raw[:12], raw[12:],
                                                       _wrap_aad(master, probe))
            except InvalidTag:
                raise KeyUnavailableError(f"master key {master_id} from {self.source} does not "
                                          f"open data key {key_id.hex()}: it is a different key "
                                          "under the same id", key_id=master_id) from None
            return DataKey(key_id, secret)
        needed = ", ".join(sorted(wrapped)) or "none"
        raise KeyUnavailableError(f"data key {key_id.hex()} is wrapped by master key(s) {needed}; "
                                  f"{self.source or 'the keyring'} holds "
                                  f"{', '.join(k.id for k in self.keys)}",
                                  key_id=sorted(wrapped)[0] if wrapped else None)


def _wrap_aad(master: MasterKey, key: DataKey) -> bytes:
    return b"skyferry data key|" + master.id.encode() + b"|" + key.id


def _parse_keys(text: str, source: str) -> tuple[MasterKey, ...]:
    """``id:base64`` pairs, separated by commas or lines (``#`` starts a comment), or a JSON
    object ``{"keys": [{"id": ..., "key": ...}]}``; the first is the primary."""
    text = text.strip()
    pairs: list[tuple[str, str]] = []
    if text.startswith("{"):
        try:
            pairs = [(k["id"], k["key"]) for k in json.loads(text)["keys"]]
        except (ValueError, KeyError, TypeError):
            raise KeyUnavailableError(f"{source} is not a key list ({{'keys': [{{'id', "
                                      "'key'}]})", key_id=None) from None
    else:
        for line in re.split(r"[,\n]", text):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            key_id, sep, value = line.partition(":")
            if not sep:
                raise KeyUnavailableError(f"{source}: an entry is not 'id:base64-key'",
                                          key_id=None)
            pairs.append((key_id.strip(), value.strip()))
    keys = []
    for key_id, value in pairs:
        try:
            secret = base64.b64decode(value, validate=True)
        except ValueError:
            raise KeyUnavailableError(f"master key {key_id} in {source} is not base64",
                                      key_id=key_id) from None
        keys.append(MasterKey(key_id, secret))
    return tuple(keys)


KEYS_GROUP = "skyferry.keys"
"""Entry points that resolve ``block:NAME`` (skyferry's own reads a Prefect Secret block) and
any other ``scheme:`` a deployment installs (a cloud KMS)."""


def load_keyring(spec: str) -> Keyring:
    """The keyring that ``spec`` names: ``file:PATH``, ``env:VARIABLE``, or ``SCHEME:NAME``
    for a resolver installed under :data:`KEYS_GROUP` (``block:NAME`` is a Prefect Secret
    block). A spec is a place, never a key: a spec that holds key material is refused."""
    scheme, sep, where = spec.partition(":")
    if not sep or not where:
        raise KeyUnavailableError(f"keys {spec!r}: expected file:PATH, env:VARIABLE or "
                                  "block:NAME", key_id=None)
    if scheme == "file":
        path = Path(where).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise KeyUnavailableError(f"cannot read key file {path}: {exc.strerror}",
                                      key_id=None) from None
        return Keyring(_parse_keys(text, f"key file {path}"), source=f"key file {path}")
    if scheme == "env":
        value = os.environ.get(where)
        if not value:
            raise KeyUnavailableError(f"environment variable {where} holds no master key",
                                      key_id=None)
        return Keyring(_parse_keys(value, f"${where}"), source=f"${where}")
    found = [e for e in entry_points(group=KEYS_GROUP) if e.name == scheme]
    if not found:
        raise KeyUnavailableError(f"keys {scheme}:{where}: no resolver for {scheme!r} is "
                                  f"installed ({KEYS_GROUP} entry points)", key_id=None)
    resolve: Callable[[str], str] = found[0].load()
    try:
        text = resolve(where)
    except SkyferryError:
        raise
    except Exception as exc:  # the message names the place, never a value
        raise KeyUnavailableError(f"keys {scheme}:{where}: {type(exc).__name__}",
                                  key_id=None) from None
    return Keyring(_parse_keys(text, f"{scheme}:{where}"), source=f"{scheme}:{where}")


def keys_spec(keys: str | None, encryption: Any) -> str | None:
    """Where a reader (or rekey) finds master keys: ``keys``, else ``SKYFERRY_KEYS``, else
    the topology's ``encryption.master_keys``."""
    return keys or os.environ.get("SKYFERRY_KEYS") or (
        encryption.master_keys if encryption is not None else None)


def run_keyring(encrypt: bool | None, keys: str | None, topology: Any) -> Keyring | None:
    """The keyring a run encrypts with, or None: ``encrypt`` (None: on when the topology
    has an ``encryption`` section), with ``keys`` or else the topology's."""
    on = encrypt if encrypt is not None else topology is not None
    if not on:
        return None
    spec = keys or (topology.master_keys if topology is not None else None)
    if not spec:
        raise KeyUnavailableError("encryption is on, but no master keys are named: pass "
                                  "--keys file:PATH|env:VARIABLE|block:NAME, or set "
                                  "encryption.master_keys in the topology", key_id=None)
    keyring = load_keyring(spec)
    register(base64.b64encode(k.secret).decode() for k in keyring.keys)
    return keyring


def new_master_key(key_id: str) -> str:
    """A new master key as one ``id:base64`` line, for a key file or an environment variable."""
    if not _KEY_ID.match(key_id):
        raise KeyUnavailableError(f"master key id {key_id!r} is not a name", key_id=key_id)
    return f"{key_id}:{base64.b64encode(secrets.token_bytes(32)).decode()}"
