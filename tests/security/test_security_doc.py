"""protocols/security.md names, for every claim, the tests that cover it: check that they exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "protocols" / "security.md"
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start: end if end >= 0 else len(text)]


def table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| #") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if re.fullmatch(r"[A-Z]\d+", cells[0]):
                rows.append(cells)
    return rows


def functions_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_named_test_exists() -> None:
    refs = REFERENCE.findall(DOC.read_text())
    assert len(refs) >= 30, "the threat model should name the tests behind its claims"
    missing = []
    for path, name in sorted(set(refs)):
        file = ROOT / path
        if not file.is_file():
            missing.append(f"{path} (no such file)")
        elif not name.startswith("test_") or name not in functions_in(file):
            missing.append(f"{path}::{name} (no such test function)")
    assert not missing, missing


def test_every_protected_claim_names_a_test() -> None:
    rows = table_rows(section("What is protected"))
    assert len(rows) >= 15
    for row in rows:
        assert REFERENCE.search(row[-1]), f"claim {row[0]} names no test"


def test_claim_ids_are_unique() -> None:
    ids = [r[0] for r in table_rows(DOC.read_text())]
    assert len(ids) == len(set(ids)), ids


def test_the_checker_notices_a_missing_test(tmp_path: Path) -> None:
    fake = tmp_path / "t.py"
    fake.write_text("def test_present():\n    pass\n")
    assert functions_in(fake) == {"test_present"}
    assert "test_absent" not in functions_in(fake)
