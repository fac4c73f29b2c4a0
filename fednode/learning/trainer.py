"""Local LoRA training and held-out evaluation for one node.

A LocalTrainer holds its node's share of the training split and a process-wide cached PEFT model
(loaded once per (task, model dir)); every train/evaluate call installs the adapter it is given
first, so trainers that share the cached model never see each other's state."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from fednode.errors import ConfigError, InvalidUpdate
from fednode.learning.adapter_io import adapter_from_bytes, adapter_to_bytes
from fednode.learning.data import DEFAULT_DIRICHLET_ALPHA, PartitionScheme, load_dataset, node_share
from fednode.learning.model import (
    _quiet,
    base_model_hash,
    check_base_model,
    load_base_model,
    load_tokenizer,
    resolve_model_dir,
    wrap_with_lora,
)
from fednode.learning.schedule import LrSchedule
from fednode.learning.task import TaskSpec

DEFAULT_TORCH_THREADS = 1  # several node processes share few cores
DEFAULT_MAX_GRAD_NORM = 1.0
DEFAULT_MAX_STEPS = 100_000

ProgressCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class TrainResult:
    delta_bytes: bytes  # safetensors of the full adapter state (LoRA factors + saved modules)
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _LoadedModel:
    model: PeftModel
    model_dir: Path
    base_hash: str
    initial_state: dict[str, torch.Tensor]
    input_ids: torch.Tensor  # the whole data set, tokenized once per process
    attention_mask: torch.Tensor
    # Trainers of one task share this model; a daemon may train/evaluate from worker threads.
    lock: threading.Lock = field(default_factory=threading.Lock)


_loaded: dict[tuple[TaskSpec, str], _LoadedModel] = {}


def _load(task: TaskSpec) -> _LoadedModel:
    model_dir = resolve_model_dir(task)
    key = (task, str(model_dir))
    entry = _loaded.get(key)
    if entry is None:
        model = wrap_with_lora(task, load_base_model(task, model_dir), model_dir)
        model.eval()
        tok = load_tokenizer(model_dir)
        texts = list(load_dataset(task).texts)
        with _quiet():
            enc = tok(texts, truncation=True, max_length=task.max_len, padding="max_length", return_tensors="pt")
        initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        entry = _LoadedModel(
            model, model_dir, base_model_hash(model_dir), initial, enc["input_ids"], enc["attention_mask"]
        )
        _loaded[key] = entry
    return entry


class LocalTrainer:
    """Trains this node's LoRA adapter on its share of the task's training split."""

    def __init__(
        self,
        task: TaskSpec,
        node_index: int = 0,
        num_nodes: int = 1,
        *,
        partition_scheme: PartitionScheme = "iid",
        dirichlet_alpha: float = DEFAULT_DIRICHLET_ALPHA,
        partition_seed: int = 0,
        torch_threads: int = DEFAULT_TORCH_THREADS,
        max_steps: int = DEFAULT_MAX_STEPS,
        lr_schedule: LrSchedule | None = None,
    ) -> None:
        if torch_threads < 1:
            raise ConfigError(f"torch_threads must be >= 1, got {torch_threads}")
        torch.set_num_threads(torch_threads)
        self.task = task
        self.node_index = node_index
        self.num_nodes = num_nodes
        self.max_steps = max_steps
        self.lr_schedule = LrSchedule() if lr_schedule is None else lr_schedule
        self._entry = _load(task)
        labels = load_dataset(task).labels
        self.train_indices, self.test_indices = node_share(
            task, labels, node_index, num_nodes, partition_scheme, dirichlet_alpha, partition_seed
        )
        self._labels = torch.from_numpy(labels)
        self._layout = {k: (tuple(v.shape), v.dtype) for k, v in self._entry.initial_state.items()}

    # -- identity ---------------------------------------------------------------------------
    @property
    def base_hash(self) -> str:
        return self._entry.base_hash

    @property
    def model_dir(self) -> Path:
        return self._entry.model_dir

    @property
    def adapter_layout(self) -> Mapping[str, tuple[tuple[int, ...], torch.dtype]]:
        """Adapter tensor names -> (shape, dtype): what every update of this task must match."""
        return dict(self._layout)

    def check_base(self, expected_hash: str) -> None:
        """Refuse a round for another base model (BaseModelMismatch names both hashes)."""
        check_base_model(expected_hash, self.base_hash)

    def initial_adapter_bytes(self) -> bytes:
        """The fresh adapter (seeded by task.init_seed): equal on every node of the task."""
        return adapter_to_bytes(self._entry.initial_state)

    # -- training ---------------------------------------------------------------------------
    def train(
        self,
        start_adapter: bytes | None,
        *,
        steps: int,
        learning_rate: float,
        seed: int,
        progress: ProgressCallback | None = None,
        lr_schedule: LrSchedule | None = None,
    ) -> TrainResult:
        """`steps` AdamW steps from `start_adapter` (None = the fresh adapter). `learning_rate` is the
        peak rate; `lr_schedule` (default: the trainer's, linear decay to 0.1x) shapes it over these
        steps. Same inputs, same seed -> identical delta bytes."""
        if not 0 < steps <= self.max_steps:
            raise ConfigError(f"steps must be in 1..{self.max_steps} (max_steps), got {steps}")
        if not learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {learning_rate}")
        schedule = self.lr_schedule if lr_schedule is None else lr_schedule
        with self._entry.lock:
            return self._train_locked(start_adapter, steps, learning_rate, schedule, seed, progress)

    def _train_locked(
        self,
        start_adapter: bytes | None,
        steps: int,
        learning_rate: float,
        schedule: LrSchedule,
        seed: int,
        progress: ProgressCallback | None,
    ) -> TrainResult:
        model = self._entry.model
        self._install(start_adapter)
        torch.manual_seed(seed * 1_000_003 + self.node_index)
        rng = np.random.default_rng([seed, self.node_index, 0x7A1])
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
        order = np.empty(0, dtype=np.int64)
        losses: list[float] = []
        started = time.perf_counter()
        model.train()
        try:
            for step in range(steps):
                if len(order) < self.task.batch_size:
                    order = np.concatenate([order, rng.permutation(self.train_indices)])
                batch, order = order[: self.task.batch_size], order[self.task.batch_size :]
                loss = self._loss(torch.from_numpy(batch))[0]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, DEFAULT_MAX_GRAD_NORM)
                for group in opt.param_groups:
                    group["lr"] = learning_rate * schedule.factor(step, steps)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress(step + 1, losses[-1])
        finally:
            model.eval()
        seconds = time.perf_counter() - started
        delta = adapter_to_bytes(get_peft_model_state_dict(model))
        metrics = {
            "loss": float(np.mean(losses)),
            "final_loss": float(np.mean(losses[-max(1, steps // 4) :])),
            "steps": float(steps),
            "seconds": seconds,
            "seconds_per_step": seconds / steps,
            "lr_last": learning_rate * schedule.factor(steps - 1, steps),
        }
        return TrainResult(delta, len(self.train_indices), metrics)

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, adapter_bytes: bytes | None) -> dict[str, float]:
        """Held-out accuracy and loss (None = the fresh adapter). For a causal LM: next-token
        accuracy and mean token cross-entropy; n counts samples (texts)."""
        with self._entry.lock:
            return self._evaluate_locked(adapter_bytes)

    @torch.no_grad()
    def _evaluate_locked(self, adapter_bytes: bytes | None) -> dict[str, float]:
        self._install(adapter_bytes)
        model = self._entry.model
        model.eval()
        idx = torch.from_numpy(self.test_indices[: self.task.max_eval_samples])
        loss_sum, correct, count = 0.0, 0, 0
        for start in range(0, len(idx), self.task.eval_batch_size):
            loss, hits, units = self._loss(idx[start : start + self.task.eval_batch_size])
            loss_sum += float(loss) * units
            correct += hits
            count += units
        return {"accuracy": correct / max(count, 1), "loss": loss_sum / max(count, 1), "n": float(len(idx))}

    # -- internals --------------------------------------------------------------------------
    def _install(self, adapter_bytes: bytes | None) -> None:
        state = self._entry.initial_state if adapter_bytes is None else adapter_from_bytes(adapter_bytes)
        self.check_layout(state)
        with _quiet():
            set_peft_model_state_dict(self._entry.model, state)

    def check_layout(self, state: Mapping[str, torch.Tensor]) -> None:
        """Keys, shapes and dtypes equal this task's adapter layout, else InvalidUpdate."""
        if set(state) != set(self._layout):
            missing = sorted(set(self._layout) - set(state))[:3]
            extra = sorted(set(state) - set(self._layout))[:3]
            raise InvalidUpdate(f"adapter keys differ from the task's: missing {missing}, unexpected {extra}")
        for k, v in state.items():
            shape, dtype = self._layout[k]
            if tuple(v.shape) != shape or v.dtype != dtype:
                raise InvalidUpdate(f"adapter tensor {k}: {tuple(v.shape)} {v.dtype}, expected {shape} {dtype}")

    def _loss(self, idx: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(mean loss, correct predictions, units counted) for the samples `idx`."""
        mask = self._entry.attention_mask[idx]
        width = max(int(mask.sum(dim=1).max()), 2)  # trim padding shared by the whole batch
        ids, mask = self._entry.input_ids[idx, :width], mask[:, :width]
        out = self._entry.model(input_ids=ids, attention_mask=mask)
        logits = out.logits
        if self.task.kind == "seq_cls":
            labels = self._labels[idx]
            loss = torch.nn.functional.cross_entropy(logits, labels)
            return loss, int((logits.argmax(-1) == labels).sum()), len(idx)
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        loss = torch.nn.functional.cross_entropy(flat, target.reshape(-1), ignore_index=-100)
        valid = target != -100
        hits = int(((logits[:, :-1].argmax(-1) == target) & valid).sum())
        return loss, hits, int(valid.sum())
