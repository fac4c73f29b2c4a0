"""Ed25519 node identity (pynacl) and its libp2p peer ID.

The node id *is* the libp2p peer ID of the node's Ed25519 key: the identity multihash of the
protobuf-encoded public key, in base58btc. An Ed25519 peer ID inlines the public key, so any
node can verify a signature from the node id alone, and the id a message is signed under is
the id the transport authenticated: the two can't disagree.

Key file format (text, mode 0600): first line `fednode-ed25519-v1`, second line the 32-byte
private seed in hex.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import base58
import nacl.exceptions
import nacl.signing

from fednode.errors import DecodeError, KeyFileError

KEY_FILE_HEADER = "fednode-ed25519-v1"
# protobuf PublicKey{Type: Ed25519 (1), Data: 32 bytes}: field 1 varint = 1, field 2 len = 32
_PROTO_ED25519_PREFIX = b"\x08\x01\x12\x20"
# multihash: identity function (0x00), digest length 36
_MULTIHASH_IDENTITY_PREFIX = b"\x00\x24"
PEER_ID_BYTES_LEN = len(_MULTIHASH_IDENTITY_PREFIX) + len(_PROTO_ED25519_PREFIX) + 32


def peer_id_bytes_from_public_key(public_key: bytes) -> bytes:
    if len(public_key) != 32:
        raise ValueError(f"Ed25519 public key must be 32 bytes, got {len(public_key)}")
    return _MULTIHASH_IDENTITY_PREFIX + _PROTO_ED25519_PREFIX + public_key


def peer_id_from_public_key(public_key: bytes) -> str:
    return base58.b58encode(peer_id_bytes_from_public_key(public_key)).decode("ascii")


def public_key_from_peer_id(node_id: str) -> bytes:
    """Extract the Ed25519 public key inlined in a peer ID; DecodeError if it is not one."""
    if not isinstance(node_id, str) or not 1 <= len(node_id) <= 64:
        raise DecodeError("node id must be a base58 peer id string of at most 64 characters")
    try:
        raw = base58.b58decode(node_id)
    except ValueError as exc:
        raise DecodeError(f"node id is not base58: {node_id!r}") from exc
    prefix = _MULTIHASH_IDENTITY_PREFIX + _PROTO_ED25519_PREFIX
    if len(raw) != PEER_ID_BYTES_LEN or not raw.startswith(prefix):
        raise DecodeError(f"node id is not an Ed25519 identity peer id: {node_id!r}")
    return raw[len(prefix) :]


def verify_signature(node_id: str, message: bytes, signature: bytes) -> bool:
    """True iff `signature` is a valid Ed25519 signature of `message` by `node_id`'s key."""
    try:
        key = nacl.signing.VerifyKey(public_key_from_peer_id(node_id))
        key.verify(message, signature)
    except (DecodeError, nacl.exceptions.BadSignatureError, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True, eq=False)
class Identity:
    """A node's signing key. `node_id` is its libp2p peer ID."""

    signing_key: nacl.signing.SigningKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != 32:
            raise ValueError(f"Ed25519 seed must be 32 bytes, got {len(seed)}")
        return cls(nacl.signing.SigningKey(seed))

    @property
    def seed(self) -> bytes:
        return bytes(self.signing_key)

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def node_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature

    def __repr__(self) -> str:  # never print the seed
        return f"Identity(node_id={self.node_id!r})"


def write_key_file(path: str | os.PathLike[str], identity: Identity | None = None,
                   *, overwrite: bool = False) -> Identity:
    """Write a new (or the given) key to `path` with mode 0600, atomically; refuses to overwrite."""
    identity = identity or Identity.generate()
    target = Path(path)
    if target.exists() and not overwrite:
        raise KeyFileError(f"{target}: key file already exists; refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, f"{KEY_FILE_HEADER}\n{identity.seed.hex()}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    return identity


def load_key_file(path: str | os.PathLike[str]) -> Identity:
    """Load a key file; refuse one that group or others can read or write (as ssh does)."""
    target = Path(path)
    try:
        st = target.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{target}: no such key file; create one with `fednode keygen {target}`") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"{target}: permissions {mode:04o} are too open; the private key must be readable by its "
            f"owner only. Fix with: chmod 600 {target}"
        )
    lines = target.read_text(encoding="ascii", errors="replace").split()
    if len(lines) != 2 or lines[0] != KEY_FILE_HEADER:
        raise KeyFileError(f"{target}: not a fednode key file (expected first line {KEY_FILE_HEADER!r})")
    try:
        seed = bytes.fromhex(lines[1])
    except ValueError:
        raise KeyFileError(f"{target}: key seed is not hex") from None
    if len(seed) != 32:
        raise KeyFileError(f"{target}: key seed must be 32 bytes, found {len(seed)}")
    return Identity.from_seed(seed)
