"""Every vector in protocols/vectors/ gets its recorded verdict, valid ones re-encode byte for byte,
and scripts/gen_vectors.py reproduces the files exactly."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fednode.identity import Identity
from fednode.wire import codec
from fednode.wire.validate import MessageValidator, ValidationPolicy

ROOT = Path(__file__).resolve().parents[2]
VECTOR_DIR = ROOT / "protocols" / "vectors"
# Wire-message vectors; the stream protocols have theirs (tests/blobs/test_vectors.py, test_stream_vectors.py).
STREAM_FILES = ("blob-transfer-v1.json", "sync-v1.json", "peer-exchange-v1.json")  # their own tests
FILES = sorted(p for p in VECTOR_DIR.glob("*.json") if p.name not in STREAM_FILES)


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def policy_of(doc: dict[str, Any]) -> ValidationPolicy:
    raw = dict(doc["policy"])
    raw["allowlist"] = None if raw["allowlist"] is None else frozenset(raw["allowlist"])
    return ValidationPolicy(**raw)


def as_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return [as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    return value


def test_the_expected_files_exist() -> None:
    names = {p.name for p in FILES}
    assert {"valid.json", "invalid.json", "replay.json", "allowlist.json", "oversize.json"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_keys_are_what_they_claim(path: Path) -> None:
    doc = load(path)
    assert doc["signing_domain_hex"] == codec.SIGNING_DOMAIN.hex()
    for key in doc["keys"]:
        identity = Identity.from_seed(bytes.fromhex(key["seed"]))
        assert identity.public_key.hex() == key["public_key"]
        assert identity.node_id == key["node_id"]
    if doc["policy"]["allowlist"] is not None:
        known = {k["node_id"] for k in doc["keys"]}
        assert set(doc["policy"]["allowlist"]) <= known


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_vector_gets_its_recorded_verdict(path: Path) -> None:
    doc = load(path)
    validator = MessageValidator(policy_of(doc))  # one validator per file: the duplicate cache carries over
    assert doc["vectors"]
    for vec in doc["vectors"]:
        data = bytes.fromhex(vec["hex"])
        checked = validator.check(data, vec.get("now", doc["now"]))
        got = {"verdict": checked.validation.verdict.value, "reason": checked.validation.reason}
        assert got == vec["expect"], f"{path.name}:{vec['name']}: {checked.validation.detail}"
        if not checked.validation.accepted:
            assert checked.message is None
            continue
        message = checked.message
        assert message is not None
        assert codec.encode(message) == data, vec["name"]
        assert codec.decode(codec.encode(message)) == message
        assert checked.message_id == vec["message_id"] == hashlib.sha256(data).hexdigest()
        signed = bytes.fromhex(vec["signed_bytes_hex"])
        assert codec.signing_bytes(message) == signed
        assert signed.startswith(codec.SIGNING_DOMAIN)
        assert as_json(codec.to_map(message)) == vec["fields"]
        assert codec.verify(message)


def test_valid_file_covers_every_message_type() -> None:
    from fednode.wire import MESSAGE_TYPES

    types = {v["fields"]["type"] for v in load(VECTOR_DIR / "valid.json")["vectors"]}
    assert types == set(MESSAGE_TYPES)


def test_invalid_file_covers_every_reject_and_ignore_reason() -> None:
    from fednode.wire.validate import IGNORE_REASONS, REJECT_REASONS

    seen = {v["expect"]["reason"] for path in FILES for v in load(path)["vectors"]}
    assert set(REJECT_REASONS) | set(IGNORE_REASONS) <= seen


def test_signed_bytes_are_domain_plus_canonical_map_without_signature() -> None:
    """Recompute the signed string from `fields` alone, as a third party would, and verify it."""
    import msgpack

    from fednode.identity import verify_signature
    from fednode.wire import MESSAGE_TYPES

    for vec in load(VECTOR_DIR / "valid.json")["vectors"]:
        fields = dict(vec["fields"])
        cls = MESSAGE_TYPES[fields["type"]]
        sig = bytes.fromhex(fields.pop(cls.SIG_FIELD))
        unsigned = codec.decode(bytes.fromhex(vec["hex"]))
        raw_unsigned = msgpack.unpackb(bytes.fromhex(vec["signed_bytes_hex"])[len(codec.SIGNING_DOMAIN):])
        assert as_json(raw_unsigned) == fields
        assert list(raw_unsigned) == sorted(raw_unsigned, key=lambda k: k.encode("utf-8"))
        assert verify_signature(unsigned.signer, bytes.fromhex(vec["signed_bytes_hex"]), sig)


def test_generator_reproduces_the_files_byte_for_byte() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_vectors.py"), "--check"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_generator_check_notices_a_changed_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_vectors", ROOT / "scripts" / "gen_vectors.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    monkeypatch.setattr(gen, "VECTOR_DIR", tmp_path)
    assert gen.main([]) == 0
    assert gen.main(["--check"]) == 0
    victim = tmp_path / "valid.json"
    victim.write_text(victim.read_text(encoding="utf-8").replace('"reason": "ok"', '"reason": "ko"', 1),
                      encoding="utf-8")
    assert gen.main(["--check"]) == 1


def test_spec_examples_match_the_vectors() -> None:
    """Hex examples quoted in the specs are real vectors, so the documents can't drift from the code."""
    all_hex = {v["hex"] for path in FILES for v in load(path)["vectors"]}
    quoted = []
    for doc in ("envelope-v1.md", "round-v1.md"):
        text = (ROOT / "protocols" / doc).read_text(encoding="utf-8")
        for block in re.findall(r"```hex\n(.*?)```", text, flags=re.S):
            quoted.append("".join(block.split()))
    assert quoted, "the specs quote at least one example in a ```hex block"
    for q in quoted:
        assert q in all_hex
