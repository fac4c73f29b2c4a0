"""Local LoRA fine-tuning: tasks, data partitions, training, evaluation and adapter dirs.

The only package of fednode that imports transformers/peft. Importing it sets HF_HUB_OFFLINE=1."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from fednode.learning.adapter_io import (
    adapter_from_bytes,
    adapter_to_bytes,
    save_adapter_dir,
)
from fednode.learning.data import load_bbc, load_dataset, load_fortunes, partition, train_test_split
from fednode.learning.model import (
    base_model_hash,
    check_base_model,
    load_adapter_dir,
    load_base_model,
    resolve_model_dir,
)
from fednode.learning.schedule import LrSchedule
from fednode.learning.task import PROFILES, TaskSpec, get_task, task_from_mapping
from fednode.learning.trainer import LocalTrainer, TrainResult, TrainSettings

__all__ = [
    "PROFILES",
    "LocalTrainer",
    "LrSchedule",
    "TaskSpec",
    "TrainResult",
    "TrainSettings",
    "adapter_from_bytes",
    "adapter_to_bytes",
    "base_model_hash",
    "check_base_model",
    "get_task",
    "load_adapter_dir",
    "load_base_model",
    "load_bbc",
    "load_dataset",
    "load_fortunes",
    "partition",
    "resolve_model_dir",
    "save_adapter_dir",
    "task_from_mapping",
    "train_test_split",
]
