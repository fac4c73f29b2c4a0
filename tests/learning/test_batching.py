"""Collation and loss over tokenized examples: padding never carries loss, -100 labels are skipped,
and a causal LM's labels are shifted inside the loss (HF convention)."""

from __future__ import annotations

import math

import torch

from fednode.learning.batching import IGNORE_INDEX, TokenExample, batch_loss, collate


def test_causal_batches_pad_right_and_mask_padding_and_prompts() -> None:
    prompt_masked = TokenExample((5, 6, 7, 8), (IGNORE_INDEX, IGNORE_INDEX, 7, 8))
    plain = TokenExample((9, 10))  # no labels given = every token is a target
    batch = collate([prompt_masked, plain], "causal_lm", pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.targets.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, 8], [9, 10, IGNORE_INDEX, IGNORE_INDEX]]

    vocab = 12
    logits = torch.zeros(2, 4, vocab)
    logits[0, 1, 7] = logits[0, 2, 8] = logits[1, 0, 10] = 5.0  # position t predicts the target at t + 1
    loss, hits, units = batch_loss(logits, batch, "causal_lm")
    assert (hits, units) == (3, 3)  # 7 and 8 in row 0, 10 in row 1; prompt and padding never count
    expected = -math.log(math.exp(5.0) / (math.exp(5.0) + vocab - 1))
    assert math.isclose(float(loss), expected, rel_tol=1e-6)


def test_classification_batches_carry_the_class_ids() -> None:
    batch = collate([TokenExample((1, 2, 3), (), 2), TokenExample((4,), (), 0)], "seq_cls", pad_id=9)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 9, 9]] and batch.targets.tolist() == [2, 0]
    logits = torch.tensor([[0.0, 0.0, 3.0], [0.0, 3.0, 0.0]])
    loss, hits, units = batch_loss(logits, batch, "seq_cls")
    assert (hits, units) == (1, 2) and float(loss) > 0


def test_a_batch_with_no_target_token_has_zero_loss_not_nan() -> None:
    batch = collate([TokenExample((1, 2), (IGNORE_INDEX, IGNORE_INDEX))], "causal_lm", pad_id=0)
    logits = torch.randn(1, 2, 4, requires_grad=True)
    loss, hits, units = batch_loss(logits, batch, "causal_lm")
    assert float(loss.detach()) == 0.0 and (hits, units) == (0, 0)
    loss.backward()  # still differentiable: a step over such a batch changes nothing
    assert logits.grad is not None and not logits.grad.any()
