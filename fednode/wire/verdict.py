"""Validation verdicts, in gossipsub's vocabulary.

ACCEPT: deliver and forward. REJECT: the sender misbehaved; drop, do not forward, count it
(and penalise the forwarding peer). IGNORE: drop without penalty (stale, duplicate, not for us).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Verdict(enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"
    IGNORE = "ignore"


@dataclass(frozen=True, slots=True)
class Validation:
    """A verdict with a short machine-readable reason (e.g. "bad_signature") and detail text."""

    verdict: Verdict
    reason: str = "ok"
    detail: str = ""

    @property
    def accepted(self) -> bool:
        return self.verdict is Verdict.ACCEPT


ACCEPTED = Validation(Verdict.ACCEPT)
