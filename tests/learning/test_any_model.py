"""Nothing is SmolLM2- or MiniLM-specific: tiny randomly initialised models of two other families
(a 2-layer Llama causal LM, a 2-layer Qwen3 (Qwen2-style) sequence classifier), built here and saved
to temp dirs with a small word-level tokenizer that has no pad token, train through the same code
path as the built-in profiles, and their adapters load with plain PeftModel.from_pretrained.

Their data is a stand-in for a node's own files (fednode.learning.local_data): tokenized examples
with -100-style labels (causal LM) or a class id, drawn from a tiny seeded grammar a 2-layer model
learns within a few steps. One test runs the built-in data path (fortunes) on the tiny model too."""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
)

import fednode.learning.trainer as trainer_module
from fednode.config import parse_config
from fednode.errors import ConfigError
from fednode.learning import LocalTrainer, TaskSpec, adapter_from_bytes, get_task, save_adapter_dir
from fednode.learning.accel import Available
from fednode.learning.batching import Example
from fednode.learning.local_data import ensure_pad_token
from fednode.learning.model import (
    _quiet,
    auto_target_modules,
    load_tokenizer,
    resolve_target_modules,
)
from fednode.learning.task import ALL_LINEAR
from fednode.learning.trainer import TrainSettings

CPU = TrainSettings(device="cpu", precision="fp32")
FAMILIES = {"llama": LlamaConfig, "qwen3": Qwen3Config}
ANIMALS = ("cat", "dog", "fox", "owl", "bee", "ant", "elk", "yak")
VERBS = ("sees", "likes", "finds", "eats")
THINGS = ("mat", "hat", "log", "cup", "box", "pen", "jar", "map")
TOPICS = (("goal", "match", "team", "score", "coach"), ("vote", "party", "law", "minister", "poll"),
          ("film", "actor", "song", "stage", "award"), ("chip", "phone", "code", "data", "robot"))
SPECIALS = ("<unk>", "</s>")
WORDS = (*SPECIALS, "the", ".", *ANIMALS, *VERBS, *THINGS, *(w for topic in TOPICS for w in topic))


@dataclass(frozen=True)
class StandInData:  # the fields of local_data.LocalData the trainer reads
    train: tuple[Example, ...]
    eval: tuple[Example, ...]


def _make_model_dir(root: Path, family: str) -> Path:
    target = root / family
    bare = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    bare.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No pad token, as many base models ship: fednode must pick one from the vocabulary.
    PreTrainedTokenizerFast(tokenizer_object=bare, unk_token="<unk>", eos_token="</s>").save_pretrained(target)
    config = FAMILIES[family](vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                              tie_word_embeddings=False, initializer_range=0.2, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    with _quiet():
        AutoModelForCausalLM.from_config(config).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: _make_model_dir(root, family) for family in FAMILIES}


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(("the", rng.choice(ANIMALS), rng.choice(VERBS), "the", rng.choice(THINGS), "."))
            for _ in range(n)]


