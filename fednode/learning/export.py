"""A round's merged adapter as a plain model: the base with the LoRA weights merged in
(`merge_and_unload`) and its tokenizer, written so `AutoModelForCausalLM.from_pretrained(OUT)`
(or `AutoModelForSequenceClassification` for a classifier task) loads it with no fednode and no
PEFT. The adapter dir names its own base (adapter_config.json `base_model_name_or_path`, which
`save_adapter_dir` always records), so the export needs nothing but the adapter dir."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from fednode.errors import ConfigError
from fednode.learning.adapter_io import ADAPTER_CONFIG_NAME, FEDNODE_META_NAME
from fednode.learning.model import _quiet

EXPORTABLE_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")


def read_adapter_config(adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(adapter_dir) / ADAPTER_CONFIG_NAME
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the adapter config: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not JSON: {exc}") from None
    return config


def _num_labels(adapter_dir: Path) -> int:
    """A classifier's label count, from the task named in fednode.json."""
    from fednode.learning.task import get_task

    meta_path = adapter_dir / FEDNODE_META_NAME
    try:
        task_name = json.loads(meta_path.read_text())["task"]
    except (OSError, json.JSONDecodeError, KeyError):
        raise ConfigError(f"{meta_path}: a SEQ_CLS adapter needs fednode.json naming its task (for num_labels)") \
            from None
    return get_task(task_name).num_labels


def load_merged(adapter_dir: str | os.PathLike[str]) -> PreTrainedModel:
    """The base model named by the adapter dir, with the adapter merged in (fp32, eval mode)."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    where = adapter_dir / ADAPTER_CONFIG_NAME
    base = config.get("base_model_name_or_path")
    task_type = config.get("task_type")
    if not base:
        raise ConfigError(f"{where}: no base_model_name_or_path; this adapter dir does not say which model it "
                          "adapts (written by an older fednode, or by a custom trainer)")
    if not (Path(base) / "config.json").is_file():
        raise ConfigError(f"{where}: base_model_name_or_path {base!r} is not a local model dir on this machine")
    if task_type not in EXPORTABLE_TASK_TYPES:
        raise ConfigError(f"{where}: task_type {task_type!r}; export knows {', '.join(EXPORTABLE_TASK_TYPES)}")
    with _quiet():
        if task_type == "CAUSAL_LM":
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=_num_labels(adapter_dir), dtype=torch.float32)
        _drop_gguf_marker(model)
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.eval()
    return merged


def _drop_gguf_marker(model: PreTrainedModel) -> None:
    """A model dir converted from GGUF (the embedded SmolLM2) holds dequantized fp32 weights but its
    config.json still carries the GGUF quantization_config, which makes save_pretrained refuse
    ("quantized with gguf and is not serializable"). The weights are plain: drop the marker."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and getattr(method, "value", method) == "gguf":
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")


def export_merged(adapter_dir: str | os.PathLike[str], out: str | os.PathLike[str], *,
                  overwrite: bool = False) -> Path:
    """Write the merged model and its tokenizer to `out` (atomically: a temp dir beside it, renamed).
    Refuses an existing non-empty `out` unless `overwrite`."""
    target = Path(out).expanduser().resolve()
    occupied = target.is_file() or (target.is_dir() and any(target.iterdir()))
    if occupied and not overwrite:
        raise ConfigError(f"{target} exists and is not empty; refusing to overwrite it (use --force)")
    merged = load_merged(adapter_dir)
    base = read_adapter_config(adapter_dir)["base_model_name_or_path"]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with _quiet():
            merged.save_pretrained(tmp, safe_serialization=True)
            AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
