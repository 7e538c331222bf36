"""Weak labels: connected components of the nearest-neighbour graph of a batch.

WCL joins every sample to its nearest neighbour (by dot product of the ``phi`` head's
features) and takes the connected components of that undirected graph as weak labels.
For k=1 the graph is a *functional graph* (one outgoing edge per node): every weakly
connected component holds exactly one cycle, so a component can be named by its cycle.
Pointer jumping finds each node's cycle in ceil(log2 N) rounds of gathers, with no data-
dependent control flow, so the whole labelling runs on the device with no host round trip.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "nearest_neighbours",
    "nearest_candidates",
    "row_argmax",
    "components_of_functional_graph",
    "weak_labels",
    "weak_label_stats",
    "neighbour_precision",
]


# At most this many similarities (64 MiB in float32) exist at once in nearest_neighbours.
SIMILARITY_BLOCK_ELEMENTS = 1 << 24


def nearest_neighbours(p: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Indices of the k most similar other rows of ``p`` (N, d) by dot product: (N, k).

    Ties go to the lower index (``argmax``/``topk`` on the same row order), which makes
    the result deterministic; self is never chosen.
    """
    n = p.shape[0]
    if n < 2:
        raise ValueError(f"weak labels need at least 2 rows, got {n}")
    # No symmetrisation pass: the components are found for any successor array, so a
    # matmul that rounds the two triangles differently cannot break the labelling.
    return nearest_candidates(p, p, torch.arange(n, device=p.device), k)


