"""`fednode init` sets up a member of a multi-machine community from flags (issue 13): its own data
share, listen and bootstrap addresses, any other key; it prints the address the others dial; a bad
flag names itself and writes nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fednode.cli import main
from fednode.config import config_choices, example_toml, load_config

ROOT = Path(__file__).resolve().parents[1]


def init(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["init", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_each_member_gets_its_own_share_of_the_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The defect: every `fednode init` wrote node_index = 0, num_nodes = 1, so all members trained the
    # same examples and the coordinator refused all but one update as duplicate_delta.
    shares = []
    for i in (1, 2, 3):
        code, out, _ = init(capsys, str(tmp_path / f"m{i}"), "--federated-learning", "--share", f"{i}/3")
        assert code == 0
        cfg = load_config(tmp_path / f"m{i}" / "node.toml")
        shares.append((cfg.learning.node_index, cfg.learning.num_nodes))
        assert f"share {i} of 3 of task minilm-bbc (learning.node_index = {i - 1}, learning.num_nodes = 3)" in out
    assert shares == [(0, 3), (1, 3), (2, 3)]


def test_without_share_the_output_says_how_to_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = init(capsys, str(tmp_path / "n"))
    assert code == 0 and "give each its own --share I/N" in out


def test_printed_address_is_the_bootstrap_of_the_next_member(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = init(capsys, str(tmp_path / "a"), "--listen", "/ip4/0.0.0.0/tcp/4001")
    assert code == 0
    node_id = re.search(r"^node id:\s+(\S+)$", out, flags=re.M)[1]  # type: ignore[index]
    address = re.search(r"^address:\s+(\S+)$", out, flags=re.M)[1]  # type: ignore[index]
    assert address == f"/ip4/0.0.0.0/tcp/4001/p2p/{node_id}"
    assert "with 0.0.0.0 replaced by this machine's reachable IP" in out
    # Not replacing 0.0.0.0 is refused, naming what to do.
    code, _, err = init(capsys, str(tmp_path / "b"), "--bootstrap", address)
    assert code == 1 and "--bootstrap" in err and "reachable IP" in err
    assert not (tmp_path / "b" / "node.key").exists()
    reachable = address.replace("0.0.0.0", "203.0.113.7")
    code, out, _ = init(capsys, str(tmp_path / "b"), "--listen", "/ip4/10.0.0.2/tcp/4002", "--bootstrap", reachable)
    assert code == 0 and f"bootstrap: {reachable}" in out
    cfg = load_config(tmp_path / "b" / "node.toml")
    assert cfg.network.bootstrap == [reachable] and cfg.network.listen == ["/ip4/10.0.0.2/tcp/4002"]
    assert "replaced" not in out  # a specific address is given as is


@pytest.mark.parametrize(("argv", "needles"), [
    (["--share", "0/3"], ["--share 0/3", "[1, 3]"]),
    (["--share", "4/3"], ["--share 4/3", "[1, 3]"]),
    (["--share", "half"], ["--share 'half'", "I/N"]),
    (["--bootstrap", "/ip4/203.0.113.7/tcp/4001"], ["--bootstrap", "/p2p/<peer id>"]),
    (["--bootstrap", "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW..."], ["--bootstrap", "12D3KooW..."]),
    (["--set", "round.local_step=3"], ["round.local_step", "did you mean 'round.local_steps'"]),
    (["--set", "round.local_steps"], ["SECTION.KEY=VALUE"]),
    (["--set", "round.local_steps=many"], ["round.local_steps", "'many'"]),
    (["--set", "round.local_steps=0"], ["round.local_steps", "[1, 1000000]"]),
    (["--set", "round.aggregation=mean"], ["round.aggregation", "'fedavg'", "'exact'"]),
    (["--set", "learning.node_index=2"], ["learning.node_index", "--share"]),
    (["--set", "network.listen=[]"], ["network.listen", "--listen"]),
])
def test_a_bad_flag_names_itself_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    argv: list[str], needles: list[str]) -> None:
    code, _, err = init(capsys, str(tmp_path / "n"), *argv)
    assert code == 1
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "n" / "node.key").exists() and not (tmp_path / "n" / "node.toml").exists()


def test_set_writes_any_key_into_the_commented_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = init(capsys, str(tmp_path / "n"), "--community", "c1", "--set", "round.local_steps=5",
                      "--set", "learning.evaluate=false", "--set", "node.name=5", "--set", "learning.task=fake",
                      "--set", 'community.members=["12D3KooWa", "12D3KooWb"]')
    assert code == 0
    text = (tmp_path / "n" / "node.toml").read_text()
    cfg = load_config(tmp_path / "n" / "node.toml")
    assert (cfg.round.local_steps, cfg.learning.evaluate, cfg.node.name, cfg.learning.task) == (5, False, "5", "fake")
    assert cfg.community.members == ["12D3KooWa", "12D3KooWb"] and cfg.community.id == "c1"
    assert cfg.data_dir == (tmp_path / "n").resolve()
    # Still the full commented example: every other line as `fednode config --example` writes it.
    changed = {a for a, b in zip(text.splitlines(), example_toml().splitlines(), strict=True) if a != b}
    assert changed == {"local_steps = 5", "evaluate = false", 'name = "5"', 'task = "fake"', 'id = "c1"',
                       'members = ["12D3KooWa", "12D3KooWb"]', 'data_dir = "."'}


def test_init_refuses_an_existing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert init(capsys, str(tmp_path / "n"))[0] == 0
    code, _, err = init(capsys, str(tmp_path / "n"))
    assert code == 1 and "already exists" in err


def test_enum_keys_list_their_values_in_node_toml_and_readme() -> None:
    node_toml = (ROOT / "configs" / "node.toml").read_text()
    readme = (ROOT / "README.md").read_text()
    assert {"coordinator.mode", "round.aggregation", "learning.task", "learning.partition"} <= set(config_choices())
    for name, choices in config_choices().items():
        section, key = name.split(".")
        comment = node_toml.split(f"\n[{section}]\n", 1)[1].split(f"\n{key} = ", 1)[0].rsplit("\n", 1)[-1]
        assert comment.endswith("; one of " + ", ".join(f'"{c}"' for c in choices)), (name, comment)
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}` |"))
        assert row.endswith("; one of " + ", ".join(f'`"{c}"`' for c in choices) + " |"), row
