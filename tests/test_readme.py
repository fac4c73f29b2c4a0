"""README.md stays true: the two commands come first and the config table matches the code."""

from __future__ import annotations

from pathlib import Path

from fednode.config import config_markdown

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_two_commands_come_first() -> None:
    first_block = README.split("```")[1]
    assert "./scripts/demo" in first_block and "./scripts/test" in first_block


def test_config_table_is_generated_from_the_code() -> None:
    start = README.index("<!-- config-keys")
    body = README[README.index("\n", start) + 1 : README.index("<!-- /config-keys -->")]
    assert body == config_markdown(), "regenerate the README table with `fednode config --markdown`"


def test_readme_names_every_package_of_the_layout() -> None:
    root = Path(__file__).resolve().parents[1] / "fednode"
    for package in sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        assert f"fednode/{package}/" in README, package
