"""A complete custom trainer for fednode, in plain torch: a LoRA adapter on a frozen linear classifier.

Use it from a node's config (paths relative to the config file):

    [learning]
    trainer = "my_trainer:make_trainer"
    trainer_path = "path/to/examples/custom_trainer"

`make_trainer(config)` gets the node's fednode Config and returns a `MyTrainer`, which implements
fednode's Trainer protocol (fednode/node/trainers.py): `base_model_id`, `base_model_hash`, `train`,
`evaluate`, `check_update`, `install`. The daemon does the rest (rounds, gossip, blob transfer,
aggregation); only the adapter tensors this file produces ever leave the node.

The model: logits = x @ (W0 + (alpha / r) * B @ A)^T, with W0 (labels x features) a frozen "base
model" every node derives from one seed, and the adapter A (r x features), B (labels x r) trained.
The tensor names follow PEFT's (`...lora_A.weight`, `...lora_B.weight`), so every aggregation rule
of fednode, "exact" included, applies.

The data: this node's private JSONL file, one example a line: {"x": [features...], "label": int}.
`[data] path` names it; when that is empty it is `my_data.jsonl` in the node's data dir, generated
on first use as a synthetic non-IID share for this node (node_index), so the example runs as is.
A fixed fraction is held out for `evaluate`. (A trainer reads any config key it likes: the factory
gets the whole Config.)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from fednode.aggregation.delta import AdapterLayout, dump_delta, load_delta, validate_update
from fednode.fsutil import atomic_replace_dir
from fednode.node.trainers import TrainOutput

FEATURES = 16
LABELS = 4
BASE_SEED = 20261201  # the "base model": equal on every node, so its hash is too
INIT_SEED = 7  # the fresh adapter's A: equal on every node
HELD_OUT_FRACTION = 0.25
SYNTHETIC_EXAMPLES = 240
PREFIX = "base_model.model.classifier"
KEY_A, KEY_B = f"{PREFIX}.lora_A.weight", f"{PREFIX}.lora_B.weight"


def base_weight() -> torch.Tensor:
    return torch.randn(LABELS, FEATURES, generator=torch.Generator().manual_seed(BASE_SEED))


def write_synthetic_share(path: Path, node_index: int) -> None:
    """A share no other node has: labels come from one shared rule (the base plus a low-rank shift
    the federation has to learn), features from a node-specific offset (non-IID)."""
    gen = torch.Generator().manual_seed(1000 + node_index)
    shift = torch.randn(LABELS, 2, generator=torch.Generator().manual_seed(99)) @ \
        torch.randn(2, FEATURES, generator=torch.Generator().manual_seed(98))
    truth = base_weight() + 3.0 * shift
    x = torch.randn(SYNTHETIC_EXAMPLES, FEATURES, generator=gen) + 0.5 * torch.randn(FEATURES, generator=gen)
    labels = (x @ truth.T).argmax(dim=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"x": [round(v, 5) for v in row.tolist()], "label": int(y)}) + "\n"
                           for row, y in zip(x, labels, strict=True)))
    tmp.replace(path)


def read_jsonl(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if len(row["x"]) != FEATURES or not 0 <= int(row["label"]) < LABELS:
            raise ValueError(f"{path}:{number}: expected {FEATURES} features and a label in 0..{LABELS - 1}")
        xs.append(row["x"])
        ys.append(int(row["label"]))
    if len(xs) < 4:
        raise ValueError(f"{path}: {len(xs)} examples; need at least 4")
    return torch.tensor(xs, dtype=torch.float32), torch.tensor(ys)


class MyTrainer:
    base_model_id = "my-linear-classifier-v1"

    def __init__(self, data_file: Path, *, rank: int, alpha: float, batch_size: int, seed: int) -> None:
        self.rank, self.scale, self.batch_size = rank, alpha / rank, batch_size
        self.w0 = base_weight()
        self.base_model_hash = hashlib.sha256(self.w0.numpy().tobytes()).hexdigest()
        x, y = read_jsonl(data_file)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        cut = max(1, int(len(x) * HELD_OUT_FRACTION))
        self.x_test, self.y_test = x[order[:cut]], y[order[:cut]]
        self.x_train, self.y_train = x[order[cut:]], y[order[cut:]]
        init = torch.Generator().manual_seed(INIT_SEED)
        self.fresh = {KEY_A: torch.randn(rank, FEATURES, generator=init) / FEATURES ** 0.5,
                      KEY_B: torch.zeros(LABELS, rank)}
        self.layout = AdapterLayout.from_tensors(self.fresh)

    def _adapter(self, data: bytes | None) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.fresh.items()} if data is None else dict(load_delta(data))

    def _logits(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return x @ (self.w0 + self.scale * b @ a).T

    def train(self, start_adapter: bytes | None, *, round_number: int, steps: int, learning_rate: float,
              seed: int, progress: Any = None) -> TrainOutput:
        state = self._adapter(start_adapter)
        a = state[KEY_A].clone().requires_grad_(True)
        b = state[KEY_B].clone().requires_grad_(True)
        opt = torch.optim.Adam([a, b], lr=learning_rate)
        gen = torch.Generator().manual_seed(seed * 7919 + round_number)
        losses = []
        for step in range(1, steps + 1):
            idx = torch.randint(len(self.x_train), (self.batch_size,), generator=gen)
            loss = torch.nn.functional.cross_entropy(self._logits(self.x_train[idx], a, b), self.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, losses[-1])
        delta = dump_delta({KEY_A: a.detach().contiguous(), KEY_B: b.detach().contiguous()})
        return TrainOutput(delta, len(self.x_train), {"loss": sum(losses) / len(losses)})

    @torch.no_grad()
    def evaluate(self, adapter: bytes | None) -> dict[str, float]:
        state = self._adapter(adapter)
        logits = self._logits(self.x_test, state[KEY_A], state[KEY_B])
        return {"loss": float(torch.nn.functional.cross_entropy(logits, self.y_test)),
                "accuracy": float((logits.argmax(1) == self.y_test).float().mean()), "n": float(len(self.y_test))}

    def check_update(self, delta_bytes: bytes, *, max_norm: float) -> None:
        validate_update(load_delta(delta_bytes), self.layout, max_norm=max_norm)  # raises InvalidUpdate

    def install(self, adapter: bytes, directory: Path, *, lora_rank: int, lora_alpha: float) -> None:
        directory.parent.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        (build / "adapter_model.safetensors").write_bytes(adapter)
        meta = {"base_model_id": self.base_model_id, "base_model_sha256": self.base_model_hash,
                "base_seed": BASE_SEED, "r": lora_rank, "lora_alpha": lora_alpha}
        (build / "my_trainer.json").write_text(json.dumps(meta, indent=2))
        atomic_replace_dir(build, directory)


def load_classifier(adapter_dir: str | os.PathLike[str]) -> torch.Tensor:
    """Using the result: the merged weight matrix W0 + (alpha / r) B A of an installed adapter dir
    (e.g. <data_dir>/adapters/latest); predict with (x @ W.T).argmax(1)."""
    folder = Path(adapter_dir)
    meta = json.loads((folder / "my_trainer.json").read_text())
    state = load_delta((folder / "adapter_model.safetensors").read_bytes())
    return base_weight() + meta["lora_alpha"] / meta["r"] * state[KEY_B] @ state[KEY_A]


def make_trainer(config: Any) -> MyTrainer:
    """The factory fednode calls with the node's Config."""
    data_file = Path(config.data.path) if config.data.path else config.data_dir / "my_data.jsonl"
    if not config.data.path and not data_file.exists():
        write_synthetic_share(data_file, config.learning.node_index)
    return MyTrainer(data_file, rank=config.round.lora_rank, alpha=config.round.lora_alpha,
                     batch_size=config.learning.batch_size, seed=config.learning.seed)
