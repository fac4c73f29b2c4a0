"""Issue 11 listed the cases a second implementation found without a published vector. Each one is
named here with the vectors that now pin it and the verdict they record; a vector renamed, dropped
or given another verdict fails this test (test_vectors.py checks every vector against the code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

VECTORS = Path(__file__).resolve().parents[2] / "protocols" / "vectors"

# case in issue 11 -> {vector name: (verdict, reason)}
LISTED_CASES: dict[str, dict[str, tuple[str, str]]] = {
    "ext values": {"malformed-ext-zero-length": ("reject", "malformed"),
                   "malformed-ext-fixext1": ("reject", "malformed"),
                   "malformed-ext-timestamp": ("reject", "malformed"),
                   "malformed-ext-version-2": ("reject", "malformed")},
    "invalid UTF-8": {"malformed-invalid-utf8": ("reject", "malformed"),
                      "malformed-invalid-utf8-key": ("reject", "malformed")},
    "bin or int keys": {"malformed-bin-key": ("reject", "malformed"), "malformed-int-key": ("reject", "malformed"),
                        "malformed-bin-key-version-2": ("reject", "malformed")},
    "nil": {"malformed-nil-value": ("reject", "malformed")},
    "NaN / inf / -0.0": {"malformed-nan": ("reject", "malformed"), "malformed-infinity": ("reject", "malformed"),
                         "malformed-negative-infinity-timestamp": ("reject", "malformed"),
                         "malformed-negative-zero": ("reject", "malformed"),
                         "malformed-deadline-negative-zero": ("reject", "malformed")},
    "a non-empty wrong-length signature": {"malformed-signature-63-bytes": ("reject", "malformed"),
                                           "malformed-signature-65-bytes": ("reject", "malformed")},
    "an undecodable signer": {"bad-signature-undecodable-signer": ("reject", "bad_signature")},
    "small-order keys": {"bad-signature-small-order-key": ("reject", "bad_signature"),
                         "bad-signature-small-order-r": ("reject", "bad_signature"),
                         "bad-signature-non-canonical-key": ("reject", "bad_signature")},
    "S >= L": {"bad-signature-s-not-below-l": ("reject", "bad_signature")},
    "duplicate or empty contributions": {"malformed-duplicate-contribution": ("reject", "malformed"),
                                         "malformed-empty-contributions": ("reject", "malformed")},
    "deadline 0": {"non-canonical-deadline-zero": ("reject", "non_canonical"),
                   "non-canonical-deadline-int-zero": ("reject", "non_canonical")},
    "nesting depth": {"malformed-nested-too-deep": ("reject", "malformed"),
                      "malformed-too-deep-version-2": ("reject", "malformed"),
                      "unsupported-version-deepest-nesting": ("ignore", "unsupported_version")},
}


def recorded() -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for path in VECTORS.glob("*.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        for vector in data.get("vectors", []) if isinstance(data, dict) else []:
            expect = vector.get("expect")
            if isinstance(expect, dict) and "verdict" in expect:
                out[vector["name"]] = (expect["verdict"], expect["reason"])
    return out


@pytest.mark.parametrize("case", sorted(LISTED_CASES))
def test_every_case_listed_in_issue_11_has_its_vectors(case: str) -> None:
    have = recorded()
    for name, verdict in LISTED_CASES[case].items():
        assert have.get(name) == verdict, f"{case}: vector {name!r} is {have.get(name)}, expected {verdict}"


def test_the_sync_and_peer_exchange_specs_have_vectors() -> None:
    for name in ("sync-v1", "peer-exchange-v1"):
        data = json.loads((VECTORS / f"{name}.json").read_text(encoding="utf-8"))
        assert data["spec"].endswith(f"{name}.md") and (VECTORS.parent / f"{name}.md").is_file()
        assert len(data["responses"] if name == "peer-exchange-v1" else data["requests"]) >= 5
