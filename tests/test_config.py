from __future__ import annotations

from pathlib import Path

import pytest

from fednode.config import Config, ConfigError, example_toml, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def test_example_config_documents_every_key_and_loads_to_defaults() -> None:
    text = (ROOT / "configs" / "node.toml").read_text()
    assert text == example_toml(), "configs/node.toml is stale: regenerate with `fednode config --example`"
    loaded = parse_config(text)
    defaults = Config()
    for section in ("node", "network", "community", "research", "coordinator", "round", "learning", "blobs",
                    "aggregation", "metrics", "control"):
        assert getattr(loaded, section) == getattr(defaults, section), section


def test_gate_defaults_to_false_when_missing() -> None:
    assert parse_config("").research.federated_learning is False
    assert parse_config("[research]\n").research.federated_learning is False
    assert parse_config("[research]\nfederated_learning = true\n").research.federated_learning is True


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("[research]\nfederated_learnin = true\n", ["bad.toml", "research.federated_learnin", "federated_learning"]),
        ("[research]\nfederated_learning = \"yes\"\n", ["bad.toml", "research.federated_learning", "boolean"]),
        ("[round]\nlocal_steps = 2.5\n", ["round.local_steps", "integer"]),
        ("[round]\nmin_participants = 0\n", ["round.min_participants", "[1, 10000]"]),
        ("[round]\nmin_participants = 5\nmax_participants = 3\n", ["round.min_participants", "max_participants"]),
        ("[coordinator]\nmode = \"vote\"\n", ["coordinator.mode", "'elect'", "'fixed'"]),
        ("[coordinator]\nmode = \"fixed\"\n", ["coordinator.fixed_peer_id"]),
        ("[network]\nlisten = \"/ip4/0.0.0.0/tcp/1\"\n", ["network.listen", "list of strings"]),
        ("[nosuch]\nx = 1\n", ["unknown section [nosuch]"]),
        ("research = 1\n", ["[research] must be a table"]),
        ("[round\n", ["not valid TOML"]),
        ("[learning]\nnode_index = 4\nnum_nodes = 4\n", ["learning.node_index"]),
    ],
)
def test_bad_configs_name_file_key_and_expectation(text: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="bad.toml")
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)


def test_load_config_resolves_data_dir_relative_to_file(tmp_path: Path) -> None:
    cfg = tmp_path / "n.toml"
    cfg.write_text('[node]\ndata_dir = "data"\n')
    assert load_config(cfg).data_dir == tmp_path / "data"


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")
