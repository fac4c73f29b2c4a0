"""Local LoRA training and held-out evaluation for one node.

A LocalTrainer holds its node's training examples (its share of a built-in data set, or its own
files through fednode.learning.local_data) and a process-wide cached PEFT model (loaded once per
(task, model dir, placement)); every train/evaluate call installs the adapter it is given first,
so trainers that share the cached model never see each other's state.

Why our own loop and not transformers' Trainer or TRL's SFTTrainer: a federated round is a few
optimizer steps that start from adapter *bytes* and must end in adapter bytes, report every step to
the daemon's status, stop before the round's deadline, and give identical bytes for an equal seed
on CPU (the crash-recovery and test story rely on it). Our loop does exactly that in ~100 lines
(seeded batch order, AdamW, clipping, the in-call LR schedule, gradient accumulation, autocast with
a gradient scaler for fp16). HF Trainer would own the data loader, RNG, optimizer state and
checkpointing per call and needs callbacks to stop on a deadline; TRL is not installed here and
adds chat templating we get from local_data. Padding-free collation (longest row per batch) and
-100 label masking follow the HF convention, so an example that trains with SFTTrainer trains here.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedTokenizerBase

from fednode.config import MAX_GRADIENT_ACCUMULATION_STEPS
from fednode.errors import ConfigError, InvalidUpdate
from fednode.learning.accel import Available, Placement, select_placement
from fednode.learning.adapter_io import adapter_from_bytes, adapter_to_bytes
from fednode.learning.batching import Batch, ExampleLike, TokenExample, batch_loss, collate
from fednode.learning.data import DEFAULT_DIRICHLET_ALPHA, PartitionScheme, load_dataset, node_share
from fednode.learning.model import (
    _quiet,
    base_model_hash,
    check_base_model,
    load_base_model,
    load_tokenizer,
    resolve_model_dir,
    resolve_target_modules,
    wrap_with_lora,
)
from fednode.learning.schedule import LrSchedule
from fednode.learning.task import TaskSpec

DEFAULT_TORCH_THREADS = 1  # several node processes share few cores
DEFAULT_MAX_GRAD_NORM = 1.0
DEFAULT_MAX_STEPS = 100_000
DEFAULT_GRADIENT_ACCUMULATION_STEPS = 1
# Before each step after the first: stop if (1 + this) steps' time would pass the deadline, leaving
# about one step's time to store and announce the update.
DEFAULT_DEADLINE_SLACK_STEPS = 1.0

ProgressCallback = Callable[[int, float], None]
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainSettings:
    """How (not what) a node trains: none of this changes the task's identity or adapter layout."""

    device: str = "auto"
    precision: str = "auto"
    gradient_accumulation_steps: int = DEFAULT_GRADIENT_ACCUMULATION_STEPS
    gradient_checkpointing: bool = False
    quantization: str = "none"
    available: Available | None = None  # None = probe this machine

    def __post_init__(self) -> None:
        if not 1 <= self.gradient_accumulation_steps <= MAX_GRADIENT_ACCUMULATION_STEPS:
            raise ConfigError(f"learning.gradient_accumulation_steps must be in 1..{MAX_GRADIENT_ACCUMULATION_STEPS}, "
                              f"got {self.gradient_accumulation_steps}")

    def placement(self) -> Placement:
        return select_placement(self.device, self.precision, self.quantization, self.available)


class ExampleSource(Protocol):
    """A node's own data (fednode.learning.local_data.LocalData has these fields)."""

    @property
    def train(self) -> Sequence[ExampleLike]: ...

    @property
    def eval(self) -> Sequence[ExampleLike]: ...


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
    initial_state: dict[str, torch.Tensor]  # on the CPU, fp32: the same on every node whatever its device
    placement: Placement
    pad_id: int
    # Trainers of one task share this model; a daemon may train/evaluate from worker threads.
    lock: threading.Lock = field(default_factory=threading.Lock)


