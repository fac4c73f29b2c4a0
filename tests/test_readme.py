"""README.md stays true: the two commands come first and the config table matches the code."""

from __future__ import annotations

import shlex
from pathlib import Path

from fednode.cli import main
from fednode.config import config_markdown, load_config
from fednode.identity import load_key_file
from tests.readme_guide import read_guide

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


def test_guide_init_commands_work_and_show_what_init_prints(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """The multi-machine guide's `fednode init` commands, as written (tests/integration/test_readme_guide.py
    runs the whole guide with daemons): each succeeds, each member gets its own data share, and machine
    A's output is the guide's word for word, but for the node id and the home folder."""
    guide = read_guide(README)
    shares = set()
    for machine, commands in guide.commands.items():
        home = tmp_path / machine
        [command] = [c for c in commands if c.startswith("fednode init ")]
        assert main(shlex.split(command.replace("~/", f"{home}/"))[1:]) == 0, command
        out = capsys.readouterr().out
        config = load_config(home / "fednode" / "node.toml")
        shares.add((config.learning.node_index, config.learning.num_nodes))
        if machine == "A":
            node_id = load_key_file(home / "fednode" / "node.key").node_id
            want = guide.init_output.replace(guide.example_node_id, node_id).replace(guide.example_home, str(home))
            assert out.splitlines() == want.splitlines()
    assert shares == {(i, len(guide.commands)) for i in range(len(guide.commands))}
