"""Bring your own training code: `[learning] trainer = "package.module:factory"`.

The daemon imports `package.module` (from `[learning] trainer_path` first, when set, then the usual
sys.path), calls `factory(config)` with the node's frozen `fednode.config.Config`, and uses the
object it returns for every round, as Flower's ClientApp uses the user's client. That object must
implement the `Trainer` protocol of fednode/node/trainers.py: the attributes `base_model_id` and
`base_model_hash` (strings), and the methods `train`, `evaluate`, `check_update` and `install`.

Each failure is a ConfigError naming the key: the module does not import, the factory is missing or
not callable, the object lacks a method or attribute. Results are checked too (`train` must return
a TrainOutput whose delta is bytes and whose num_samples is positive; `evaluate` a mapping of
numbers), so a mistake in user code reads as one, not as a crash deep in the round driver.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fednode.config import TRAINER_KEY, Config, split_trainer_spec
from fednode.errors import ConfigError
from fednode.node.trainers import ProgressCallback, Trainer, TrainOutput

TRAINER_PATH_KEY = "learning.trainer_path"
TRAINER_METHODS = ("train", "evaluate", "check_update", "install")
TRAINER_ATTRIBUTES = ("base_model_id", "base_model_hash")


def load_user_trainer(config: Config) -> Trainer:
    """Import and call the configured factory; check the object against the Trainer protocol."""
    spec = config.learning.trainer
    where = f"{config.source}: key '{TRAINER_KEY}' ({spec!r})"
    module_name, attr = split_trainer_spec(spec, where=config.source)
    factory = _import_factory(config, module_name, attr, where)
    try:
        obj = factory(config)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{where}: the factory raised {type(exc).__name__}: {exc}") from exc
    missing = [m for m in TRAINER_METHODS if not callable(getattr(obj, m, None))]
    if missing:
        raise ConfigError(f"{where}: the object the factory returned ({type(obj).__name__}) lacks the method(s) "
                          f"{', '.join(missing)} of the Trainer protocol (train, evaluate, check_update, install; "
                          "see fednode/node/trainers.py)")
    for name in TRAINER_ATTRIBUTES:
        value = getattr(obj, name, None)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: the object the factory returned ({type(obj).__name__}) needs a non-empty "
                              f"string attribute {name!r} (every node of a community must report equal ones), "
                              f"got {value!r}")
    return CheckedTrainer(obj, where)


def _import_factory(config: Config, module_name: str, attr: str, where: str) -> Any:
    folder = config.learning.trainer_path
    if folder:
        if not Path(folder).is_dir():
            raise ConfigError(f"{config.source}: key '{TRAINER_PATH_KEY}': {folder!r} is not a folder")
        if folder not in sys.path:
            sys.path.insert(0, folder)
    searched = f" (searched {TRAINER_PATH_KEY} = {folder!r}, then sys.path)" if folder else \
        f" (searched sys.path; set {TRAINER_PATH_KEY} to the folder that holds it)"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise ConfigError(f"{where}: no module named {exc.name!r}{searched}") from exc
        raise ConfigError(f"{where}: importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise ConfigError(f"{where}: importing {module_name!r} raised {type(exc).__name__}: {exc}") from exc
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ConfigError(f"{where}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                              f"attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ConfigError(f"{where}: {attr!r} in {module_name!r} is not callable; it must be a factory "
                          "taking the node's Config and returning a trainer")
    return factory


class CheckedTrainer:
    """The user's trainer, with its results checked at the boundary (errors name the key)."""

    def __init__(self, inner: Any, where: str) -> None:
        self.inner = inner
        self.where = where
        self.base_model_id: str = inner.base_model_id
        self.base_model_hash: str = inner.base_model_hash
        try:
            parameters = inspect.signature(inner.train).parameters
        except (TypeError, ValueError):  # a builtin or C callable: pass only the documented arguments
            parameters = {}  # type: ignore[assignment]
        # `deadline` is optional in the protocol: a trainer written without it keeps working.
        self._takes_deadline = "deadline" in parameters or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())

    def train(self, start_adapter: bytes | None, *, round_number: int, steps: int, learning_rate: float,
              seed: int, progress: ProgressCallback | None = None, deadline: float | None = None) -> TrainOutput:
        extra: dict[str, Any] = {"deadline": deadline} if self._takes_deadline else {}
        out = self.inner.train(start_adapter, round_number=round_number, steps=steps, learning_rate=learning_rate,
                               seed=seed, progress=progress, **extra)
        if not isinstance(out, TrainOutput):
            raise TypeError(f"{self.where}: train() returned {type(out).__name__}, expected "
                            "fednode.node.trainers.TrainOutput(delta_bytes, num_samples, metrics)")
        if not isinstance(out.delta_bytes, bytes | bytearray) or not out.delta_bytes:
            raise TypeError(f"{self.where}: train() returned delta_bytes of type {type(out.delta_bytes).__name__}; "
                            "expected non-empty safetensors bytes")
        if isinstance(out.num_samples, bool) or not isinstance(out.num_samples, int) or out.num_samples <= 0:
            raise TypeError(f"{self.where}: train() returned num_samples={out.num_samples!r}; expected an int > 0 "
                            "(it weighs this node's update in the average)")
        return TrainOutput(bytes(out.delta_bytes), out.num_samples, _numbers(self.where, "train() metrics",
                                                                             out.metrics))

    def evaluate(self, adapter: bytes | None) -> dict[str, float]:
        return _numbers(self.where, "evaluate()", self.inner.evaluate(adapter))

    def check_update(self, delta_bytes: bytes, *, max_norm: float) -> None:
        self.inner.check_update(delta_bytes, max_norm=max_norm)

    def install(self, adapter: bytes, directory: Path, *, lora_rank: int, lora_alpha: float) -> None:
        self.inner.install(adapter, directory, lora_rank=lora_rank, lora_alpha=lora_alpha)


def _numbers(where: str, what: str, value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{where}: {what} returned {type(value).__name__}, expected a dict of str -> number")
    out: dict[str, float] = {}
    for k, v in value.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int | float):
            raise TypeError(f"{where}: {what} returned {k!r}: {v!r}; expected str keys and number values")
        out[k] = float(v)
    return out
