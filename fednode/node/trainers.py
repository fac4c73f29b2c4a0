"""What the daemon needs from local training, and two implementations.

`LearningTrainer` wraps fednode.learning (a real model on real data); `FakeTrainer` is a fast,
deterministic stand-in with the same adapter shape conventions (lora_A / lora_B pairs plus a
plain head tensor), used by simulations with many nodes and by protocol tests. Training is
blocking CPU work: the daemon runs it in a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fednode.config import Config
from fednode.node.fake_task import FAKE_LAYOUT, FakeTrainer

__all__ = [
    "FAKE_LAYOUT",
    "FakeTrainer",
    "LearningTrainer",
    "ProgressCallback",
    "TrainOutput",
    "Trainer",
    "make_trainer",
]

ProgressCallback = Callable[[int, float], None]  # (step, loss)


@dataclass(frozen=True)
class TrainOutput:
    """What one round of local training hands the daemon.

    delta_bytes: the node's whole adapter state after training, as safetensors bytes (never pickle).
        The daemon stores and announces it as a blob; the coordinator averages the tensors of all
        accepted updates name by name (FedAvg: every tensor; "exact": `*.lora_A.weight` /
        `*.lora_B.weight` pairs are merged as products, other tensors averaged), so every node of a
        community must produce the same names, shapes and dtypes.
    num_samples: examples trained on (> 0): this update's weight in the average.
    metrics: numbers for the round record (e.g. "loss", the mean training loss)."""

    delta_bytes: bytes
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Trainer(Protocol):
    """The local-training side of a node: what the daemon calls, from a worker thread, and nothing more.

    fednode ships three: `LearningTrainer` (transformers + PEFT LoRA on the configured task and data),
    `FakeTrainer` (protocol tests) and, through `[learning] trainer = "package.module:factory"`, your
    own: `factory(config)` gets the node's `fednode.config.Config` and returns an object with these
    members (see fednode/node/user_trainer.py and examples/custom_trainer/). Calls never overlap.

    base_model_id / base_model_hash: name and sha256 of the frozen base this trainer adapts. A round
    manifest carries the coordinator's; a node whose hash differs refuses the round."""

    base_model_id: str
    base_model_hash: str

    def train(self, start_adapter: bytes | None, *, round_number: int, steps: int, learning_rate: float,
              seed: int, progress: ProgressCallback | None = None, deadline: float | None = None) -> TrainOutput:
        """Train `steps` local steps from `start_adapter` (the last round's merged adapter as
        safetensors bytes; None in round 1 = your fresh, seeded adapter, equal on every node) at
        peak `learning_rate`, on this node's own data. Call `progress(step, loss)` after each step
        if given. `deadline` (time.time()) lets a trainer stop early and submit what it has; a user
        trainer whose train() does not take it is called without it. Deterministic for equal inputs
        and `seed` is good practice, not required."""

    def evaluate(self, adapter: bytes | None) -> dict[str, float]:
        """Score `adapter` (None = the fresh adapter) on this node's held-out data: a dict of numbers
        that lands in the round record; "loss", "accuracy" and "n" (examples scored) are shown."""

    def check_update(self, delta_bytes: bytes, *, max_norm: float) -> None:
        """Raise fednode.errors.InvalidUpdate if another node's update does not fit this task's
        adapter layout (names, shapes, dtypes, finite values) or its L2 norm exceeds `max_norm`;
        the coordinator then REJECTs it. `fednode.aggregation.delta.validate_update` does this."""

    def install(self, adapter: bytes, directory: Path, *, lora_rank: int, lora_alpha: float) -> None:
        """Write `adapter` (a round's merged adapter) as a loadable folder at `directory`, atomically
        (build beside it, then rename: `fednode.fsutil.atomic_replace_dir`). The daemon points
        adapters/latest at it."""


