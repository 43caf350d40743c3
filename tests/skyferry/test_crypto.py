"""The encrypted object format: round trips at every size and split, and every kind of
tampering caught (a flipped bit, a dropped, swapped or cut segment, another object's key or
context)."""

from __future__ import annotations

import base64
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skyferry.crypto import (
    HEADER_SIZE,
    SEGMENT,
    TAG,
    DataKey,
    Decryptor,
    Encryptor,
    Keyring,
    MasterKey,
    cipher_size,
    load_keyring,
    new_master_key,
    plain_size,
)
from skyferry.errors import DecryptionError, KeyUnavailableError

CONTEXT = b"ds/batch-1/chunk-00000"


def seal(key: DataKey, plain: bytes, cuts: list[int], context: bytes = CONTEXT) -> bytes:
    enc = Encryptor(key, context)
    out, at = [], 0
    for cut in sorted(cuts):
        out.append(enc.update(plain[at:cut]))
        at = cut
    out.append(enc.update(plain[at:]))
    out.append(enc.finish())
    return b"".join(out)


def unseal(key: DataKey, blob: bytes, size: int, context: bytes = CONTEXT) -> bytes:
    dec = Decryptor(key, context, blob[:HEADER_SIZE], size)
    rest = memoryview(blob)[HEADER_SIZE:]
    at = 0

    def read(n: int) -> bytes:
        nonlocal at
        piece = bytes(rest[at:at + n])
        at += len(piece)
        return piece

    return b"".join(dec.stream(read, block=2 * SEGMENT))


sizes = st.one_of(st.integers(0, 3 * SEGMENT + 5),
                  st.sampled_from([0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 2 * SEGMENT]))


@settings(max_examples=60, deadline=None)
@given(size=sizes, seed=st.integers(0, 2**32 - 1), data=st.data())
def test_every_size_and_split_round_trips_at_the_size_it_promises(size: int, seed: int,
                                                                  data: st.DataObject) -> None:
    plain = random.Random(seed).randbytes(size)
    cuts = data.draw(st.lists(st.integers(0, size), max_size=6))
    key = DataKey.new()
    blob = seal(key, plain, cuts)
    assert len(blob) == cipher_size(size)
    assert plain_size(len(blob)) == size
    assert unseal(key, blob, size) == plain
    # any plaintext range, from the segments that hold it
    start = data.draw(st.integers(0, size))
    end = data.draw(st.integers(start, size))
    dec = Decryptor(key, CONTEXT, blob[:HEADER_SIZE], size)
    first, lo, hi = dec.span(start, end)
    got = dec.open(first, blob[lo:hi])
    offset = first * SEGMENT
    assert got[start - offset:end - offset] == plain[start:end]


@settings(max_examples=30, deadline=None)
@given(size=st.integers(SEGMENT + 1, 3 * SEGMENT), seed=st.integers(0, 2**32 - 1),
       data=st.data())
def test_a_flipped_bit_anywhere_is_caught(size: int, seed: int, data: st.DataObject) -> None:
    plain = random.Random(seed).randbytes(size)
    key = DataKey.new()
    blob = bytearray(seal(key, plain, []))
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(DecryptionError):
        unseal(key, bytes(blob), size)


def segments_of(blob: bytes) -> tuple[bytes, list[bytes]]:
    body = blob[HEADER_SIZE:]
    step = SEGMENT + TAG
    return blob[:HEADER_SIZE], [body[i:i + step] for i in range(0, len(body), step)]


def test_dropped_swapped_and_truncated_segments_are_caught() -> None:
    plain = random.Random(7).randbytes(3 * SEGMENT + 100)
    key = DataKey.new()
    header, segs = segments_of(seal(key, plain, [5000, SEGMENT * 2]))
    assert len(segs) == 4
    swapped = header + segs[1] + segs[0] + segs[2] + segs[3]
    dropped = header + segs[0] + segs[2] + segs[3]
    with pytest.raises(DecryptionError, match="segment 0"):
        unseal(key, swapped, len(plain))
    with pytest.raises(DecryptionError):  # one segment short of the size the manifest holds
        unseal(key, dropped, len(plain))
    with pytest.raises(DecryptionError):  # read at the size it now has: the flags differ
        unseal(key, dropped, plain_size(len(dropped)))
    # cut at a segment's end: the new last segment was sealed as "not last"
    cut = header + segs[0] + segs[1]
    with pytest.raises(DecryptionError, match="segment 1"):
        unseal(key, cut, plain_size(len(cut)))
    with pytest.raises(DecryptionError):
        unseal(key, cut, len(plain))
    with pytest.raises(DecryptionError):  # cut inside a segment
        unseal(key, cut + segs[2][:100], len(plain))


