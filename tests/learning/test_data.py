from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fednode.errors import ConfigError
from fednode.learning.data import load_bbc, load_fortunes, node_share, partition, train_test_split
from fednode.learning.task import get_task


def _assert_disjoint_cover(shares: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(shares)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))


def test_bbc_is_deterministic_and_labelled() -> None:
    ds = load_bbc()
    assert len(ds) == 2225
    assert ds.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert np.bincount(ds.labels).tolist() == [510, 386, 417, 511, 401]
    assert ds.texts[0].strip() and ds.labels[0] == 0


def test_fortunes_skip_offensive_files() -> None:
    ds = load_fortunes()
    assert len(ds) > 1000
    assert not any(name.endswith("-o") for name in ds.label_names)
    assert all(len(t) >= 20 for t in ds.texts[:200])


def test_split_is_fixed_and_stratified() -> None:
    labels = load_bbc().labels
    train, test = train_test_split(labels, 0.2, seed=0)
    again_train, again_test = train_test_split(labels, 0.2, seed=0)
    assert np.array_equal(test, again_test) and np.array_equal(train, again_train)
    assert not set(train) & set(test)
    assert len(train) + len(test) == len(labels)
    per_class = np.bincount(labels[test]) / np.bincount(labels)
    assert np.allclose(per_class, 0.2, atol=0.01)
    _, other_test = train_test_split(labels, 0.2, seed=1)
    assert not np.array_equal(test, other_test)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_disjoint_cover_seeded(scheme: str) -> None:
    labels = load_bbc().labels
    shares = partition(labels, 4, scheme, alpha=0.5, seed=3, min_samples=16)  # type: ignore[arg-type]
    _assert_disjoint_cover(shares, len(labels))
    assert min(len(s) for s in shares) >= 16
    again = partition(labels, 4, scheme, alpha=0.5, seed=3, min_samples=16)  # type: ignore[arg-type]
    assert all(np.array_equal(a, b) for a, b in zip(shares, again, strict=True))
    other = partition(labels, 4, scheme, alpha=0.5, seed=4, min_samples=16)  # type: ignore[arg-type]
    assert not all(np.array_equal(a, b) for a, b in zip(shares, other, strict=True))


def _label_skew(labels: np.ndarray, shares: list[np.ndarray]) -> float:
    """Mean total-variation distance between each node's label mix and the global mix."""
    k = int(labels.max()) + 1
    glob = np.bincount(labels, minlength=k) / len(labels)
    return float(np.mean([0.5 * np.abs(np.bincount(labels[s], minlength=k) / len(s) - glob).sum() for s in shares]))


def test_dirichlet_skews_labels_iid_does_not() -> None:
    labels = load_bbc().labels
    iid = _label_skew(labels, partition(labels, 4, "iid", seed=0))
    skewed = _label_skew(labels, partition(labels, 4, "dirichlet", alpha=0.5, seed=0))
    assert iid < 0.05
    assert skewed > 0.2


def test_node_shares_never_include_the_test_split() -> None:
    task = get_task()
    labels = load_bbc().labels
    got = [node_share(task, labels, i, 4, "dirichlet", 0.5, seed=0) for i in range(4)]
    test = got[0][1]
    assert all(np.array_equal(t, test) for _, t in got)
    trains = [s for s, _ in got]
    assert all(not set(s) & set(test) for s in trains)
    _assert_disjoint_cover([*trains, test], len(labels))


def test_partition_refuses_impossible_requests() -> None:
    labels = np.zeros(10, dtype=np.int64)
    with pytest.raises(ConfigError, match="cannot give"):
        partition(labels, 4, "iid", min_samples=3)
    with pytest.raises(ConfigError, match="scheme"):
        partition(labels, 2, "round-robin")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="alpha"):
        partition(labels, 2, "dirichlet", alpha=0.0)
    with pytest.raises(ConfigError, match="node_index"):
        node_share(get_task(), load_bbc().labels, 4, 4)


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=8, max_size=300),
    num_nodes=st.integers(1, 8),
    scheme=st.sampled_from(["iid", "dirichlet"]),
    alpha=st.floats(0.05, 10.0),
    seed=st.integers(0, 2**31),
)
def test_partition_property(labels: list[int], num_nodes: int, scheme: str, alpha: float, seed: int) -> None:
    arr = np.asarray(labels, dtype=np.int64)
    try:
        shares = partition(arr, num_nodes, scheme, alpha=alpha, seed=seed)  # type: ignore[arg-type]
    except ConfigError:
        assert scheme == "dirichlet" or len(arr) < num_nodes
        return
    assert len(shares) == num_nodes
    assert min(len(s) for s in shares) >= 1
    _assert_disjoint_cover(shares, len(arr))
