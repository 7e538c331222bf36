"""Weak labels against SciPy's connected components, on random and adversarial inputs."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from wcl.graph import components_of_functional_graph, weak_label_stats, weak_labels


def scipy_partition(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Component of each node, named by its smallest member, via SciPy."""
    graph = coo_matrix((np.ones(len(src)), (src, dst)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    smallest = {c: np.flatnonzero(comp == c).min() for c in np.unique(comp)}
    return np.array([smallest[c] for c in comp])


def reference_labels(p: np.ndarray, k: int = 1) -> np.ndarray:
    """Symmetric kNN graph written out in float64 NumPy (ties -> lower index), then SciPy."""
    n = len(p)
    sim = p @ p.T
    np.fill_diagonal(sim, -np.inf)
    # Stable sort of -sim keeps the lower index first among equal similarities.
    neighbours = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return scipy_partition(n, np.repeat(np.arange(n), k), neighbours.reshape(-1))


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 64).flatmap(lambda n: st.lists(st.integers(0, n - 1), min_size=n, max_size=n))
)
def test_functional_graph_components_match_scipy(nxt):
    """Any successor array: long cycles, self-loops, chains, stars."""
    n = len(nxt)
    got = components_of_functional_graph(torch.tensor(nxt)).numpy()
    np.testing.assert_array_equal(got, scipy_partition(n, np.arange(n), np.array(nxt)))


def test_functional_graph_one_long_cycle_and_long_tail():
    n = 1000
    cycle = torch.roll(torch.arange(n), -1)  # 0 -> 1 -> ... -> 999 -> 0
    assert (components_of_functional_graph(cycle) == 0).all()
    chain = torch.arange(n) - 1  # i -> i-1, a tail of length 999 into the self-loop at 0
    chain[0] = 0
    assert (components_of_functional_graph(chain) == 0).all()
    # Two separate cycles: 0 -> 1 -> ... -> 499 -> 0 and 500 -> ... -> 999 -> 500.
    two = torch.cat(
        [torch.arange(1, 500), torch.tensor([0]), torch.arange(501, 1000), torch.tensor([500])]
    )
    expected = torch.cat([torch.zeros(500), torch.full((500,), 500)]).long()
    assert torch.equal(components_of_functional_graph(two), expected)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(2, 80),
    d=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    integer=st.booleans(),
)
def test_weak_labels_match_scipy_random(n, d, seed, integer):
    """Continuous rows, and small-integer rows whose many exact ties test the tie rule."""
    rng = np.random.default_rng(seed)
    p = rng.integers(-2, 3, size=(n, d)).astype(np.float64) if integer else rng.normal(size=(n, d))
    got = weak_labels(torch.from_numpy(p)).numpy()
    np.testing.assert_array_equal(got, reference_labels(p))


@pytest.mark.parametrize(
    "p",
    [
        np.ones((2, 3)),  # N = 2
        np.ones((17, 4)),  # all rows identical
        np.zeros((9, 4)),  # all similarities zero
        np.repeat(np.eye(4), 3, axis=0),  # duplicated rows, four clusters
        np.concatenate([np.eye(5), -np.eye(5)]),  # antipodal pairs
        np.eye(6),  # orthogonal rows: every similarity ties at 0
    ],
    ids=["n2", "identical", "zeros", "duplicates", "antipodal", "orthogonal"],
)
def test_weak_labels_adversarial(p):
    np.testing.assert_array_equal(weak_labels(torch.from_numpy(p)).numpy(), reference_labels(p))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_weak_labels_k_neighbours(k):
    rng = np.random.default_rng(k)
    for n in (k + 1, 30, 200):
        p = rng.normal(size=(n, 8))
        got = weak_labels(torch.from_numpy(p), k=k).numpy()
        np.testing.assert_array_equal(got, reference_labels(p, k))


def test_every_component_has_two_members_and_float32_normalised_rows():
    p = torch.nn.functional.normalize(torch.randn(512, 32), dim=1)
    labels = weak_labels(p)
    sizes = torch.bincount(labels)
    assert sizes[sizes > 0].min() >= 2
    np.testing.assert_array_equal(labels.numpy(), reference_labels(p.double().numpy()))


def test_k1_has_no_value_dependent_host_code():
    """On the meta device every data-dependent host access (.item, .tolist, bool(tensor))
    raises; k=1 must run there, while k>1 (documented to sync) cannot."""
    p = torch.empty(256, 16, device="meta")
    assert weak_labels(p).shape == (256,)
    with pytest.raises(NotImplementedError):
        weak_labels(p, k=2)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="at least 2"):
        weak_labels(torch.randn(1, 3))
    with pytest.raises(ValueError, match="k must be"):
        weak_labels(torch.randn(4, 3), k=4)


def test_weak_label_stats_against_counting():
    rng = np.random.default_rng(0)
    labels = torch.tensor([0, 0, 2, 2, 2, 5, 5, 5, 5, 0])
    targets = torch.from_numpy(rng.integers(0, 3, size=10))
    targets[3] = -1  # unknown class: its pairs are not counted
    stats = weak_label_stats(labels, targets)
    assert stats["components"].item() == 3
    assert stats["component_size"].item() == pytest.approx(10 / 3)
    agree = total = 0
    for i in range(10):
        for j in range(10):
            if i != j and labels[i] == labels[j] and targets[i] >= 0 and targets[j] >= 0:
                total += 1
                agree += int(targets[i] == targets[j])
    assert stats["precision"].item() == pytest.approx(agree / total)
