from __future__ import annotations

from pathlib import Path

import pytest

from fednode.errors import BaseModelMismatch, ConfigError
from fednode.learning import LocalTrainer, base_model_hash, check_base_model, get_task, task_from_mapping
from fednode.learning.task import BUILTIN_SMOLLM2


def test_profiles_and_overrides() -> None:
    default = get_task()
    assert default.name == "minilm-bbc" and default.kind == "seq_cls" and default.num_labels == 5
    assert default.target_modules == ("query", "value") and default.modules_to_save == ("classifier",)
    assert (default.lora_r, default.lora_alpha, default.batch_size) == (16, 32, 16)
    assert 64 <= default.max_len <= 128
    lm = get_task("smollm2-lm")
    assert lm.base_model_id == BUILTIN_SMOLLM2
    assert lm.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert get_task(max_len=96).max_len == 96


def test_task_from_toml_table() -> None:
    task = task_from_mapping(
        {"profile": "smollm2-lm", "batch_size": 2, "target_modules": ["q_proj"], "torch_threads": 1}
    )
    assert task.batch_size == 2 and task.target_modules == ("q_proj",)
    assert task.extra == {"torch_threads": 1}
    assert task == get_task("smollm2-lm", batch_size=2, target_modules=("q_proj",))


def test_config_spellings_are_accepted() -> None:
    task = task_from_mapping(
        {"task": "smollm2-lm", "max_length": 32, "lora_rank": 8, "base_model_id": "", "partition": "iid"}
    )
    assert (task.name, task.max_len, task.lora_r) == ("smollm2-lm", 32, 8)
    assert task.base_model_id == BUILTIN_SMOLLM2 and task.extra == {"partition": "iid"}


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"profile": "nope"}, "unknown"),
        ({"max_len": 0}, "max_len"),
        ({"kind": "vision"}, "kind"),
        ({"test_fraction": 1.0}, "test_fraction"),
    ],
)
def test_bad_task_tables_are_config_errors(table: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        task_from_mapping(table)


def test_base_model_hash_covers_weight_names_and_contents(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "a.safetensors").write_bytes(b"alpha")
    (tmp_path / "b.bin").write_bytes(b"beta")
    first = base_model_hash(tmp_path)
    assert len(first) == 64 and base_model_hash(tmp_path) == first
    (tmp_path / "config.json").write_text('{"ignored": true}')  # not a weight file
    assert base_model_hash(tmp_path) == first
    (tmp_path / "b.bin").write_bytes(b"BETA")
    changed = base_model_hash(tmp_path)
    assert changed != first
    (tmp_path / "b.bin").rename(tmp_path / "c.bin")
    assert base_model_hash(tmp_path) != changed
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no weight files"):
        base_model_hash(empty)


def test_mismatched_base_refuses_the_round(trainer: LocalTrainer) -> None:
    ours = trainer.base_hash
    assert ours == base_model_hash(trainer.model_dir)
    trainer.check_base(ours)  # same model: fine
    check_base_model(ours, ours)
    other = "0" * 64
    with pytest.raises(BaseModelMismatch) as info:
        trainer.check_base(other)
    assert info.value.expected == other and info.value.actual == ours
    assert other in str(info.value) and ours in str(info.value)