def nearest_candidates(
    anchors: torch.Tensor, candidates: torch.Tensor, own: torch.Tensor, k: int
) -> torch.Tensor:
    """The k rows of ``candidates`` (N, d) most similar to each of ``anchors`` (a, d) by
    dot product, never the anchor's ``own`` row (a,): (a, k) long, no gradient.

    Row blocks bound the similarity buffer (1 GiB in one piece at a = N = 16384).
    """
    n = candidates.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N-1] = [1, {n - 1}], got k={k}")
    block = max(1, SIMILARITY_BLOCK_ELEMENTS // n)
    found = []
    with torch.no_grad():
        for start in range(0, len(anchors), block):
            rows = slice(start, start + block)
            sim = anchors[rows].detach() @ candidates.detach().T
            # A fill kernel, not a Python float: no host-to-device copy on CUDA.
            minus_inf = torch.full((), float("-inf"), dtype=sim.dtype, device=sim.device)
            sim.index_put_((torch.arange(len(sim), device=sim.device), own[rows]), minus_inf)
            found.append(
                sim.topk(k, dim=1, sorted=True).indices if k > 1 else row_argmax(sim)[:, None]
            )
    return torch.cat(found)


def row_argmax(sim: torch.Tensor) -> torch.Tensor:
    """Column of each row's first maximum of ``sim`` (N, M): (N,) long, on ``sim``'s device."""
    if sim.device.type == "cpu":
        # torch's CPU argmax over rows is 5-10x slower than NumPy's (bench/weak_labels.py);
        # both return the first maximum, so ties resolve the same way.
        exact = sim if sim.dtype in (torch.float32, torch.float64) else sim.float()
        return torch.from_numpy(exact.detach().numpy().argmax(axis=1))
    return sim.argmax(dim=1)


def components_of_functional_graph(
    nxt: torch.Tensor, early_exit: bool | None = None
) -> torch.Tensor:
    """Component ids of the undirected graph with edges {i, nxt[i]}.

    ``nxt`` (N,) long, any values in [0, N). Returns (N,) long: for each node the smallest
    node index of its connected component. O(N log N) work; without ``early_exit`` no
    host synchronisation, so it can run inside a captured or asynchronous GPU step.

    ``early_exit`` (default: on for CPU tensors, where checking costs no device sync)
    first tries a shortcut for nearest-neighbour graphs, whose cycles are mutual pairs:
    it stops pointer jumping as soon as every node reaches a root, typically after 2-3
    rounds instead of ceil(log2 N); any other graph falls through to the general search.
    """
    if early_exit if early_exit is not None else nxt.device.type == "cpu":
        named = _components_if_only_pairs_cycle(nxt.cpu().numpy())
        if named is not None:
            return torch.from_numpy(named).to(nxt.device)
    n = nxt.shape[0]
    idx = torch.arange(n, device=nxt.device)
    jump = nxt.clone()
    # Invariant after r rounds: jump[i] = f^(2^r)(i), low[i] = min of i, f(i), ..., f^(2^r - 1)(i).
    low = idx.clone()
    for _ in range(max(1, math.ceil(math.log2(n)))):
        low = torch.minimum(low, low[jump])
        jump = jump[jump]
    # After 2^R >= N steps every walk has entered its component's only cycle, and a walk
    # of length >= N from a cycle node visits the whole cycle: low[jump[i]] is the
    # smallest index on i's cycle, a name shared by exactly the nodes of i's component.
    cycle_name = low[jump]
    smallest = torch.full((n,), n, dtype=torch.long, device=nxt.device)
    smallest = smallest.scatter_reduce(0, cycle_name, idx, reduce="amin")
    return smallest[cycle_name]


def _components_if_only_pairs_cycle(nxt: np.ndarray) -> np.ndarray | None:
    """Components (smallest member) of ``nxt`` (N,) if every cycle is a self-loop or a
    mutual pair, else None. On the host in NumPy: at N = 256 torch's per-op overhead would
    be most of the cost.

    Cutting each mutual pair at its smaller node turns such a graph into a forest; pointer
    jumping then reaches every root in ceil(log2 depth) rounds.
    """
    n = nxt.shape[0]
    idx = np.arange(n)
    parent0 = np.where((nxt[nxt] == idx) & (idx <= nxt), idx, nxt)
    parent = parent0
    for _ in range(max(1, math.ceil(math.log2(n))) + 1):
        # Done when every pointer lands on a true root; a node on a longer cycle never does
        # (even where jumping makes it a fixed point, as on a 4-cycle).
        if np.array_equal(parent0[parent], parent):
            smallest = np.full(n, n, dtype=nxt.dtype)
            np.minimum.at(smallest, parent, idx)
            return smallest[parent]
        parent = parent[parent]
    return None


def _components_by_propagation(edges_from: torch.Tensor, edges_to: torch.Tensor, n: int):
    """Component ids (smallest member index) of an undirected edge list, on the device.

    Min-label propagation with pointer jumping; loops until nothing changes, which needs
    one host synchronisation per round (used for k > 1 only).
    """
    labels = torch.arange(n, device=edges_from.device)
    src = torch.cat([edges_from, edges_to])
    dst = torch.cat([edges_to, edges_from])
    while True:
        proposal = labels.scatter_reduce(0, dst, labels[src], reduce="amin")
        # Hook each old root onto the smallest label seen by any of its members.
        proposal = proposal.scatter_reduce(0, labels, proposal, reduce="amin")
        proposal = proposal[proposal]
        while True:
            jumped = proposal[proposal]
            if torch.equal(jumped, proposal):
                break
            proposal = jumped
        if torch.equal(proposal, labels):
            return labels
        labels = proposal


def weak_labels(p: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Weak labels of the rows of ``p`` (N, d): connected components of the symmetric kNN graph.

    Each row is joined to its k most similar other rows (dot product; pass L2-normalised
    rows for cosine similarity); edges are undirected. Returns (N,) long where each row
    holds the smallest row index of its component. Runs on ``p``'s device; for k=1 on an
    accelerator it never synchronises with the host. Gradients do not flow (labels are discrete).
    """
    with torch.no_grad():
        nn_idx = nearest_neighbours(p.detach(), k)
        if k == 1:
            return components_of_functional_graph(nn_idx[:, 0])
        n = p.shape[0]
        rows = torch.arange(n, device=p.device).repeat_interleave(k)
        return _components_by_propagation(rows, nn_idx.reshape(-1), n)


def weak_label_stats(
    labels: torch.Tensor, targets: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Statistics of weak labels (N,) as 0-d float tensors, without host synchronisation.

    ``components``: number of components; ``component_size``: mean members per component;
    with true ``targets`` (N,) (negative = unknown): ``precision``, the fraction of weak
    positive pairs (i != j, same component, both labelled) whose true classes agree.
    """
    n = labels.shape[0]
    idx = torch.arange(n, device=labels.device)
    components = (labels == idx).sum().float()  # one root (smallest member) per component
    stats = {"components": components, "component_size": n / components}
    if targets is not None:
        targets = targets.to(labels.device).long()
        known = targets >= 0
        # Unlabelled rows get keys of their own (negative, distinct), so they pair with nothing.
        alone = -1 - idx
        pairs = _pairs_with_equal_key(torch.where(known, labels, alone))
        agree = _pairs_with_equal_key(torch.where(known, labels * 2**32 + targets, alone))
        stats["precision"] = agree.float() / pairs.clamp(min=1).float()
    return stats


def neighbour_precision(
    neighbours: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Fraction of (row, neighbour) pairs, both with a known class (targets >= 0), whose
    true classes agree: 0-d float, no host synchronisation. ``neighbours`` (a, k) and
    ``rows`` (a,) index ``targets`` (N,)."""
    targets = targets.to(neighbours.device).long()
    mine = targets[rows][:, None].expand_as(neighbours)
    theirs = targets[neighbours]
    known = (mine >= 0) & (theirs >= 0)
    agree = (known & (mine == theirs)).sum()
    return agree.float() / known.sum().clamp(min=1).float()


def _pairs_with_equal_key(keys: torch.Tensor) -> torch.Tensor:
    """Number of ordered pairs (i != j) with keys[i] == keys[j], keys (N,) long: 0-d long.

    Sort and binary search give each row the size m of its key's group, and a group adds
    m (m - 1) pairs; O(N log N) memory-light work in place of an N x N comparison.
    """
    ordered = keys.sort().values
    group_size = torch.searchsorted(ordered, ordered, right=True) - torch.searchsorted(
        ordered, ordered
    )
    return (group_size - 1).sum()