def _topic_texts(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(len(TOPICS))
        words = [rng.choice(TOPICS[label]) for _ in range(5)]
        out.append((" ".join([rng.choice(ANIMALS), *words]), label))
    return out


def lm_data(model_dir: Path) -> StandInData:
    tok = load_tokenizer(model_dir)

    def examples(texts: list[str]) -> tuple[Example, ...]:
        ids = [tuple(tok(t)["input_ids"]) for t in texts]
        return tuple(Example(i, i) for i in ids)

    return StandInData(examples(_sentences(96, 1)), examples(_sentences(32, 2)))


def cls_data(model_dir: Path) -> StandInData:
    tok = load_tokenizer(model_dir)

    def examples(rows: list[tuple[str, int]]) -> tuple[Example, ...]:
        return tuple(Example(tuple(tok(t)["input_ids"]), (), y) for t, y in rows)

    return StandInData(examples(_topic_texts(96, 3)), examples(_topic_texts(32, 4)))


def _lm_task(model_dir: Path, **overrides: object) -> TaskSpec:
    spec: dict[str, object] = {"base_model_id": str(model_dir), "batch_size": 8, "max_len": 16,
                               "eval_batch_size": 32, "max_eval_samples": 32, **overrides}
    return get_task("smollm2-lm", **spec)


def _cls_task(model_dir: Path, **overrides: object) -> TaskSpec:
    spec: dict[str, object] = {"base_model_id": str(model_dir), "batch_size": 8, "max_len": 16,
                               "eval_batch_size": 32, "max_eval_samples": 32, "num_labels": len(TOPICS),
                               **overrides}
    return get_task("minilm-bbc", **spec)


def test_a_tokenizer_without_pad_gets_one_from_its_own_vocabulary(model_dirs: dict[str, Path]) -> None:
    tok = load_tokenizer(model_dirs["llama"])
    assert tok.pad_token == tok.eos_token == "</s>"
    assert len(tok) == len(WORDS)  # nothing added: the embeddings (and the base hash) stay as they are

    bare = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    only_unk = PreTrainedTokenizerFast(tokenizer_object=bare, unk_token="<unk>")
    ensure_pad_token(only_unk)
    assert only_unk.pad_token == "<unk>"
    with pytest.raises(ConfigError, match="no pad, eos, unk or bos"):
        ensure_pad_token(PreTrainedTokenizerFast(tokenizer_object=bare))


def test_target_modules_are_chosen_for_the_architecture(model_dirs: dict[str, Path]) -> None:
    task = _lm_task(model_dirs["llama"])
    assert task.target_modules == ()  # a base_model_id override drops the profile's SmolLM2 names
    assert resolve_target_modules(task) == ("q_proj", "v_proj")  # PEFT's default for llama
    assert resolve_target_modules(_cls_task(model_dirs["qwen3"])) == ("q_proj", "v_proj")
    assert auto_target_modules("an-architecture-peft-does-not-know") == (ALL_LINEAR,)
    assert _lm_task(model_dirs["llama"], target_modules=("o_proj",)).target_modules == ("o_proj",)
    assert get_task("smollm2-lm").target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")  # profile unchanged
    with pytest.raises(ConfigError, match="cannot be mixed"):
        _lm_task(model_dirs["llama"], target_modules=(ALL_LINEAR, "q_proj"))


def test_tiny_llama_trains_deterministically_and_its_adapter_loads_with_plain_peft(
    model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task, data = _lm_task(model_dirs["llama"]), lm_data(model_dirs["llama"])
    trainer = LocalTrainer(task, data=data, settings=CPU)
    assert trainer.target_modules == ("q_proj", "v_proj")
    assert {k.split(".")[-3] for k in trainer.adapter_layout} == {"q_proj", "v_proj"}
    assert len(trainer.adapter_layout) == 2 * 2 * 2  # layers x modules x (A, B)
    before = trainer.evaluate(None)

    losses: list[float] = []
    result = trainer.train(None, steps=20, learning_rate=3e-2, seed=3, progress=lambda s, x: losses.append(x))
    assert len(losses) == 20 and result.metrics["steps"] == 20 and result.metrics["stopped_early"] == 0
    assert result.num_samples == len(data.train)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses  # the loss goes down over the steps
    after = trainer.evaluate(result.delta_bytes)
    assert after["loss"] < 0.8 * before["loss"] and after["n"] == 32
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))

    # A second run from scratch (the model reloaded from disk, a new trainer) gives the same bytes.
    monkeypatch.setattr(trainer_module, "_loaded", {})
    again = LocalTrainer(task, data=lm_data(model_dirs["llama"]), settings=CPU)
    assert again.model is not trainer.model
    assert again.initial_adapter_bytes() == trainer.initial_adapter_bytes()
    assert again.train(None, steps=20, learning_rate=3e-2, seed=3).delta_bytes == result.delta_bytes

    target = save_adapter_dir(result.delta_bytes, tmp_path / "adapter", task)  # no model dir given: resolved
    assert sorted(json.loads((target / "adapter_config.json").read_text())["target_modules"]) == ["q_proj", "v_proj"]
    with _quiet():
        base = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.float32)
        plain = PeftModel.from_pretrained(base, str(target))
    plain.eval()
    batch = again.collate(again.eval_examples[:8])
    again.evaluate(result.delta_bytes)  # installs the adapter in fednode's own model
    with torch.no_grad():
        ours = again.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        theirs = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)


def test_tiny_qwen3_classifier_on_all_linear_layers(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    task = _cls_task(model_dirs["qwen3"], target_modules=(ALL_LINEAR,))
    trainer = LocalTrainer(task, data=cls_data(model_dirs["qwen3"]), settings=CPU)
    adapted = {k.split(".")[-3] for k in trainer.adapter_layout if ".lora_" in k}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert any(k.startswith("base_model.model.score.") for k in trainer.adapter_layout)  # the new head is saved
    before = trainer.evaluate(None)
    losses: list[float] = []
    result = trainer.train(None, steps=16, learning_rate=2e-2, seed=0, progress=lambda s, x: losses.append(x))
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    scores = trainer.evaluate(result.delta_bytes)
    assert scores["accuracy"] > max(before["accuracy"], 0.5) and scores["n"] == 32 and "perplexity" not in scores

    target = save_adapter_dir(result.delta_bytes, tmp_path / "adapter", task)
    assert json.loads((target / "adapter_config.json").read_text())["target_modules"] == ALL_LINEAR
    with _quiet():
        base = AutoModelForSequenceClassification.from_pretrained(model_dirs["qwen3"], num_labels=len(TOPICS),
                                                                  dtype=torch.float32)
        base.config.pad_token_id = trainer.pad_id  # batched decoder classifiers need it (plain HF too)
        plain = PeftModel.from_pretrained(base, str(target))
    plain.eval()
    batch = trainer.collate(trainer.eval_examples[:8])
    trainer.evaluate(result.delta_bytes)
    with torch.no_grad():
        ours = trainer.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        theirs = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)


