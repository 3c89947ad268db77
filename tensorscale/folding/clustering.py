"""Assign units to clusters: exact copies first, then balanced k-means for everything else.

Features arrive as one row per unit (already sketched to a few hundred dimensions). A HyperCloned model's
copies have identical rows up to float rounding, so they are found exactly and `down` inverts `up`
bit for bit where the dtype allows. An ordinary model has no copies: then units are grouped by k-means
(k-means++ seeding, a fixed seed), which merges the units whose weights are most alike.
"""

from __future__ import annotations

import torch

from ..errors import CannotFold, TensorscaleError

# How close two units' sketches must be (relative to the typical sketch norm) to count as copies. Copies
# differ only by rounding: ~1e-7 in float32, but a noisy bf16 `up` rounds each block to 8 bits.
DUPLICATE_TOLERANCE = {"F64": 1e-4, "F32": 1e-4, "F16": 5e-3, "BF16": 3e-2}
KMEANS_ITERATIONS = 25
KMEANS_SETTLED = 0.01  # stop once fewer than this share of units change cluster in an iteration
PREFILTER_DIMS = 32  # sketch coordinates the duplicate search looks at before measuring candidates fully
# Bytes of one block of a units-by-units (or units-by-centres) matrix. Blocks are sized in bytes, not rows,
# so memory does not grow with the space: a 7B model's FFN (11008 units) took 68 MB per block of 2048 rows,
# and `down` clusters two spaces at once.
BLOCK_BYTES = 2**22


