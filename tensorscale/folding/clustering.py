"""Assign units to clusters: exact copies first, then balanced k-means for everything else.

Features arrive as one row per unit (already sketched to a few hundred dimensions). A HyperCloned model's
copies have identical rows up to float rounding, so they are found exactly and `down` inverts `up`
bit for bit where the dtype allows. An ordinary model has no copies: then units are grouped by k-means
(k-means++ seeding, a fixed seed), which merges the units whose weights are most alike.
"""

from __future__ import annotations

import torch

from ..errors import TensorscaleError

# How close two units' sketches must be (relative to the typical sketch norm) to count as copies. Copies
# differ only by rounding: ~1e-7 in float32, but a noisy bf16 `up` rounds each block to 8 bits.
DUPLICATE_TOLERANCE = {"F64": 1e-4, "F32": 1e-4, "F16": 5e-3, "BF16": 3e-2}
KMEANS_ITERATIONS = 25


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
    block = 1024
    for begin in range(0, n, block):
        rows = features[begin:begin + block]
        # The matrix-product form of the distance loses ~sqrt(eps) of the norm to cancellation, so it only
        # proposes candidates; each candidate pair is then measured directly.
        distances = torch.cdist(rows, features)
        candidates = (distances <= max(100 * tolerance, 1e-2 * max(scale, 1e-30))).nonzero().tolist()
        for i, j in candidates:
            if begin + i == j or float((features[begin + i] - features[j]).norm()) > tolerance:
                continue
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
        pieces = [units[i:i + size] for units in members.values() for i in range(0, len(units), size)]
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
    # k-means++ seeding
    centres = [int(torch.randint(n, (1,), generator=generator))]
    closest = torch.cdist(x, x[centres[-1]:centres[-1] + 1]).squeeze(1) ** 2
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0:
            remaining = [i for i in range(n) if i not in set(centres)]
            centres.append(remaining[0])
        else:
            centres.append(int(torch.multinomial(closest / total, 1, generator=generator)))
        closest = torch.minimum(closest, torch.cdist(x, x[centres[-1]:centres[-1] + 1]).squeeze(1) ** 2)
    centre_x = x[centres].clone()
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(KMEANS_ITERATIONS):
        distances = torch.cdist(x, centre_x)
        new_labels = _balanced_assign(distances, k) if equal else distances.argmin(dim=1)
        if not equal:
            new_labels = _fill_empty(new_labels, distances, k)
        if torch.equal(new_labels, labels) and _ > 0:
            break
        labels = new_labels
        for c in range(k):
            mask = labels == c
            centre_x[c] = x[mask].mean(dim=0)
    # Number clusters by their first unit, so the output order follows the input order.
    order = {}
    for unit in range(n):
        order.setdefault(int(labels[unit]), len(order))
    return [order[int(label)] for label in labels]


def _balanced_assign(distances: torch.Tensor, k: int) -> torch.Tensor:
    """Each unit to its nearest cluster with room left, most decided units first (capacity n/k)."""
    n = distances.shape[0]
    capacity = [n // k] * k
    sorted_d, _ = distances.sort(dim=1)
    margin = sorted_d[:, 1] - sorted_d[:, 0] if k > 1 else sorted_d[:, 0]
    labels = torch.full((n,), -1, dtype=torch.long)
    preference = distances.argsort(dim=1)
    for unit in margin.argsort(descending=True).tolist():
        for c in preference[unit].tolist():
            if capacity[c]:
                capacity[c] -= 1
                labels[unit] = c
                break
    return labels


def _fill_empty(labels: torch.Tensor, distances: torch.Tensor, k: int) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=k)
    for c in (counts == 0).nonzero().flatten().tolist():
        counts = torch.bincount(labels, minlength=k)
        donors = counts[labels] > 1
        candidate_d = torch.where(donors, distances[:, c], torch.full_like(distances[:, c], float("inf")))
        unit = int(candidate_d.argmin())
        labels[unit] = c
    return labels


def cluster_units(features: torch.Tensor, k: int, *, equal: bool, what: str, seed: int = 0,
                  dtype: str = "F32") -> tuple[list[int], bool]:
    """Labels (unit -> cluster in 0..k-1) and whether every cluster holds exact copies."""
    n = features.shape[0]
    if not 1 <= k <= n:
        raise TensorscaleError(f"{what}: cannot fold {n} units into {k}")
    if equal and n % k:
        raise TensorscaleError(f"{what}: {n} units cannot fold into {k} equal clusters; choose a divisor of {n}")
    if k == n:
        return list(range(n)), True
    groups = duplicate_groups(features, DUPLICATE_TOLERANCE.get(dtype, 1e-4))
    count = max(groups) + 1
    if count <= k:
        split = _split_groups(groups, k, equal)
        if split is not None:
            return split, True
    return kmeans(features, k, equal=equal, seed=seed), False