def test_gradient_accumulation_and_checkpointing_give_the_same_update(model_dirs: dict[str, Path]) -> None:
    data = cls_data(model_dirs["qwen3"])

    def run(batch_size: int, settings: TrainSettings) -> dict[str, torch.Tensor]:
        trainer = LocalTrainer(_cls_task(model_dirs["qwen3"], batch_size=batch_size), data=data, settings=settings)
        return adapter_from_bytes(trainer.train(None, steps=3, learning_rate=1e-2, seed=5).delta_bytes)

    whole = run(8, CPU)
    halves = run(4, TrainSettings(device="cpu", precision="fp32", gradient_accumulation_steps=2))
    checkpointed = run(8, TrainSettings(device="cpu", precision="fp32", gradient_checkpointing=True))
    alone = run(4, CPU)
    for key, value in whole.items():
        assert torch.allclose(value, halves[key], atol=1e-5), key  # 2 x 4 examples = one step over 8
        assert torch.allclose(value, checkpointed[key], atol=1e-6), key
    assert any(not torch.allclose(whole[k], alone[k], atol=1e-4) for k in whole)  # 4 alone is another step


def test_a_deadline_ends_training_early_with_what_it_has(model_dirs: dict[str, Path]) -> None:
    trainer = LocalTrainer(_lm_task(model_dirs["llama"]), data=lm_data(model_dirs["llama"]), settings=CPU)
    seen: list[int] = []
    late = trainer.train(None, steps=10, learning_rate=1e-2, seed=0, deadline=time.time() - 1.0,
                         progress=lambda s, x: seen.append(s))
    assert seen == [1] and late.metrics["steps"] == 1 and late.metrics["stopped_early"] == 1
    ample = trainer.train(None, steps=3, learning_rate=1e-2, seed=0, deadline=time.time() + 3600)
    assert ample.metrics["steps"] == 3 and ample.metrics["stopped_early"] == 0


def test_builtin_data_on_a_model_dir_of_another_family(model_dirs: dict[str, Path]) -> None:
    """The config path `base_model_id = <dir>` with a built-in profile's data (fortunes): the tiny
    model's word-level tokenizer maps most words to <unk>, which is fine for a smoke run."""
    trainer = LocalTrainer(_lm_task(model_dirs["llama"]), 0, 2, partition_scheme="iid", settings=CPU)
    result = trainer.train(None, steps=1, learning_rate=1e-2, seed=0)
    assert set(adapter_from_bytes(result.delta_bytes)) == set(trainer.adapter_layout)
    assert math.isfinite(trainer.evaluate(result.delta_bytes)["perplexity"])


def test_bf16_autocast_on_cpu_keeps_fp32_adapters(model_dirs: dict[str, Path]) -> None:
    trainer = LocalTrainer(_lm_task(model_dirs["llama"]), data=lm_data(model_dirs["llama"]),
                           settings=TrainSettings(device="cpu", precision="bf16"))
    assert trainer.placement.precision == "bf16" and trainer.placement.autocast
    result = trainer.train(None, steps=2, learning_rate=1e-2, seed=0)
    state = adapter_from_bytes(result.delta_bytes)
    assert {v.dtype for v in state.values()} == {torch.float32}  # same layout as an fp32 node's
    assert math.isfinite(result.metrics["loss"]) and math.isfinite(trainer.evaluate(result.delta_bytes)["loss"])


def test_four_bit_without_cuda_is_a_config_error(model_dirs: dict[str, Path]) -> None:
    settings = TrainSettings(quantization="4bit", available=Available())
    with pytest.raises(ConfigError, match=r"learning\.quantization = \"4bit\".*needs a CUDA device"):
        LocalTrainer(_lm_task(model_dirs["llama"]), data=lm_data(model_dirs["llama"]), settings=settings)
    with pytest.raises(ConfigError, match=r"learning\.gradient_accumulation_steps"):
        TrainSettings(gradient_accumulation_steps=0)