def test_another_key_or_another_chunk_opens_nothing() -> None:
    plain = b"label,text\n1,secret row\n" * 100
    key, other = DataKey.new(), DataKey.new()
    blob = seal(key, plain, [])
    with pytest.raises(DecryptionError, match="data key"):
        unseal(other, blob, len(plain))
    same_id = DataKey(key.id, other.secret)  # the right id, the wrong secret
    with pytest.raises(DecryptionError, match="commitment"):
        unseal(same_id, blob, len(plain))
    with pytest.raises(DecryptionError, match="fails its tag"):  # moved to another chunk
        unseal(key, blob, len(plain), context=b"ds/batch-1/chunk-00001")


def test_a_second_pass_with_the_same_prefix_writes_the_same_bytes() -> None:
    plain = random.Random(3).randbytes(SEGMENT * 2 + 9)
    key = DataKey.new()
    one = Encryptor(key, CONTEXT)
    first = one.update(plain) + one.finish()
    two = Encryptor(key, CONTEXT, prefix=one.prefix)
    assert two.update(plain[:100]) + two.update(plain[100:]) + two.finish() == first
    assert plain[:64] not in first


def test_a_data_key_wrapped_by_one_master_opens_only_with_it(tmp_path, monkeypatch) -> None:
    line_a, line_b = new_master_key("team-a"), new_master_key("team-b")
    (tmp_path / "keys").write_text(f"# skyferry master keys\n{line_a}\n")
    ring_a = load_keyring(f"file:{tmp_path / 'keys'}")
    monkeypatch.setenv("SF_KEYS", line_b)
    ring_b = load_keyring("env:SF_KEYS")
    key = DataKey.new()
    wrapped = ring_a.wrap(key)
    assert list(wrapped) == ["team-a"]
    assert ring_a.unwrap(key.id, wrapped).secret == key.secret
    with pytest.raises(KeyUnavailableError, match="team-a") as caught:
        ring_b.unwrap(key.id, wrapped)
    assert caught.value.key_id == "team-a"
    # an impostor under the same id is told apart, not used
    impostor = Keyring((MasterKey("team-a", ring_b.primary.secret),), source="impostor")
    with pytest.raises(KeyUnavailableError, match="different key"):
        impostor.unwrap(key.id, wrapped)
    both = Keyring(ring_b.keys + ring_a.keys)
    assert both.unwrap(key.id, wrapped).secret == key.secret
    assert key.secret.hex() not in repr(key) and line_a.split(":")[1] not in repr(ring_a)


@pytest.mark.parametrize("spec, message", [
    ("plain-key-material", "expected file:PATH"),
    ("file:/nonexistent/skyferry-keys", "cannot read key file"),
    ("env:SKYFERRY_NO_SUCH_VARIABLE", "holds no master key"),
    ("kms:projects/x", "no resolver for 'kms'"),
])
def test_a_keyring_that_cannot_be_read_is_a_typed_error_naming_the_place(spec: str,
                                                                       message: str) -> None:
    with pytest.raises(KeyUnavailableError, match=message):
        load_keyring(spec)


def test_a_short_or_malformed_key_is_refused_without_echoing_it(monkeypatch) -> None:
    short = base64.b64encode(b"x" * 16).decode()
    monkeypatch.setenv("SF_KEYS", f"k1:{short}")
    with pytest.raises(KeyUnavailableError, match="16 bytes, not 32") as caught:
        load_keyring("env:SF_KEYS")
    assert short not in str(caught.value)
    monkeypatch.setenv("SF_KEYS", "k1:not base64!!")
    with pytest.raises(KeyUnavailableError, match="not base64") as caught:
        load_keyring("env:SF_KEYS")
    assert "not base64!!" not in str(caught.value)


def test_master_keys_come_from_a_prefect_secret_block(prefect_harness: None) -> None:
    from prefect.blocks.system import Secret

    line = new_master_key("vault-1")
    Secret(value=line).save("skyferry-test-keys", overwrite=True)
    ring = load_keyring("block:skyferry-test-keys")
    assert ring.primary.id == "vault-1"
    assert base64.b64encode(ring.primary.secret).decode() == line.split(":", 1)[1]
    with pytest.raises(KeyUnavailableError, match="no-such-block") as caught:
        load_keyring("block:no-such-block")
    assert line.split(":", 1)[1] not in str(caught.value)
