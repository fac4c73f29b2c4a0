from __future__ import annotations

import pytest

from fednode.learning import LocalTrainer, TaskSpec, get_task
from fednode.learning.trainer import TrainSettings

CPU = TrainSettings(device="cpu", precision="fp32")  # bit-exact results are asserted: pin the CPU


@pytest.fixture(scope="session")
def tiny_task() -> TaskSpec:
    """The default task, shrunk so a training step costs ~0.1 s on one core."""
    return get_task("minilm-bbc", batch_size=4, max_len=32, eval_batch_size=32, max_eval_samples=32)


@pytest.fixture(scope="session")
def trainer(tiny_task: TaskSpec) -> LocalTrainer:
    return LocalTrainer(tiny_task, node_index=0, num_nodes=2, partition_scheme="iid", settings=CPU)


@pytest.fixture(scope="session")
def trainer_b(tiny_task: TaskSpec, trainer: LocalTrainer) -> LocalTrainer:
    # Shares the process-wide cached model with `trainer`.
    return LocalTrainer(tiny_task, node_index=1, num_nodes=2, partition_scheme="iid", settings=CPU)