def _block_rows(columns: int, bytes_per_entry: int) -> int:
    return max(1, BLOCK_BYTES // (bytes_per_entry * max(1, columns)))


def duplicate_groups(features: torch.Tensor, relative_tolerance: float = 1e-4) -> list[int]:
    """Group id per row: rows within the tolerance of each other share one (union-find)."""
    n = features.shape[0]
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    norms = features.norm(dim=1)
    scale = float(norms.median()) if n else 0.0
    tolerance = relative_tolerance * max(scale, 1e-30)
    # The matrix-product form of the distance loses ~sqrt(eps) of the norm to cancellation, so it only
    # proposes candidates (within that error of the tolerance); each candidate is then measured directly.
    # Its error grows with the larger norm of the pair, so bound it by the largest norm.
    proposal = tolerance + 1e-3 * max(float(norms.max()) if n else 0.0, 1e-30)
    # A distance over the first few coordinates is never larger than the full one, so it can only propose
    # more candidates, never miss a pair: a cheap filter before the exact check (8x fewer operations).
    coarse = features[:, :PREFILTER_DIMS].contiguous()
    block = _block_rows(n, 5)  # float32 distances and their bool mask
    for begin in range(0, n, block):
        rows = coarse[begin : begin + block]
        pairs = (torch.cdist(rows, coarse) <= proposal).nonzero()
        pairs = pairs[pairs[:, 0] + begin < pairs[:, 1]]
        if not len(pairs):
            continue
        exact = (features[pairs[:, 0] + begin] - features[pairs[:, 1]]).norm(dim=1) <= tolerance
        for i, j in pairs[exact].tolist():
            a, b = find(begin + i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    roots: dict[int, int] = {}
    return [roots.setdefault(find(i), len(roots)) for i in range(n)]


def _split_groups(groups: list[int], k: int, equal: bool) -> list[int] | None:
    """More duplication than needed (down ÷2 of an up ×4): split copy groups into smaller copy groups."""
    members: dict[int, list[int]] = {}
    for unit, group in enumerate(groups):
        members.setdefault(group, []).append(unit)
    n = len(groups)
    if equal:
        if n % k:
            return None
        size = n // k
        if any(len(units) % size for units in members.values()):
            return None
        pieces = [units[i : i + size] for units in members.values() for i in range(0, len(units), size)]
    else:
        pieces = list(members.values())
        while len(pieces) < k:
            pieces.sort(key=len, reverse=True)
            largest = pieces.pop(0)
            if len(largest) < 2:
                return None
            half = len(largest) // 2
            pieces += [largest[:half], largest[half:]]
    if len(pieces) != k:
        return None
    pieces.sort(key=min)
    labels = [0] * n
    for index, piece in enumerate(pieces):
        for unit in piece:
            labels[unit] = index
    return labels


def kmeans(features: torch.Tensor, k: int, *, equal: bool, seed: int = 0) -> list[int]:
    """Balanced when `equal` (every cluster n/k units), else plain k-means with no empty cluster."""
    n = features.shape[0]
    if k >= n:
        return list(range(n))
    generator = torch.Generator().manual_seed(seed)
    x = features.float()
    squared = x.pow(2).sum(dim=1)
    centre_x = _initial_centres(x, squared, k, generator)
    labels = torch.full((n,), -1, dtype=torch.long)
    for iteration in range(KMEANS_ITERATIONS):
        if equal:
            new_labels = _balanced_assign(x, squared, centre_x, k)
        else:
            new_labels = _fill_empty(_nearest(x, centre_x), x, centre_x, k)
        changed = int((new_labels != labels).sum())
        labels = new_labels
        if changed == 0:
            break
        if changed <= KMEANS_SETTLED * n and iteration:
            break  # only a few boundary units still move: more iterations cost more than they change
        sums = torch.zeros_like(centre_x).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).clamp_min(1).to(x.dtype)
        centre_x = sums / counts[:, None]
    # Number clusters by their first unit, so the output order follows the input order.
    order = {}
    for label in labels.tolist():
        order.setdefault(label, len(order))
    return [order[label] for label in labels.tolist()]


KMEANS_PLUS_PLUS_MAX = 1024  # beyond this many clusters, seeding one centre at a time costs more than it helps


def _initial_centres(x, squared, k, generator):
    """k-means++ seeding (spread-out centres), or an even random sample of units when k is large."""
    n = x.shape[0]
    if k > KMEANS_PLUS_PLUS_MAX:
        return x[torch.randperm(n, generator=generator)[:k]].clone()
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    closest = (squared + squared[chosen[0]] - 2 * (x @ x[chosen[0]])).clamp_min(0)
    for _ in range(1, k):
        total = float(closest.sum())
        if total > 0:
            pick = int(torch.multinomial(closest, 1, generator=generator))
        else:
            taken = set(chosen)
            pick = next(i for i in range(n) if i not in taken)
        chosen.append(pick)
        torch.minimum(closest, (squared + squared[pick] - 2 * (x @ x[pick])).clamp_min(0), out=closest)
    return x[chosen].clone()


BALANCED_CANDIDATES = 16  # nearest centres kept per unit for the balanced assignment


def _balanced_assign(x, squared, centres, k: int) -> torch.Tensor:
    """Each unit to its nearest cluster with room left, most decided units first (capacity n/k).

    A unit is decided by the gap between its two nearest centres. Its BALANCED_CANDIDATES nearest centres
    are kept (found a block of units at a time); only a unit whose candidates are all full by its turn gets
    its full distance row again, and takes the nearest open centre. That is the assignment of ranking every
    centre for every unit, without the units-by-centres matrix, its sort and its argsort (200 MB for a
    4096-wide LayerNorm residual stream), or a Python list of k centres per unit."""
    n = x.shape[0]
    keep = min(k, max(2, BALANCED_CANDIDATES))  # two at least: the margin needs the second nearest
    candidates = torch.empty((n, keep), dtype=torch.long)
    margin = torch.empty(n)
    step = _block_rows(k, 4)
    for begin in range(0, n, step):
        nearest = _distances(x[begin : begin + step], squared[begin : begin + step], centres).topk(
            keep, dim=1, largest=False
        )
        candidates[begin : begin + step] = nearest.indices
        values = nearest.values
        margin[begin : begin + step] = values[:, 1] - values[:, 0] if k > 1 else values[:, 0]
    capacity = [n // k] * k
    full = torch.zeros(k, dtype=torch.bool)
    labels = torch.full((n,), -1, dtype=torch.long)
    choices = candidates.tolist()
    for unit in margin.argsort(descending=True).tolist():
        chosen = next((c for c in choices[unit] if capacity[c]), None)
        if chosen is None:
            row = _distances(x[unit : unit + 1], squared[unit : unit + 1], centres)[0]
            chosen = int(row.masked_fill_(full, float("inf")).argmin())
        capacity[chosen] -= 1
        if not capacity[chosen]:
            full[chosen] = True
        labels[unit] = chosen
    return labels


def _distances(x, squared, centres):
    """Squared distances by the matrix-product form, built in one buffer (no n·k temporaries)."""
    distances = torch.mm(x, centres.T).mul_(-2).add_(squared[:, None]).add_(centres.pow(2).sum(dim=1)[None, :])
    return distances.clamp_min_(0)


def _nearest(x, centres) -> torch.Tensor:
    """The nearest centre of every unit, a block of units at a time (|x|² is the same for every centre).

    The products run in bf16 (float32 accumulation, about 3x faster here than float32): a unit that is
    about equally near two centres may pick the other one, which changes the clustering's cost by no more
    than that near-tie does."""
    centre_squared = centres.pow(2).sum(dim=1)[None, :]
    low_x, low_centres = x.to(torch.bfloat16), centres.T.to(torch.bfloat16)
    labels = torch.empty(x.shape[0], dtype=torch.long)
    step = _block_rows(centres.shape[0], 6)  # the bf16 product and its float32 copy
    for begin in range(0, x.shape[0], step):
        block = torch.mm(low_x[begin : begin + step], low_centres).float().mul_(-2).add_(centre_squared)
        labels[begin : begin + step] = block.argmin(dim=1)
    return labels


def _fill_empty(labels: torch.Tensor, x: torch.Tensor, centres: torch.Tensor, k: int) -> torch.Tensor:
    """Give every empty cluster the nearest unit of a cluster that has more than one."""
    counts = torch.bincount(labels, minlength=k)
    for c in (counts == 0).nonzero().flatten().tolist():
        counts = torch.bincount(labels, minlength=k)
        donors = counts[labels] > 1
        column = (x - centres[c]).pow(2).sum(dim=1)
        candidate_d = torch.where(donors, column, torch.full_like(column, float("inf")))
        unit = int(candidate_d.argmin())
        labels[unit] = c
    return labels


def cluster_units(
    features: torch.Tensor, k: int, *, equal: bool, what: str, seed: int = 0, dtype: str = "F32"
) -> tuple[list[int], bool]:
    """Labels (unit -> cluster in 0..k-1) and whether every cluster holds exact copies."""
    n = features.shape[0]
    if not 1 <= k <= n:
        raise TensorscaleError(f"{what}: cannot fold {n} units into {k}")
    if equal and n % k:
        raise CannotFold(f"{what}: {n} units cannot fold into {k} equal clusters; choose a divisor of {n}")
    if k == n:
        return list(range(n)), True
    groups = duplicate_groups(features, DUPLICATE_TOLERANCE.get(dtype, 1e-4))
    count = max(groups) + 1
    if count <= k:
        split = _split_groups(groups, k, equal)
        if split is not None:
            return split, True
    return kmeans(features, k, equal=equal, seed=seed), False
