"""Bring your own trainer: `[learning] trainer = "module:factory"` loads user code that implements the
Trainer protocol; every way of getting it wrong is an error naming the key; and the shipped example
(examples/custom_trainer/my_trainer.py) federates: three nodes on the memory transport, each on its
own private data, end with a merged adapter that beats the fresh one on every node's held-out data."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio

from fednode.config import load_config
from fednode.errors import ConfigError
from fednode.node.daemon import Node
from fednode.node.trainers import make_trainer
from fednode.node.user_trainer import CheckedTrainer
from fednode.transport.memory import open_memory_transport
from tests.node.conftest import clock, cluster, node_config, seed_identity, wait_until

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "custom_trainer"

GOOD = '''
from fednode.node.trainers import TrainOutput

class T:
    base_model_id = "m"
    base_model_hash = "h"
    def train(self, start, *, round_number, steps, learning_rate, seed, progress=None):
        return RESULT
    def evaluate(self, adapter):
        return EVAL
    def check_update(self, delta, *, max_norm):
        pass
    def install(self, adapter, directory, *, lora_rank, lora_alpha):
        pass

RESULT = TrainOutput(b"x", 3, {"loss": 1})
EVAL = {"loss": 0.5}

def factory(config):
    return T()
'''


def _write(tmp_path: Path, module: str, source: str, trainer: str, trainer_path: str = "code") -> Path:
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    (code / f"{module}.py").write_text(textwrap.dedent(source))
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "data"\n[learning]\ntrainer = "{trainer}"\n'
                      f'trainer_path = "{trainer_path}"\n')
    sys.modules.pop(module, None)
    return config


def test_a_user_trainer_is_loaded_from_trainer_path_relative_to_the_config(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "good_trainer_a", GOOD, "good_trainer_a:factory"))
    assert config.learning.trainer_path == str(tmp_path / "code")
    trainer = make_trainer(config)
    assert isinstance(trainer, CheckedTrainer)
    assert (trainer.base_model_id, trainer.base_model_hash) == ("m", "h")
    out = trainer.train(None, round_number=1, steps=1, learning_rate=0.1, seed=0)
    assert (out.delta_bytes, out.num_samples, out.metrics) == (b"x", 3, {"loss": 1.0})
    assert trainer.evaluate(None) == {"loss": 0.5}
    # The daemon may pass a deadline; a trainer written without that parameter never sees it.
    assert trainer.train(None, round_number=1, steps=1, learning_rate=0.1, seed=0, deadline=1.0).num_samples == 3


def test_a_deadline_reaches_a_trainer_that_takes_one(tmp_path: Path) -> None:
    source = GOOD.replace("seed, progress=None):",
                          "seed, progress=None, deadline=None):\n        SEEN.append(deadline)")
    config = load_config(_write(tmp_path, "deadline_trainer", source + "\nSEEN = []\n", "deadline_trainer:factory"))
    make_trainer(config).train(None, round_number=1, steps=1, learning_rate=0.1, seed=0, deadline=123.0)
    assert sys.modules["deadline_trainer"].SEEN == [123.0]


@pytest.mark.parametrize(("source", "trainer", "trainer_path", "expected"), [
    (GOOD, "no_such_module_xyz:factory", "code", r"key 'learning.trainer' .*no module named 'no_such_module_xyz' "
     r"\(searched learning.trainer_path"),
    (GOOD, "mod_b:nope", "code", r"key 'learning.trainer' .*module 'mod_b' .* has no attribute 'nope'"),
    (GOOD + "\nnot_callable = 3\n", "mod_c:not_callable", "code", r"'not_callable' in 'mod_c' is not callable"),
    (GOOD.replace("    def install", "    def _install"), "mod_d:factory", "code",
     r"key 'learning.trainer' .*lacks the method\(s\) install of the Trainer protocol"),
    (GOOD.replace('base_model_hash = "h"', "base_model_hash = 5"), "mod_e:factory", "code",
     r"non-empty string attribute 'base_model_hash'"),
    ("raise RuntimeError('boom at import')\n", "mod_f:factory", "code",
     r"key 'learning.trainer' .*importing 'mod_f' raised RuntimeError: boom at import"),
    (GOOD.replace("return T()", "raise ValueError('no data file')"), "mod_g:factory", "code",
     r"key 'learning.trainer' .*the factory raised ValueError: no data file"),
    ("import not_installed_dep_xyz\n", "mod_h:factory", "code",
     r"importing 'mod_h' failed: No module named 'not_installed_dep_xyz'"),
    (GOOD, "mod_i:factory", "missing-folder", r"key 'learning.trainer_path': .*missing-folder' is not a folder"),
])
def test_loading_errors_name_the_key(tmp_path: Path, source: str, trainer: str, trainer_path: str,
                                     expected: str) -> None:
    written = "some_other_module" if trainer.startswith("no_such") else trainer.split(":")[0]
    config = load_config(_write(tmp_path, written, source, trainer, trainer_path))
    with pytest.raises(ConfigError, match=expected):
        make_trainer(config)


@pytest.mark.parametrize("spec", ["my_module", "my module:factory", "my_module:", ":factory", "a.b:c-d"])
def test_a_malformed_trainer_spec_fails_at_config_load(tmp_path: Path, spec: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[learning]\ntrainer = "{spec}"\n')
    with pytest.raises(ConfigError, match=r"node.toml: key 'learning.trainer': expected \"package.module:factory\""):
        load_config(config)


@pytest.mark.parametrize(("replace", "expected"), [
    (('RESULT = TrainOutput(b"x", 3, {"loss": 1})', "RESULT = (b'x', 3)"), r"train\(\) returned tuple"),
    (('RESULT = TrainOutput(b"x", 3, {"loss": 1})', 'RESULT = TrainOutput(b"x", 0)'), r"num_samples=0"),
    (('RESULT = TrainOutput(b"x", 3, {"loss": 1})', 'RESULT = TrainOutput("x", 3)'), r"delta_bytes of type str"),
    (('EVAL = {"loss": 0.5}', 'EVAL = {"loss": "low"}'), r"evaluate\(\) returned 'loss': 'low'"),
    (('EVAL = {"loss": 0.5}', "EVAL = [0.5]"), r"evaluate\(\) returned list"),
])
def test_wrong_results_are_errors_naming_the_key(tmp_path: Path, replace: tuple[str, str], expected: str) -> None:
    module = f"mod_res_{abs(hash(replace)) % 10**8}"
    config = load_config(_write(tmp_path, module, GOOD.replace(*replace), f"{module}:factory"))
    trainer = make_trainer(config)
    with pytest.raises(TypeError, match=f"key 'learning.trainer' .*{expected}"):
        trainer.train(None, round_number=1, steps=1, learning_rate=0.1, seed=0)
        trainer.evaluate(None)


def test_the_example_trainer_learns_alone(tmp_path: Path) -> None:
    config = node_config(tmp_path, 0, 3, learning={"trainer": "my_trainer:make_trainer",
                                                   "trainer_path": str(EXAMPLE_DIR), "batch_size": 16},
                         round={"lora_rank": 4, "lora_alpha": 8.0})
    trainer = make_trainer(config)
    assert (tmp_path / "my_data.jsonl").is_file()  # the generated private share
    before = trainer.evaluate(None)
    out = trainer.train(None, round_number=1, steps=60, learning_rate=0.02, seed=0)
    after = trainer.evaluate(out.delta_bytes)
    assert after["loss"] < before["loss"] and after["accuracy"] > before["accuracy"]
    trainer.check_update(out.delta_bytes, max_norm=1e4)


async def test_the_example_trainer_federates_on_the_memory_transport(tmp_path: Path, autojump_clock: Any) -> None:
    n, rounds = 3, 3
    learning = {"trainer": "my_trainer:make_trainer", "trainer_path": str(EXAMPLE_DIR), "batch_size": 16}
    round_cfg = {"local_steps": 25, "learning_rate": 0.02, "max_rounds": rounds, "lora_rank": 4,
                 "lora_alpha": 8.0, "aggregation": "exact"}
    async with cluster(tmp_path) as c:
        nodes: list[Node] = []
        for i in range(n):
            cfg = node_config(tmp_path / f"node-{i}", i, n, learning=learning, round=round_cfg)
            node = Node(cfg, seed_identity(i), trainer=make_trainer(cfg), clock=clock, inline_training=True,
                        transport_factory=lambda ident: open_memory_transport(c.network, ident))
            await c.nursery.start(node.run)
            nodes.append(node)
        await wait_until(lambda: all(node.driver.progress.rounds_completed >= rounds for node in nodes))
        await trio.sleep(5)  # the coordinator's evaluation of the last merged adapter
    records = [json.loads((node.config.data_dir / "rounds" / f"round-{rounds}.json").read_text())
               for node in nodes]
    assert len({r["merged_sha256"] for r in records}) == 1
    assert len(records[0]["accepted"]) == n
    sys.path.insert(0, str(EXAMPLE_DIR))
    import my_trainer  # the example, as a user would use its result

    # Each node's own data differ (its generated share); score the final merged adapter on each.
    final = nodes[0].config.data_dir / "adapters" / "latest"
    assert json.loads((final / "my_trainer.json").read_text())["r"] == 4
    weight = my_trainer.load_classifier(final)
    for node in nodes:
        trainer = node.driver.trainer
        assert trainer is not None
        merged = trainer.evaluate((final / "adapter_model.safetensors").read_bytes())
        fresh = trainer.evaluate(None)
        assert merged["loss"] < fresh["loss"] and merged["accuracy"] > fresh["accuracy"], (merged, fresh)
        inner = trainer.inner  # type: ignore[attr-defined]
        predicted = (inner.x_test @ weight.T).argmax(1)
        assert abs(float((predicted == inner.y_test).float().mean()) - merged["accuracy"]) < 1e-6
