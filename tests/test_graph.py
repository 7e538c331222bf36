"""Weak labels against SciPy's connected components, on random and adversarial inputs."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from wcl import graph
from wcl.graph import (
    _components_if_only_pairs_cycle,
    components_of_functional_graph,
    nearest_neighbours,
    neighbour_precision,
    weak_label_stats,
    weak_labels,
)


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
    st.integers(1, 64).flatmap(lambda n: st.lists(st.integers(0, n - 1), min_size=n, max_size=n)),
    st.booleans(),
)
def test_functional_graph_components_match_scipy(nxt, early_exit):
    """Any successor array: long cycles, self-loops, chains, stars; both search paths."""
    n = len(nxt)
    got = components_of_functional_graph(torch.tensor(nxt), early_exit=early_exit).numpy()
    np.testing.assert_array_equal(got, scipy_partition(n, np.arange(n), np.array(nxt)))


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 200), st.integers(0, 2**31 - 1), st.integers(0, 3))
def test_functional_graph_pairs_forest_and_one_long_cycle(n, seed, cycle_len):
    """Random forests hanging off mutual pairs (the early exit's case), plus optionally one
    3- to 4-cycle (a 4-cycle becomes a fixed point of pointer jumping) that must fall
    through to the general search."""
    rng = np.random.default_rng(seed)
    nxt = np.arange(n)
    order = rng.permutation(n)
    for pos, node in enumerate(order):
        if pos == 1:
            nxt[order[0]], nxt[node] = node, order[0]  # the first mutual pair
        elif pos > 1:
            nxt[node] = order[rng.integers(0, pos)]  # hang onto an earlier node
    has_ring = cycle_len >= 3 and n >= cycle_len + 2
    if has_ring:
        ring = order[-cycle_len:]
        nxt[ring] = np.roll(ring, -1)
    shortcut = _components_if_only_pairs_cycle(nxt)
    assert (shortcut is None) == has_ring  # the shortcut takes exactly the pairs-only graphs
    for early_exit in (True, False):
        got = components_of_functional_graph(torch.from_numpy(nxt), early_exit=early_exit)
        np.testing.assert_array_equal(got.numpy(), scipy_partition(n, np.arange(n), nxt))


@pytest.mark.parametrize("early_exit", [True, False])
def test_functional_graph_one_long_cycle_and_long_tail(early_exit):
    n = 1000

    def components(nxt):
        return components_of_functional_graph(nxt, early_exit=early_exit)

    cycle = torch.roll(torch.arange(n), -1)  # 0 -> 1 -> ... -> 999 -> 0
    assert (components(cycle) == 0).all()
    chain = torch.arange(n) - 1  # i -> i-1, a tail of length 999 into the self-loop at 0
    chain[0] = 0
    assert (components(chain) == 0).all()
    # Two separate cycles: 0 -> 1 -> ... -> 499 -> 0 and 500 -> ... -> 999 -> 500.
    two = torch.cat(
        [torch.arange(1, 500), torch.tensor([0]), torch.arange(501, 1000), torch.tensor([500])]
    )
    expected = torch.cat([torch.zeros(500), torch.full((500,), 500)]).long()
    assert torch.equal(components(two), expected)
    # Four 4-cycles side by side: after two rounds of jumping each node points at itself.
    rings = (torch.arange(16) // 4) * 4 + (torch.arange(16) + 1) % 4
    assert torch.equal(components(rings), (torch.arange(16) // 4) * 4)


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


@pytest.mark.parametrize("rows_per_block", [1, 7, 64])
@pytest.mark.parametrize("k", [1, 3])
def test_nearest_neighbours_in_row_blocks(monkeypatch, rows_per_block, k):
    """Similarities taken a few rows at a time (the self entry then sits off the block's
    main diagonal) give the same labels as the float64 reference."""
    rng = np.random.default_rng(rows_per_block + k)
    p = rng.normal(size=(61, 5))
    monkeypatch.setattr(graph, "SIMILARITY_BLOCK_ELEMENTS", rows_per_block * 61)
    np.testing.assert_array_equal(
        weak_labels(torch.from_numpy(p), k).numpy(), reference_labels(p, k)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_nearest_neighbour_matches_torch_argmax(dtype):
    """The CPU path (NumPy argmax) picks what torch's argmax picks, ties included."""
    rng = np.random.default_rng(1)
    for p in (rng.normal(size=(300, 8)), rng.integers(-1, 2, size=(300, 3)).astype(float)):
        x = torch.from_numpy(p).to(dtype)
        sim = (x @ x.T).fill_diagonal_(float("-inf"))
        assert torch.equal(nearest_neighbours(x)[:, 0], sim.float().argmax(dim=1))


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
    assert stats["precision"].item() == pytest.approx(counted_precision(labels, targets))


def counted_precision(labels: torch.Tensor, targets: torch.Tensor) -> float:
    """Weak-pair precision by looping over every ordered pair."""
    agree = total = 0
    for i in range(len(labels)):
        for j in range(len(labels)):
            if i != j and labels[i] == labels[j] and targets[i] >= 0 and targets[j] >= 0:
                total += 1
                agree += int(targets[i] == targets[j])
    return agree / max(total, 1)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 40), st.integers(0, 2**31 - 1))
def test_weak_label_stats_precision_random(n, seed):
    """Random partitions and classes (large class ids, unknowns) against pair counting."""
    rng = np.random.default_rng(seed)
    labels = components_of_functional_graph(torch.from_numpy(rng.integers(0, n, size=n)))
    targets = torch.from_numpy(rng.choice([-1, 0, 3, 2**31 - 1], size=n))
    got = weak_label_stats(labels, targets)["precision"].item()
    assert got == pytest.approx(counted_precision(labels, targets))


def test_neighbour_precision_against_counting():
    """Pairs (row, neighbour) with both classes known, counted by hand."""
    targets = torch.tensor([0, 0, 1, -1, 1, 2])
    rows = torch.tensor([0, 2, 3, 5])
    neighbours = torch.tensor([[1, 2], [4, 3], [0, 1], [5, 0]])
    # row 0 (class 0): 1 agrees, 2 not; row 2 (class 1): 4 agrees, 3 unknown; row 3:
    # unknown, both pairs dropped; row 5 (class 2): 5 agrees, 0 not -> 3 of 5.
    assert neighbour_precision(neighbours, rows, targets).item() == pytest.approx(3 / 5)
    none_known = neighbour_precision(neighbours[2:3], rows[2:3], targets)
    assert none_known.item() == 0.0
