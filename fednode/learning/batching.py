"""Tokenized examples -> padded batches -> loss, for both task kinds.

An example is token ids with per-token loss labels (causal LM; -100 = no loss at that position,
labels aligned with input_ids, the shift happens here) or one class id (`label`, classification).
Built-in data sets and a node's own files (fednode.learning.local_data) both arrive in this form,
so one collate and one loss serve every model and every data source."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from fednode.learning.task import TaskKind

IGNORE_INDEX = -100
MIN_BATCH_WIDTH = 2  # a causal LM needs >= 2 positions to predict one token


class ExampleLike(Protocol):
    @property
    def input_ids(self) -> tuple[int, ...]: ...

    @property
    def labels(self) -> tuple[int, ...]: ...

    @property
    def label(self) -> int: ...


@dataclass(frozen=True)
class TokenExample:
    """The built-in data sets' examples (same fields as local_data.Example)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...] = ()
    label: int = -1


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (n, width) int64, right-padded with the pad id
    attention_mask: torch.Tensor  # (n, width) int64
    targets: torch.Tensor  # causal: (n, width) labels, -100 padded; seq_cls: (n,) class ids

    def to(self, device: torch.device | str) -> Batch:
        if str(device) == "cpu":
            return self
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.targets.to(device))


def collate(examples: Sequence[ExampleLike], kind: TaskKind, pad_id: int) -> Batch:
    """Right-pad to the longest example of the batch (>= MIN_BATCH_WIDTH)."""
    if not examples:
        raise ValueError("collate: empty batch")
    width = max(MIN_BATCH_WIDTH, *(len(e.input_ids) for e in examples))
    n = len(examples)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for row, ex in enumerate(examples):
        ids[row, : len(ex.input_ids)] = torch.tensor(ex.input_ids, dtype=torch.long)
        mask[row, : len(ex.input_ids)] = 1
    if kind == "seq_cls":
        targets = torch.tensor([e.label for e in examples], dtype=torch.long)
    else:
        targets = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        for row, ex in enumerate(examples):
            labels = ex.labels if ex.labels else ex.input_ids
            targets[row, : len(labels)] = torch.tensor(labels, dtype=torch.long)
    return Batch(ids, mask, targets)


def batch_loss(logits: torch.Tensor, batch: Batch, kind: TaskKind) -> tuple[torch.Tensor, int, int]:
    """(mean loss, correct predictions, units counted): classification counts examples, a causal
    LM counts the target tokens (next-token accuracy). Loss is computed in fp32."""
    logits = logits.float()
    if kind == "seq_cls":
        labels = batch.targets
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return loss, int((logits.argmax(-1) == labels).sum()), len(labels)
    target = batch.targets[:, 1:]
    shifted = logits[:, :-1]
    valid = target != IGNORE_INDEX
    if not bool(valid.any()):  # every position masked (e.g. prompts cut at max_length): no signal
        return shifted.sum() * 0.0, 0, 0
    loss = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX
    )
    hits = int(((shifted.argmax(-1) == target) & valid).sum())
    return loss, hits, int(valid.sum())
