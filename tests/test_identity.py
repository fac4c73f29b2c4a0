"""Ed25519 identity: key files, permissions, and the node id = libp2p peer id."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fednode.errors import DecodeError, KeyFileError
from fednode.identity import (
    KEY_FILE_HEADER,
    Identity,
    load_key_file,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify_signature,
    write_key_file,
)

SEEDS = [bytes([i]) * 32 for i in (1, 2, 3, 0xFF)] + [bytes(range(32))]


def test_key_file_is_written_0600_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "node.key"
    old_umask = os.umask(0o000)  # even with a permissive umask
    try:
        written = write_key_file(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().splitlines()[0] == KEY_FILE_HEADER
    loaded = load_key_file(path)
    assert loaded.node_id == written.node_id and loaded.seed == written.seed
    assert not (tmp_path / "keys" / "node.key.tmp").exists()


def test_write_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first = write_key_file(path)
    with pytest.raises(KeyFileError, match="already exists"):
        write_key_file(path)
    assert load_key_file(path).node_id == first.node_id
    second = write_key_file(path, overwrite=True)
    assert load_key_file(path).node_id == second.node_id != first.node_id


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o602, 0o610, 0o777])
def test_group_or_world_accessible_key_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.key"
    write_key_file(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        load_key_file(path)
    text = str(info.value)
    assert f"chmod 600 {path}" in text
    assert f"{mode:04o}" in text
    path.chmod(0o600)
    assert load_key_file(path).node_id  # the suggested fix works


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.key"
    identity = write_key_file(path)
    path.chmod(mode)
    assert load_key_file(path).node_id == identity.node_id


@pytest.mark.parametrize(("content", "match"), [
    ("garbage\n", "not a fednode key file"),
    (f"{KEY_FILE_HEADER}\nzz\n", "not hex"),
    (f"{KEY_FILE_HEADER}\n{'00' * 31}\n", "32 bytes"),
])
def test_malformed_key_file(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "node.key"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=match):
        load_key_file(path)


def test_missing_key_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="fednode keygen"):
        load_key_file(tmp_path / "absent.key")


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: s[:2].hex())
def test_node_id_equals_libp2p_peer_id(seed: bytes) -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    key_pair = create_new_key_pair(seed)
    libp2p_id = ID.from_pubkey(key_pair.public_key)
    ours = Identity.from_seed(seed)
    assert ours.public_key == key_pair.public_key.to_bytes()
    assert ours.node_id == libp2p_id.to_base58() == str(libp2p_id)
    assert ID.from_base58(ours.node_id) == libp2p_id
    assert ours.node_id.startswith("12D3KooW")
    # and a libp2p signature verifies under our node id (same key, same algorithm)
    assert verify_signature(ours.node_id, b"hello", key_pair.private_key.sign(b"hello"))


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: s[:2].hex())
def test_public_key_round_trips_through_the_peer_id(seed: bytes) -> None:
    identity = Identity.from_seed(seed)
    assert public_key_from_peer_id(identity.node_id) == identity.public_key
    assert peer_id_from_public_key(identity.public_key) == identity.node_id


@pytest.mark.parametrize("bad", [
    "", "x" * 65, "0OIl", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # sha256 multihash (RSA-style) id
    "12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH",  # one character short
    "12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH5a",
    "12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPHé",
])
def test_public_key_from_a_non_ed25519_peer_id_is_a_decode_error(bad: str) -> None:
    with pytest.raises(DecodeError):
        public_key_from_peer_id(bad)
    assert not verify_signature(bad, b"m", b"\x00" * 64)


def test_verify_signature() -> None:
    alice, bob = Identity.from_seed(SEEDS[0]), Identity.from_seed(SEEDS[1])
    sig = alice.sign(b"message")
    assert verify_signature(alice.node_id, b"message", sig)
    assert not verify_signature(alice.node_id, b"messagE", sig)
    assert not verify_signature(bob.node_id, b"message", sig)
    assert not verify_signature(alice.node_id, b"message", sig[:-1])
    assert not verify_signature(alice.node_id, b"message", b"")
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    assert not verify_signature(alice.node_id, b"message", flipped)


def test_non_canonical_signature_is_refused() -> None:
    """S + L (the group order) is the same point arithmetic but a different encoding: refused (RFC 8032 5.1.7)."""
    alice = Identity.from_seed(SEEDS[0])
    sig = alice.sign(b"message")
    order = 2**252 + 27742317777372353535851937790883648493
    s = int.from_bytes(sig[32:], "little") + order
    malleated = sig[:32] + s.to_bytes(32, "little")
    assert malleated != sig
    assert not verify_signature(alice.node_id, b"message", malleated)


def test_repr_never_shows_the_seed() -> None:
    identity = Identity.from_seed(SEEDS[0])
    assert SEEDS[0].hex() not in repr(identity) and identity.node_id in repr(identity)


def test_seed_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Identity.from_seed(b"\x01" * 31)
