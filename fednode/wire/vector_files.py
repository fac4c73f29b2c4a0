"""The write-or-check loop shared by the test-vector generators (scripts/gen_vectors.py,
scripts/gen_stream_vectors.py): each renders JSON files deterministically, and `--check` compares
them with the files on disk instead of writing."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path


def stale_or_write(vector_dir: Path, renders: Mapping[str, Callable[[], str]], *, check: bool) -> list[str]:
    """Write each rendered file into `vector_dir`, or with check=True write nothing and return the
    names whose file on disk is missing or differs."""
    stale = []
    for name, render in renders.items():
        path = vector_dir / name
        text = render()
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return stale


def generator_main(argv: list[str] | None, *, doc: str | None, generator: str, vector_dir: Path,
                   renders: Mapping[str, Callable[[], str]]) -> int:
    """A generator script's command line: rewrite the files, or with --check exit 1 if any is out of date."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--check", action="store_true", help="compare with the files on disk; write nothing")
    args = parser.parse_args(argv)
    stale = stale_or_write(vector_dir, renders, check=args.check)
    if stale:
        print(f"out of date: {', '.join(stale)}; run {generator}", file=sys.stderr)
        return 1
    return 0