_loaded: dict[tuple[TaskSpec, str, Placement, bool], _LoadedModel] = {}
_builtin_examples: dict[tuple[str, str, int, str], tuple[TokenExample, ...]] = {}


def _load(task: TaskSpec, placement: Placement, checkpointing: bool) -> _LoadedModel:
    model_dir = resolve_model_dir(task)
    key = (task, str(model_dir), placement, checkpointing)
    entry = _loaded.get(key)
    if entry is None:
        tok = load_tokenizer(model_dir)
        four_bit = HALF_DTYPES.get(placement.precision, torch.float32) if placement.quantization == "4bit" else None
        base = load_base_model(task, model_dir, quantize_4bit_compute=four_bit, pad_token_id=tok.pad_token_id)
        embeddings: torch.nn.Module = base.get_input_embeddings()
        pad_id = _usable_pad_id(tok, int(getattr(embeddings, "num_embeddings")))  # noqa: B009 (typed Module)
        if task.kind == "seq_cls":  # decoder classifiers find each row's last token by the pad id we pad with
            base.config.pad_token_id = pad_id
        if four_bit is not None:
            from peft import prepare_model_for_kbit_training

            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        if checkpointing:
            if not getattr(base, "supports_gradient_checkpointing", False):
                raise ConfigError(f"learning.gradient_checkpointing: {type(base).__name__} does not support it")
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = wrap_with_lora(task, base, model_dir)
        model.eval()
        initial = {k: v.detach().to("cpu", torch.float32).clone() for k, v in get_peft_model_state_dict(model).items()}
        _place(model, placement)
        entry = _LoadedModel(model, model_dir, base_model_hash(model_dir), initial, placement, pad_id)
        _loaded[key] = entry
    return entry


def _usable_pad_id(tok: PreTrainedTokenizerBase, vocab_rows: int) -> int:
    """The tokenizer's pad id if the embeddings have a row for it, else eos/unk/bos: a tokenizer
    class may add a pad token past the model's vocabulary, and padded positions are masked anyway."""
    for candidate in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id):
        if isinstance(candidate, int) and 0 <= candidate < vocab_rows:
            return candidate
    raise ConfigError(f"tokenizer {tok.name_or_path!r}: no pad/eos/unk/bos id below the model's {vocab_rows} rows")


def _place(model: PeftModel, placement: Placement) -> None:
    """Move a CPU-built model to its device; on an accelerator in half precision, store the frozen
    base weights in that dtype (half the memory). Trainable weights stay fp32."""
    if placement.quantization != "none" or placement.device == "cpu":
        return
    model.to(placement.device)
    half = HALF_DTYPES.get(placement.precision)
    if half is not None:
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(half)


def _tokenized_builtin(task: TaskSpec, model_dir: Path) -> tuple[TokenExample, ...]:
    """The task's whole built-in data set as examples, tokenized once per process."""
    key = (task.dataset, str(model_dir), task.max_len, task.kind)
    cached = _builtin_examples.get(key)
    if cached is None:
        tok = load_tokenizer(model_dir)
        data = load_dataset(task)
        with _quiet():
            enc = tok(list(data.texts), truncation=True, max_length=task.max_len)
        if task.kind == "seq_cls":
            pairs = zip(enc["input_ids"], data.labels, strict=True)
            cached = tuple(TokenExample(tuple(ids), (), int(y)) for ids, y in pairs)
        else:
            cached = tuple(TokenExample(tuple(ids), tuple(ids)) for ids in enc["input_ids"])
        _builtin_examples[key] = cached
    return cached


