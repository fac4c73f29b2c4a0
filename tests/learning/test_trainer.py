from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors import safe_open

from fednode.errors import ConfigError, InvalidUpdate
from fednode.learning import (
    LocalTrainer,
    TaskSpec,
    adapter_from_bytes,
    adapter_to_bytes,
    load_adapter_dir,
    load_base_model,
    save_adapter_dir,
)
from fednode.learning.model import _quiet

STEPS = 3
LR = 5e-3


@pytest.fixture(scope="module")
def trained(trainer: LocalTrainer) -> bytes:
    return trainer.train(None, steps=STEPS, learning_rate=LR, seed=7).delta_bytes


def test_training_is_deterministic_for_a_seed(trainer: LocalTrainer, trained: bytes) -> None:
    seen: list[tuple[int, float]] = []
    again = trainer.train(None, steps=STEPS, learning_rate=LR, seed=7, progress=lambda s, x: seen.append((s, x)))
    assert again.delta_bytes == trained
    assert [s for s, _ in seen] == [1, 2, 3] and all(loss > 0 for _, loss in seen)
    assert again.num_samples == len(trainer.train_indices)
    assert set(again.metrics) >= {"loss", "final_loss", "seconds_per_step"}
    other = trainer.train(None, steps=STEPS, learning_rate=LR, seed=8)
    assert other.delta_bytes != trained


def test_delta_is_safetensors_with_the_adapter_keys(trainer: LocalTrainer, trained: bytes, tmp_path: Path) -> None:
    assert not trained.startswith(b"\x80")  # not a pickle stream
    (header_len,) = struct.unpack("<Q", trained[:8])
    header = json.loads(trained[8 : 8 + header_len])
    path = tmp_path / "delta.safetensors"
    path.write_bytes(trained)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert keys == set(header) - {"__metadata__"}
    expected = set(get_peft_model_state_dict(trainer.model))
    assert keys == expected == set(trainer.adapter_layout)
    assert any(k.endswith("lora_A.weight") for k in keys) and any(k.endswith("lora_B.weight") for k in keys)
    assert any("classifier" in k for k in keys)
    fresh = adapter_from_bytes(trainer.initial_adapter_bytes())
    moved = adapter_from_bytes(trained)
    assert any(not torch.equal(fresh[k], moved[k]) for k in keys)


def test_bad_start_adapters_are_refused(trainer: LocalTrainer, trained: bytes) -> None:
    with pytest.raises(InvalidUpdate, match="safetensors"):
        trainer.train(pickle.dumps({"x": 1}), steps=1, learning_rate=LR, seed=0)
    state = adapter_from_bytes(trained)
    key = next(iter(state))
    with pytest.raises(InvalidUpdate, match="keys"):
        trainer.evaluate(adapter_to_bytes({k: v for k, v in state.items() if k != key}))
    with pytest.raises(InvalidUpdate, match="expected"):
        trainer.evaluate(adapter_to_bytes({**state, key: state[key].double()}))
    with pytest.raises(ConfigError, match="steps"):
        trainer.train(None, steps=0, learning_rate=LR, seed=0)


def test_evaluate_reports_accuracy_on_the_held_out_split(trainer: LocalTrainer, trained: bytes) -> None:
    fresh = trainer.evaluate(None)
    after = trainer.evaluate(trained)
    assert fresh["n"] == after["n"] == min(len(trainer.test_indices), trainer.task.max_eval_samples)
    assert 0.0 <= after["accuracy"] <= 1.0 and after["loss"] > 0
    assert trainer.evaluate(None) == fresh  # evaluating never leaks state into the next call


def test_merged_adapter_dir_loads_with_peft_and_matches(
    tiny_task: TaskSpec, trainer: LocalTrainer, trainer_b: LocalTrainer, trained: bytes, tmp_path: Path
) -> None:
    other = trainer_b.train(trained, steps=2, learning_rate=LR, seed=9).delta_bytes
    a, b = adapter_from_bytes(trained), adapter_from_bytes(other)
    mean = adapter_to_bytes({k: (a[k] + b[k]) / 2 for k in a})  # simple mean of the two adapters
    target = tmp_path / "adapters" / "round-1"
    save_adapter_dir(mean, target, tiny_task, base_model_dir=trainer.model_dir, base_hash=trainer.base_hash)
    save_adapter_dir(mean, target, tiny_task, base_model_dir=trainer.model_dir)  # overwrite is atomic too
    assert sorted(p.name for p in target.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "fednode.json",
    ]
    assert sorted(p.name for p in target.parent.iterdir()) == ["round-1"]  # no temp leftovers

    base = load_base_model(tiny_task, trainer.model_dir)
    loaded = load_adapter_dir(base, target)
    assert isinstance(loaded, PeftModel)
    loaded.eval()
    batch = trainer.collate(trainer.eval_examples[:8])
    ids, mask = batch.input_ids, batch.attention_mask
    trainer.evaluate(mean)  # installs the aggregate directly with set_peft_model_state_dict
    with torch.no_grad(), _quiet():
        direct = trainer.model(input_ids=ids, attention_mask=mask).logits
        from_dir = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(direct, from_dir, atol=1e-5, rtol=0)
    with torch.no_grad():
        other_logits = trainer.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(direct, other_logits)


def test_save_adapter_dir_refuses_garbage(tiny_task: TaskSpec, tmp_path: Path) -> None:
    with pytest.raises(InvalidUpdate):
        save_adapter_dir(b"not safetensors", tmp_path / "x", tiny_task)
    assert not (tmp_path / "x").exists()
