"""What a node fine-tunes: the base model, the data set and the LoRA layout, as one frozen value.

Two built-in profiles exist ("minilm-bbc", the default, and "smollm2-lm"); any local Hugging Face
model dir works through `base_model_id` (a path): a causal LM for causal_lm tasks, any model
AutoModelForSequenceClassification can load for seq_cls ones. Empty `target_modules` means "choose
for this model" (fednode.learning.model.resolve_target_modules: PEFT's default for the architecture,
else every linear layer); a profile's own target modules name its own model's layers, so a
`base_model_id` override without `target_modules` switches to the automatic choice.
Pure: no torch/transformers import here."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fednode.errors import ConfigError

TaskKind = Literal["seq_cls", "causal_lm"]

BUILTIN_MINILM = "builtin:minilm-l6"
BUILTIN_SMOLLM2 = "builtin:smollm2-135m"
DATASET_BBC = "bbc"
DATASET_FORTUNES = "fortunes"
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer except the output head

DEFAULT_PROFILE = "minilm-bbc"
DEFAULT_MODEL_CACHE_DIR = "~/.cache/fednode/models"
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_SPLIT_SEED = 0
DEFAULT_INIT_SEED = 0
DEFAULT_MIN_SAMPLES_PER_NODE = 16
DEFAULT_MAX_EVAL_SAMPLES = 4096
DEFAULT_EVAL_BATCH_SIZE = 64


@dataclass(frozen=True)
class TaskSpec:
    """A fine-tuning task. Every node of a community must hold an equal TaskSpec (and base hash)."""

    name: str
    kind: TaskKind
    base_model_id: str  # a builtin id (BUILTIN_*) or a path to a local HF model dir / .gguf file
    dataset: str  # DATASET_BBC, DATASET_FORTUNES
    num_labels: int = 0  # seq_cls only
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")  # () = chosen for the model (see module doc)
    modules_to_save: tuple[str, ...] = ()
    max_len: int = 64
    batch_size: int = 16
    eval_batch_size: int = DEFAULT_EVAL_BATCH_SIZE
    max_eval_samples: int = DEFAULT_MAX_EVAL_SAMPLES
    test_fraction: float = DEFAULT_TEST_FRACTION
    split_seed: int = DEFAULT_SPLIT_SEED
    init_seed: int = DEFAULT_INIT_SEED  # seeds the fresh head/LoRA init: equal on every node
    min_samples_per_node: int = DEFAULT_MIN_SAMPLES_PER_NODE
    model_cache_dir: str = DEFAULT_MODEL_CACHE_DIR
    default_local_steps: int = 20
    default_learning_rate: float = 2e-3
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in ("seq_cls", "causal_lm"):
            raise ConfigError(f"task {self.name!r}: kind must be seq_cls or causal_lm, got {self.kind!r}")
        if self.kind == "seq_cls" and self.num_labels < 2:
            raise ConfigError(f"task {self.name!r}: seq_cls needs num_labels >= 2")
        positive = ("lora_r", "lora_alpha", "max_len", "batch_size", "eval_batch_size", "max_eval_samples")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"task {self.name!r}: {key} must be > 0, got {getattr(self, key)!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"task {self.name!r}: test_fraction must be in (0, 1)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"task {self.name!r}: lora_dropout must be in [0, 1)")
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise ConfigError(f"task {self.name!r}: target_modules {ALL_LINEAR!r} cannot be mixed with module names")

    def replace(self, **changes: Any) -> TaskSpec:
        return dataclasses.replace(self, **changes)


PROFILES: dict[str, TaskSpec] = {
    "minilm-bbc": TaskSpec(
        name="minilm-bbc",
        kind="seq_cls",
        base_model_id=BUILTIN_MINILM,
        dataset=DATASET_BBC,
        num_labels=5,
        target_modules=("query", "value"),
        modules_to_save=("classifier",),
        max_len=64,
        batch_size=16,
        default_local_steps=10,
        default_learning_rate=2e-3,
    ),
    "smollm2-lm": TaskSpec(
        name="smollm2-lm",
        kind="causal_lm",
        base_model_id=BUILTIN_SMOLLM2,
        dataset=DATASET_FORTUNES,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        max_len=64,
        batch_size=4,
        eval_batch_size=16,
        max_eval_samples=128,
        default_local_steps=4,
        default_learning_rate=5e-4,
    ),
}

_TUPLE_FIELDS = ("target_modules", "modules_to_save")
# Spellings used by fednode.config's [learning]/[round] sections -> TaskSpec field names.
KEY_ALIASES = {"task": "profile", "max_length": "max_len", "lora_rank": "lora_r"}


def get_task(profile: str = DEFAULT_PROFILE, **overrides: Any) -> TaskSpec:
    """A built-in profile, with `overrides` applied (e.g. base_model_id=a local path)."""
    try:
        base = PROFILES[profile]
    except KeyError:
        raise ConfigError(f"unknown learning profile {profile!r}; known: {sorted(PROFILES)}") from None
    return task_from_mapping({"profile": profile, **overrides}) if overrides else base


def task_from_mapping(table: Mapping[str, Any]) -> TaskSpec:
    """Build a TaskSpec from a TOML `[learning]` table: `profile` picks the base, other keys override
    TaskSpec fields of the same name (config spellings task/max_length/lora_rank are accepted, and
    an empty base_model_id means the profile's own model). Other keys (trainer settings such as torch_threads or
    partition) are kept in `extra` for the caller; they do not change the task's identity."""
    table = {KEY_ALIASES.get(k, k): v for k, v in table.items()}
    if table.get("base_model_id") == "":
        del table["base_model_id"]  # empty = the profile's embedded model
    profile = str(table.get("profile", DEFAULT_PROFILE))
    if profile not in PROFILES:
        raise ConfigError(f"[learning] profile: unknown {profile!r}; known: {sorted(PROFILES)}")
    own_model = table.get("base_model_id", PROFILES[profile].base_model_id) == PROFILES[profile].base_model_id
    if not own_model and "target_modules" not in table:
        table["target_modules"] = ()  # the profile's module names are its own model's
    names = {f.name for f in dataclasses.fields(TaskSpec)} - {"extra"}
    changes: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in table.items():
        if key == "profile":
            continue
        if key in names:
            changes[key] = tuple(value) if key in _TUPLE_FIELDS else value
        else:
            extra[key] = value
    try:
        return dataclasses.replace(PROFILES[profile], extra=extra, **changes)
    except TypeError as exc:
        raise ConfigError(f"[learning]: {exc}") from None
