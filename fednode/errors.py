"""Typed errors. Each says whose fault it is (h11 style): we did something illegal
(LocalProtocolError), a peer did (RemoteProtocolError), or an input/config is wrong."""

from __future__ import annotations

import errno


class FednodeError(Exception):
    """Base class of every error fednode raises on purpose."""


class ConfigError(FednodeError):
    """A config file is malformed: names the file, the key and what was expected."""


class KeyFileError(FednodeError):
    """A key file is missing, malformed, or has unsafe permissions."""


class LocalProtocolError(FednodeError):
    """We tried to do something the protocol forbids (a bug or misuse on our side)."""


class RemoteProtocolError(FednodeError):
    """A peer sent something the protocol forbids."""


class DecodeError(RemoteProtocolError):
    """Bytes from the network are not a well-formed message."""


class LimitExceeded(RemoteProtocolError):
    """An input is over a named limit; the message names the limit and its value."""


class TransportError(FednodeError):
    """A transport operation failed (peer vanished, stream reset, closed transport)."""


class PeerUnavailable(TransportError):
    """The peer is not reachable, or vanished while we talked to it."""


class TransferError(TransportError):
    """A blob transfer failed: bad bytes, no holder left, or over a limit."""


class BlobIntegrityError(FednodeError):
    """Stored or received bytes do not match their content address."""


class BlobMissing(FednodeError, KeyError):
    """A blob is not (or no longer) in the store: never written, collected, quarantined, or removed
    from the disk by someone else between a check and its use. A KeyError too, for lookups."""


class InconsistentUpdates(FednodeError):
    """Client updates disagree on keys, shapes or dtypes and cannot be aggregated."""


class InvalidUpdate(FednodeError):
    """One client update fails validation (layout, non-finite values, norm bound)."""


class GateClosed(FednodeError):
    """A federated-learning action was requested while [research] federated_learning = false."""


class InvalidMessage(FednodeError, ValueError):
    """A message field is missing, of the wrong type or out of range. `field` names it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class BaseModelMismatch(FednodeError):
    """The round's base model (by weight hash) is not the one this node holds."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(
            f"base model mismatch: the round expects base model sha256 {expected}, "
            f"this node holds {actual}; refusing the round"
        )
        self.expected = expected
        self.actual = actual


class DiskFull(FednodeError):
    """A write failed because the disk (or the user's quota) is full: ENOSPC / EDQUOT, or sqlite's
    SQLITE_FULL ("database or disk is full"). A state to wait out, not a crash."""


class CorruptState(FednodeError):
    """state.sqlite cannot be read as a database, or fails sqlite's integrity check."""


def is_disk_full(exc: BaseException) -> bool:
    """True for DiskFull and for an OSError whose errno says the disk or quota is full."""
    return isinstance(exc, DiskFull) or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT))
