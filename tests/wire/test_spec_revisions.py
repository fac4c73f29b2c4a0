"""Spec revision numbers move with the protocol: each spec's status table names its latest
revision, which is the first entry of its "Revisions" list, and the list counts down to r0."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PROTOCOLS = Path(__file__).resolve().parents[2] / "protocols"
SPECS = sorted(p for p in PROTOCOLS.glob("*.md") if "| Latest Revision |" in p.read_text(encoding="utf-8"))
STATUS = re.compile(r"\| Active \| (r\d+, \d{4}-\d\d-\d\d)\s*\|")
ENTRY = re.compile(r"^- \*\*(r(\d+), \d{4}-\d\d-\d\d)\*\*", re.M)


def test_every_versioned_protocol_is_checked() -> None:
    names = {p.name for p in SPECS}
    assert {"envelope-v1.md", "round-v1.md", "election-v1.md", "blob-transfer-v1.md", "sync-v1.md",
            "peer-exchange-v1.md"} <= names


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_latest_revision_is_the_first_entry_and_entries_count_down(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    status = STATUS.search(text)
    assert status, f"{path.name}: no status table revision"
    section = text.split("\n## Revisions\n", 1)
    assert len(section) == 2, f"{path.name}: no '## Revisions' section"
    entries = ENTRY.findall(section[1])
    assert entries and entries[0][0] == status[1], f"{path.name}: status says {status[1]}, list starts {entries[:1]}"
    numbers = [int(n) for _, n in entries]
    assert numbers == list(range(numbers[0], -1, -1)), f"{path.name}: revisions {numbers} do not count down to r0"
