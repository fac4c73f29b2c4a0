"""Pure wire layer: messages, canonical encoding, signatures, verdicts. No trio, libp2p or torch."""

from fednode.wire.codec import decode, encode, message_id, sign, signing_bytes, topic_for, verify
from fednode.wire.messages import (
    AGGREGATION_METHODS,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    AggregateAnnounce,
    Contribution,
    CoordinatorClaim,
    Heartbeat,
    Message,
    RoundFailed,
    RoundID,
    RoundManifest,
    SubmissionAnnounce,
)
from fednode.wire.validate import Checked, MessageValidator, ValidationPolicy
from fednode.wire.verdict import ACCEPTED, Validation, Verdict

__all__ = [
    "ACCEPTED", "AGGREGATION_METHODS", "MESSAGE_TYPES", "PROTOCOL_VERSION", "AggregateAnnounce", "Checked",
    "Contribution", "CoordinatorClaim", "Heartbeat", "Message", "MessageValidator", "RoundFailed", "RoundID",
    "RoundManifest", "SubmissionAnnounce", "Validation", "ValidationPolicy", "Verdict", "decode", "encode",
    "message_id", "sign", "signing_bytes", "topic_for", "verify",
]
