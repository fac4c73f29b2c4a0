"""Evaluate an adapter folder with nothing but plain PEFT, in its own process.

    python -m fednode.learning.verify --task minilm-bbc --adapter runs/.../adapters/latest
    python -m fednode.learning.verify --task minilm-bbc --fresh

With --adapter the base model is loaded with transformers and the folder with
`PeftModel.from_pretrained(base, dir)` (no fednode code touches the weights), then scored on the
task's fixed held-out split. --fresh scores the base model with a fresh adapter (the baseline a
federation must beat). Prints one JSON object: accuracy, loss, n.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def evaluate_adapter_dir(task_name: str, adapter_dir: str | None) -> dict[str, float]:
    import torch
    from peft import PeftModel

    from fednode.learning.data import load_dataset, node_share
    from fednode.learning.model import load_base_model, load_tokenizer, resolve_model_dir
    from fednode.learning.task import get_task
    from fednode.learning.trainer import LocalTrainer

    task = get_task(task_name)
    if adapter_dir is None:
        return dict(LocalTrainer(task).evaluate(None))
    model_dir = resolve_model_dir(task)
    model = PeftModel.from_pretrained(load_base_model(task, model_dir), adapter_dir)
    model.eval()
    tok = load_tokenizer(model_dir)
    data = load_dataset(task)
    _, test_idx = node_share(task, data.labels, 0, 1)
    idx = test_idx[: task.max_eval_samples]
    correct, loss_sum, count = 0, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(idx), task.eval_batch_size):
            batch = idx[start : start + task.eval_batch_size]
            enc = tok(
                [data.texts[i] for i in batch],
                truncation=True,
                max_length=task.max_len,
                padding=True,
                return_tensors="pt",
            )
            logits = model(**enc).logits
            if task.kind == "seq_cls":
                labels = torch.as_tensor(data.labels[batch])
                loss_sum += float(torch.nn.functional.cross_entropy(logits, labels)) * len(batch)
                correct += int((logits.argmax(-1) == labels).sum())
                count += len(batch)
            else:
                ids, mask = enc["input_ids"], enc["attention_mask"]
                target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                flat = logits[:, :-1].reshape(-1, logits.shape[-1])
                valid = target != -100
                units = int(valid.sum())
                loss_sum += (
                    float(torch.nn.functional.cross_entropy(flat, target.reshape(-1), ignore_index=-100)) * units
                )
                correct += int(((logits[:, :-1].argmax(-1) == target) & valid).sum())
                count += units
    return {"accuracy": correct / max(count, 1), "loss": loss_sum / max(count, 1), "n": float(len(idx))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fednode.learning.verify",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", default="minilm-bbc", help="task profile (default: %(default)s)")
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("--adapter", help="PEFT adapter folder to score")
    g.add_argument("--fresh", action="store_true", help="score the base model with a fresh adapter")
    args = parser.parse_args(argv)
    print(json.dumps(evaluate_adapter_dir(args.task, None if args.fresh else args.adapter), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