class LocalTrainer:
    """Trains this node's LoRA adapter on its share of the task's training split, or on `data`
    (its own examples, e.g. fednode.learning.local_data.LocalData) when given."""

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
        settings: TrainSettings | None = None,
        data: ExampleSource | None = None,
        base_hash_salt: str = "",
    ) -> None:
        if torch_threads < 1:
            raise ConfigError(f"torch_threads must be >= 1, got {torch_threads}")
        torch.set_num_threads(torch_threads)
        self.task = task
        self.node_index = node_index
        self.num_nodes = num_nodes
        self.max_steps = max_steps
        self.lr_schedule = LrSchedule() if lr_schedule is None else lr_schedule
        self.settings = TrainSettings() if settings is None else settings
        self.placement = self.settings.placement()
        self._entry = _load(task, self.placement, self.settings.gradient_checkpointing)
        self._salt = base_hash_salt
        if data is None:
            examples = _tokenized_builtin(task, self._entry.model_dir)
            labels = load_dataset(task).labels
            self.train_indices, self.test_indices = node_share(
                task, labels, node_index, num_nodes, partition_scheme, dirichlet_alpha, partition_seed
            )
            self.train_examples: Sequence[ExampleLike] = [examples[i] for i in self.train_indices]
            self.eval_examples: Sequence[ExampleLike] = [examples[i] for i in self.test_indices]
        else:
            self.train_examples, self.eval_examples = list(data.train), list(data.eval)
            self.train_indices = np.arange(len(self.train_examples))
            self.test_indices = np.arange(len(self.eval_examples))
        if not self.train_examples:
            raise ConfigError(f"task {task.name!r}: node {node_index} has no training examples")
        self._layout = {k: (tuple(v.shape), v.dtype) for k, v in self._entry.initial_state.items()}

    # -- identity ---------------------------------------------------------------------------
    @property
    def base_hash(self) -> str:
        """sha256 of the base model's weights; with a salt (the identity of a node's own data task:
        its kind and label set), the sha256 of both, so members of different tasks refuse each other."""
        if not self._salt:
            return self._entry.base_hash
        import hashlib

        return hashlib.sha256(f"{self._entry.base_hash}\0{self._salt}".encode()).hexdigest()

    @property
    def model_dir(self) -> Path:
        return self._entry.model_dir

    @property
    def model(self) -> PeftModel:
        return self._entry.model

    @property
    def target_modules(self) -> tuple[str, ...]:
        """The LoRA target modules in use (the automatic choice when the task names none)."""
        return resolve_target_modules(self.task, self._entry.model_dir)

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

    @property
    def pad_id(self) -> int:
        """The id batches are padded with (also the model config's pad_token_id for classifiers)."""
        return self._entry.pad_id

    def collate(self, examples: Sequence[ExampleLike]) -> Batch:
        return collate(examples, self.task.kind, self._entry.pad_id)

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
        deadline: float | None = None,
    ) -> TrainResult:
        """`steps` AdamW steps from `start_adapter` (None = the fresh adapter), each over
        gradient_accumulation_steps batches. `learning_rate` is the peak rate; `lr_schedule`
        (default: the trainer's, linear decay to 0.1x) shapes it over these steps. `deadline`
        (a time.time() value, e.g. the round's) ends training early, after at least one step, when
        the next step would not finish with a step's time to spare; metrics["steps"] says how many
        ran. Same inputs, same seed -> identical delta bytes (on CPU)."""
        if not 0 < steps <= self.max_steps:
            raise ConfigError(f"steps must be in 1..{self.max_steps} (max_steps), got {steps}")
        if not learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {learning_rate}")
        schedule = self.lr_schedule if lr_schedule is None else lr_schedule
        with self._entry.lock:
            return self._train_locked(start_adapter, steps, learning_rate, schedule, seed, progress, deadline)

    def _train_locked(
        self,
        start_adapter: bytes | None,
        steps: int,
        learning_rate: float,
        schedule: LrSchedule,
        seed: int,
        progress: ProgressCallback | None,
        deadline: float | None,
    ) -> TrainResult:
        model = self._entry.model
        self._install(start_adapter)
        torch.manual_seed(seed * 1_000_003 + self.node_index)
        rng = np.random.default_rng([seed, self.node_index, 0x7A1])
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
        scaler = torch.amp.GradScaler(self.placement.device) if self.placement.grad_scaler else None
        accumulate = self.settings.gradient_accumulation_steps
        batch_size = self.task.batch_size
        n_train = len(self.train_examples)
        order = np.empty(0, dtype=np.int64)
        losses: list[float] = []
        started = time.perf_counter()
        done = 0
        model.train()
        try:
            for step in range(steps):
                if deadline is not None and done and self._past_deadline(deadline, started, done):
                    break
                step_loss = 0.0
                for _ in range(accumulate):
                    if len(order) < batch_size:
                        order = np.concatenate([order, rng.permutation(n_train)])
                    picked, order = order[:batch_size], order[batch_size:]
                    with self._autocast():
                        loss = self._loss([self.train_examples[i] for i in picked])[0]
                    if accumulate > 1:
                        loss = loss / accumulate
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    step_loss += float(loss.detach())
                if scaler is not None:
                    scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, DEFAULT_MAX_GRAD_NORM)
                for group in opt.param_groups:
                    group["lr"] = learning_rate * schedule.factor(step, steps)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(step_loss)
                done += 1
                if progress is not None:
                    progress(step + 1, step_loss)
        finally:
            model.eval()
        seconds = time.perf_counter() - started
        delta = adapter_to_bytes(get_peft_model_state_dict(model))
        metrics = {
            "loss": float(np.mean(losses)),
            "final_loss": float(np.mean(losses[-max(1, done // 4) :])),
            "steps": float(done),
            "stopped_early": float(done < steps),
            "seconds": seconds,
            "seconds_per_step": seconds / done,
            "lr_last": learning_rate * schedule.factor(done - 1, steps),
        }
        return TrainResult(delta, n_train, metrics)

    @staticmethod
    def _past_deadline(deadline: float, started: float, done: int) -> bool:
        per_step = (time.perf_counter() - started) / done
        return time.time() + per_step * (1.0 + DEFAULT_DEADLINE_SLACK_STEPS) > deadline

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        half = HALF_DTYPES.get(self.placement.precision)
        if half is None:
            yield
            return
        with torch.autocast(device_type=self.placement.device, dtype=half):
            yield

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, adapter_bytes: bytes | None) -> dict[str, float]:
        """Held-out scores (None = the fresh adapter): classification accuracy and loss; for a
        causal LM, next-token accuracy, mean token cross-entropy and perplexity = exp(loss).
        n counts examples."""
        with self._entry.lock:
            return self._evaluate_locked(adapter_bytes)

    @torch.no_grad()
    def _evaluate_locked(self, adapter_bytes: bytes | None) -> dict[str, float]:
        self._install(adapter_bytes)
        self._entry.model.eval()
        examples = self.eval_examples[: self.task.max_eval_samples]
        if not examples:  # own data with nothing held out: no score rather than a made-up one
            return {"n": 0.0}
        loss_sum, correct, count = 0.0, 0, 0
        for start in range(0, len(examples), self.task.eval_batch_size):
            with self._autocast():
                loss, hits, units = self._loss(examples[start : start + self.task.eval_batch_size])
            loss_sum += float(loss) * units
            correct += hits
            count += units
        mean = loss_sum / max(count, 1)
        scores = {"accuracy": correct / max(count, 1), "loss": mean, "n": float(len(examples))}
        if self.task.kind == "causal_lm":
            scores["perplexity"] = math.exp(min(mean, 700.0))
        return scores

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

    def _loss(self, examples: Sequence[ExampleLike]) -> tuple[torch.Tensor, int, int]:
        """(mean loss, correct predictions, units counted) over `examples`."""
        batch = self.collate(examples).to(self.placement.device)
        kwargs = {"use_cache": False} if self.task.kind == "causal_lm" else {}
        out = self._entry.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
        return batch_loss(out.logits, batch, self.task.kind)
