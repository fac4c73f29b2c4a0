"""fednode.learning.model._build_dir_once: the one atomic build-a-cache-dir helper behind the GGUF
conversion and the tokenizer extraction."""

from __future__ import annotations

from pathlib import Path

import pytest

from fednode.learning.model import _build_dir_once


def test_builds_once_atomically_and_cleans_up_a_failed_build(tmp_path: Path) -> None:
    calls: list[Path] = []

    def build(tmp: Path) -> None:
        assert tmp.parent == tmp_path and tmp.name.startswith(".cache.tmp-")  # beside the target
        calls.append(tmp)
        (tmp / "config.json").write_text("{}")

    target = tmp_path / "cache"
    assert _build_dir_once(target, "config.json", build) == target
    assert _build_dir_once(target, "config.json", build) == target  # the marker is there: no rebuild
    assert len(calls) == 1 and (target / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no temp dir left behind

    def broken(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _build_dir_once(tmp_path / "other", "config.json", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # neither target nor temp dir


def test_a_dir_another_process_finished_first_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "cache"

    def racing(tmp: Path) -> None:  # the other process renames its dir into place while we build
        (tmp / "config.json").write_text("ours")
        target.mkdir()
        (target / "config.json").write_text("theirs")
        (target / "more").write_text("so the rename over it fails")

    assert _build_dir_once(target, "config.json", racing) == target
    assert (target / "config.json").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