class LearningTrainer:
    """The real thing: fednode.learning's LocalTrainer on the configured task and data share, on the
    device and in the precision `[learning]` asks for (auto: the best this machine has)."""

    def __init__(self, config: Config) -> None:
        from fednode.learning.schedule import LrSchedule
        from fednode.learning.task import get_task
        from fednode.learning.trainer import LocalTrainer, TrainSettings

        lc = config.learning
        overrides: dict[str, Any] = {"lora_rank": config.round.lora_rank, "lora_alpha": config.round.lora_alpha,
                                     "batch_size": lc.batch_size, "max_length": lc.max_length,
                                     "model_cache_dir": lc.model_cache_dir}
        if lc.base_model_id:
            overrides["base_model_id"] = lc.base_model_id
        if lc.target_modules:
            overrides["target_modules"] = tuple(lc.target_modules)
        self.task = get_task(lc.task, **overrides)
        data, salt = None, ""
        if config.data.path:
            self.task, data, salt = _with_local_data(self.task, config)
        settings = TrainSettings(device=lc.device, precision=lc.precision,
                                 gradient_accumulation_steps=lc.gradient_accumulation_steps,
                                 gradient_checkpointing=lc.gradient_checkpointing, quantization=lc.quantization)
        self._trainer = LocalTrainer(
            self.task, lc.node_index, lc.num_nodes, partition_scheme=lc.partition,  # type: ignore[arg-type]
            dirichlet_alpha=lc.dirichlet_alpha, partition_seed=lc.seed, torch_threads=lc.torch_threads,
            lr_schedule=LrSchedule(lc.lr_schedule, lc.lr_floor),  # type: ignore[arg-type]
            settings=settings, data=data, base_hash_salt=salt,
        )
        self.base_model_id = lc.base_model_id or lc.task
        self.base_model_hash = self._trainer.base_hash

    @property
    def placement(self) -> Any:
        """Where training runs (fednode.learning.accel.Placement)."""
        return self._trainer.placement

    def train(self, start_adapter: bytes | None, *, round_number: int, steps: int, learning_rate: float,
              seed: int, progress: ProgressCallback | None = None, deadline: float | None = None) -> TrainOutput:
        result = self._trainer.train(start_adapter, steps=steps, learning_rate=learning_rate,
                                     seed=seed + 1000 * round_number, progress=progress, deadline=deadline)
        return TrainOutput(result.delta_bytes, result.num_samples, dict(result.metrics))

    def evaluate(self, adapter: bytes | None) -> dict[str, float]:
        return dict(self._trainer.evaluate(adapter))

    def check_update(self, delta_bytes: bytes, *, max_norm: float) -> None:
        from fednode.aggregation.delta import AdapterLayout, load_delta, validate_update

        tensors = load_delta(delta_bytes)
        layout = AdapterLayout.from_tensors(self._initial_state())
        validate_update(tensors, layout, max_norm=max_norm)

    def _initial_state(self) -> dict[str, Any]:
        from fednode.aggregation.delta import load_delta

        return load_delta(self._trainer.initial_adapter_bytes())

    def install(self, adapter: bytes, directory: Path, *, lora_rank: int, lora_alpha: float) -> None:
        from fednode.learning.adapter_io import save_adapter_dir

        save_adapter_dir(adapter, directory, self.task, base_model_dir=self._trainer.model_dir,
                         base_hash=self.base_model_hash)


def _with_local_data(task: Any, config: Config) -> tuple[Any, Any, str]:
    """(the task shaped by the node's own data, that data, the task identity to mix into the base
    hash). The data decides the kind: a classification format gives a sequence classifier with one
    output per `[data] labels` entry; the other formats a causal LM."""
    from fednode.learning.local_data import load_local_data, task_identity
    from fednode.learning.model import load_tokenizer, resolve_model_dir

    tokenizer = load_tokenizer(resolve_model_dir(task))
    data = load_local_data(config.data, tokenizer, max_length=config.learning.max_length)
    if data.kind == "seq_cls":
        task = task.replace(kind="seq_cls", num_labels=len(data.labels), dataset="local")
    else:  # a profile's classifier head means nothing to a causal LM
        task = task.replace(kind="causal_lm", num_labels=0, modules_to_save=(), dataset="local")
    return task, data, task_identity(config.data)


def make_trainer(config: Config) -> Trainer:
    """The trainer the config asks for: `[learning] trainer` (your own) when set, else `task`'s."""
    if config.learning.trainer:
        from fednode.node.user_trainer import load_user_trainer

        return load_user_trainer(config)
    if config.learning.task == "fake":
        return FakeTrainer(config.learning.node_index, step_seconds=config.learning.fake_step_seconds)
    return LearningTrainer(config)