def test_learning_keys_reach_the_local_trainer(model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from fednode.node.trainers import LearningTrainer

    seen: dict[str, object] = {}

    class Stub:  # stands in for LocalTrainer: records what LearningTrainer passes
        base_hash = "0" * 64

        def __init__(self, task: TaskSpec, *args: object, **kwargs: object) -> None:
            seen.update(kwargs, task=task)

    monkeypatch.setattr(trainer_module, "LocalTrainer", Stub)
    LearningTrainer(parse_config(
        f'[learning]\ntask = "smollm2-lm"\nbase_model_id = "{model_dirs["llama"]}"\ndevice = "cpu"\n'
        'precision = "bf16"\ngradient_accumulation_steps = 4\ngradient_checkpointing = true\n'
        'target_modules = ["all-linear"]\n'
    ))
    assert seen["settings"] == TrainSettings(device="cpu", precision="bf16", gradient_accumulation_steps=4,
                                             gradient_checkpointing=True)
    task = seen["task"]
    assert isinstance(task, TaskSpec) and task.target_modules == (ALL_LINEAR,)
    LearningTrainer(parse_config(f'[learning]\ntask = "smollm2-lm"\nbase_model_id = "{model_dirs["llama"]}"\n'))
    assert isinstance(seen["task"], TaskSpec) and seen["task"].target_modules == ()  # auto
    assert seen["settings"] == TrainSettings()  # device/precision auto, no quantization
    with pytest.raises(ConfigError, match=r"learning\.quantization"):
        parse_config('[learning]\nquantization = "8bit"\n')


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_own_text_data_trains_through_the_daemon_trainer(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from fednode.learning.local_data import task_identity
    from fednode.learning.model import base_model_hash
    from fednode.node.trainers import LearningTrainer

    _write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in _sentences(64, 7)])
    config = parse_config(
        f'[learning]\ntask = "smollm2-lm"\nbase_model_id = "{model_dirs["llama"]}"\ndevice = "cpu"\n'
        'precision = "fp32"\nbatch_size = 8\nmax_length = 16\n'
        '[data]\npath = "train.jsonl"\nformat = "text"\neval_fraction = 0.25\n', base_dir=tmp_path)
    trainer = LearningTrainer(config)
    assert trainer.task.kind == "causal_lm" and trainer.task.target_modules == ()
    file_hash = base_model_hash(model_dirs["llama"])
    identity = task_identity(config.data)
    assert trainer.base_model_hash == hashlib.sha256(f"{file_hash}\0{identity}".encode()).hexdigest() != file_hash
    before = trainer.evaluate(None)
    assert before["n"] == 16 and "perplexity" in before  # a quarter of the 64 rows held out
    out = trainer.train(None, round_number=1, steps=12, learning_rate=3e-2, seed=0)
    assert out.num_samples == 48 and out.metrics["steps"] == 12
    after = trainer.evaluate(out.delta_bytes)
    assert after["loss"] < before["loss"] and after["perplexity"] < before["perplexity"]


def test_own_classification_data_sizes_the_head_and_the_identity(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from fednode.node.trainers import LearningTrainer

    names = ["sport", "politics", "arts", "tech"]
    _write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": names[y]} for t, y in _topic_texts(64, 8)])
    toml = (f'[learning]\ntask = "smollm2-lm"\nbase_model_id = "{model_dirs["qwen3"]}"\ndevice = "cpu"\n'
            'batch_size = 8\nmax_length = 16\n[data]\npath = "train.jsonl"\nformat = "classification"\n')
    trainer = LearningTrainer(parse_config(toml + f"labels = {json.dumps(names)}\n", base_dir=tmp_path))
    assert trainer.task.kind == "seq_cls" and trainer.task.num_labels == 4
    heads = {k: v for k, v in trainer._trainer.adapter_layout.items() if k.startswith("base_model.model.score.")}
    assert [shape for shape, _ in heads.values()] == [(4, 32)]
    out = trainer.train(None, round_number=1, steps=12, learning_rate=2e-2, seed=0)
    scores = trainer.evaluate(out.delta_bytes)
    assert scores["n"] > 0 and 0.0 <= scores["accuracy"] <= 1.0 and "perplexity" not in scores
    # Another label list is another task: the hash every round manifest carries differs.
    other = LearningTrainer(parse_config(toml + f"labels = {json.dumps([*names, 'extra'])}\n", base_dir=tmp_path))
    assert other.base_model_hash != trainer.base_model_hash and other.task.num_labels == 5
