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
        ("[network]\nmesh_degree = 2\n", ["bad.toml", "network.mesh_degree_low", "(3)", "network.mesh_degree", "(2)"]),
        ("[network]\nmesh_degree = 7\n", ["network.mesh_degree_high", "(6)", "(7)"]),
        ("[nosuch]\nx = 1\n", ["unknown section [nosuch]"]),
        ("research = 1\n", ["[research] must be a table"]),
        ("[round\n", ["not valid TOML"]),
        ("[learning]\nnode_index = 4\nnum_nodes = 4\n", ["learning.node_index"]),
        # malformed multiaddrs: before, `config --check` passed them and `run` died in libp2p
        ("[network]\nlisten = [\"/ip4/1.2.3/tcp/1\"]\n", ["bad.toml", "network.listen", "'/ip4/1.2.3/tcp/1'"]),
        ("[network]\nlisten = [\"/ip4/0.0.0.0/tcp/99999\"]\n", ["network.listen", "99999", "/tcp/<port>"]),
        ("[network]\nlisten = [\"0.0.0.0:4001\"]\n", ["network.listen", "'0.0.0.0:4001'"]),
        ("[network]\nlisten = [\"/ip4/0.0.0.0/udp/4001\"]\n", ["network.listen", "not a TCP address"]),
        ("[network]\nbootstrap = [\"/ip4/10.0.0.1/tcp/4001\"]\n", ["network.bootstrap", "/p2p/<peer id>"]),
        ("[network]\nbootstrap = [\"/ip4/10.0.0.1/tcp/4001/p2p/notapeer\"]\n",
         ["network.bootstrap", "'/ip4/10.0.0.1/tcp/4001/p2p/notapeer'", "not a valid multiaddr"]),
        ("[network]\nbootstrap = [\"12D3KooWLNPE2CA1u4WhPuoA9gdP4Njp5c5DT6MAE1eQrzXBm6ku\"]\n",
         ["network.bootstrap", "/p2p/<peer id>"]),
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


def test_aggregation_section_reaches_the_aggregation_options() -> None:
    from fednode.node.rounds import aggregation_options

    plain = aggregation_options(parse_config("[aggregation]\nclip_norm = 3.0\nexact_max_batch_bytes = 2097152\n"))
    assert plain.clip_norm == 3.0 and plain.dp_noise_multiplier == 0.0 and plain.exact_max_batch_bytes == 2 << 20
    assert aggregation_options(parse_config("")).clip_norm is None  # 0 = the median client norm
    # with DP noise on, updates are clipped to the bound the noise is calibrated to
    dp = aggregation_options(parse_config("[aggregation]\ndp_noise_multiplier = 1.0\ndp_clip_norm = 0.5\n"
                                          "clip_norm = 3.0\ntrim_beta = 0.1\n"))
    assert dp.clip_norm == 0.5 and dp.dp_noise_multiplier == 1.0 and dp.trim_beta == 0.1


def test_blob_limits_must_fit_one_manifest_and_reach_the_store(tmp_path: Path) -> None:
    from fednode.blobs.manifest import DEFAULT_MAX_CHUNKS, MAX_CHUNK_SIZE
    from fednode.identity import Identity
    from fednode.node.daemon import Node

    with pytest.raises(ConfigError, match=r"blobs\.chunk_bytes"):
        parse_config(f"[blobs]\nchunk_bytes = {MAX_CHUNK_SIZE * 2}\n")
    with pytest.raises(ConfigError, match=r"blobs\.max_blob_bytes"):
        parse_config(f"[blobs]\nchunk_bytes = 4096\nmax_blob_bytes = {4096 * DEFAULT_MAX_CHUNKS + 1}\n")
    config = parse_config(f'[node]\ndata_dir = "{tmp_path}"\n[blobs]\nchunk_bytes = 65536\nmax_blob_bytes = 1048576\n')
    node = Node(config, Identity.generate())
    assert node.store.chunk_size == 65536 and node.store.limits.max_blob_bytes == 1 << 20


def test_every_config_key_is_read_by_the_code() -> None:
    """A documented key that nothing reads is a lie in the README: each `section.key` must be
    read (as `.key`) somewhere in the package outside config.py."""
    import dataclasses
    import re

    package = Path(__file__).resolve().parent.parent / "fednode"
    source = "\n".join(p.read_text() for p in package.rglob("*.py") if p.name != "config.py")
    source += "\n".join(m.group(0) for m in re.finditer(r"self\.node\.key_file", (package / "config.py").read_text()))
    unread = []
    for section in dataclasses.fields(Config):
        if section.default_factory is dataclasses.MISSING:
            continue
        for key in dataclasses.fields(section.default_factory()):
            if not re.search(rf"\.{key.name}\b", source):
                unread.append(f"{section.name}.{key.name}")
    assert not unread, unread


def test_max_participants_must_fit_the_aggregate_announcement_in_one_message() -> None:
    from fednode.wire.messages import aggregate_announce_bytes

    with pytest.raises(ConfigError, match=r"round\.max_participants.*network\.max_message_bytes.*at most 398 fit"):
        parse_config("[round]\nmax_participants = 1000\n")
    assert aggregate_announce_bytes(398) <= 65536 < aggregate_announce_bytes(399)
    parse_config("[round]\nmax_participants = 398\n")
    parse_config("[round]\nmax_participants = 1000\n[network]\nmax_message_bytes = 262144\n")


def test_learning_rate_schedule_keys_reach_the_local_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    import fednode.learning.trainer
    from fednode.learning.schedule import LrSchedule
    from fednode.node.trainers import LearningTrainer

    seen: dict[str, object] = {}

    class Stub:  # stands in for LocalTrainer: no model is loaded
        base_hash = "0" * 64

        def __init__(self, *args: object, **kwargs: object) -> None:
            seen.update(kwargs)

    monkeypatch.setattr(fednode.learning.trainer, "LocalTrainer", Stub)
    LearningTrainer(parse_config('[learning]\nlr_schedule = "cosine"\nlr_floor = 0.25\n'))
    assert seen["lr_schedule"] == LrSchedule("cosine", 0.25)
    LearningTrainer(parse_config(""))
    assert seen["lr_schedule"] == LrSchedule()  # the defaults the demo and bench_quality were tuned with
    with pytest.raises(ConfigError, match=r"learning\.lr_schedule"):
        parse_config('[learning]\nlr_schedule = "step"\n')


def test_well_formed_multiaddrs_load() -> None:
    peer = "12D3KooWLNPE2CA1u4WhPuoA9gdP4Njp5c5DT6MAE1eQrzXBm6ku"
    net = parse_config(f"""[network]
listen = ["/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/0"]
bootstrap = ["/ip4/203.0.113.7/tcp/4001/p2p/{peer}", "/dns4/node.example.org/tcp/4001/p2p/{peer}"]
""").network
    assert net.listen == ["/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/0"] and len(net.bootstrap) == 2
