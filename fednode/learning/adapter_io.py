"""Adapter bytes (safetensors, never pickle) and PEFT adapter dirs on disk.

The adapter state is what `get_peft_model_state_dict` returns: LoRA factors plus any
`modules_to_save` tensors (e.g. a classifier head), keyed without the adapter name."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fednode.errors import InvalidUpdate
from fednode.learning.model import lora_config, resolve_model_dir
from fednode.learning.task import TaskSpec

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
FEDNODE_META_NAME = "fednode.json"
DEFAULT_MAX_ADAPTER_BYTES = 256 * 1024 * 1024


def adapter_to_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """Canonical safetensors bytes of an adapter state (contiguous CPU copies, no metadata)."""
    return st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()})


def adapter_from_bytes(data: bytes, *, max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes; anything else (pickle, garbage, oversize) is an InvalidUpdate."""
    if len(data) > max_bytes:
        raise InvalidUpdate(f"adapter is {len(data)} bytes, over the limit max_bytes={max_bytes}")
    try:
        return st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise InvalidUpdate(f"adapter bytes are not valid safetensors: {exc}") from None


def save_adapter_dir(
    adapter_bytes: bytes,
    directory: str | os.PathLike[str],
    task: TaskSpec,
    *,
    base_model_dir: str | os.PathLike[str] | None = None,
    base_hash: str | None = None,
) -> Path:
    """Write a PEFT adapter dir (adapter_config.json + adapter_model.safetensors, plus a small
    fednode.json naming the task and base hash). adapter_config.json records `task_type` and
    `base_model_name_or_path` (the absolute local model dir; `base_model_dir`, else the task's own,
    resolved), so plain `PeftModel.from_pretrained(base, dir)` and
    `AutoPeftModelForCausalLM.from_pretrained(dir)` load it with no other argument.
    Atomic: written to a temp dir beside the target, then renamed into place."""
    adapter_from_bytes(adapter_bytes)  # refuse to write something unloadable
    model_dir = Path(base_model_dir if base_model_dir is not None else resolve_model_dir(task))
    model_dir = model_dir.expanduser().resolve()
    target = Path(directory).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old: Path | None = None
    try:
        lora_config(task, model_dir).save_pretrained(str(tmp))
        _write_synced(tmp / ADAPTER_WEIGHTS_NAME, adapter_bytes)
        meta = {"task": task.name, "base_model_id": task.base_model_id, "base_model_sha256": base_hash}
        _write_synced(tmp / FEDNODE_META_NAME, json.dumps(meta, indent=2, sort_keys=True).encode())
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(old / "dir")
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            (old / "dir").rename(target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
