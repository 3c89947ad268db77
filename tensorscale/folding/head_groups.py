"""Which head targets `down` can reach under GQA, decided before any weight is read.

Cluster-fold merges units; it never splits one. Under grouped-query attention each output kv head is a
cluster of whole source kv heads, and its G' = A'/K' query heads are merges of those kv heads' query
heads (analysis._fold_within: a merged q head never spans two kv heads, so the output is valid GQA). An
output kv cluster of s source kv heads holds s·G query heads (G = A/K), so it needs s·G >= G' (and, for
a space whose clusters must be equal, s·G a multiple of G'). Where G' <= G any clustering of the kv heads
works; where G' > G the kv heads are clustered in equal groups (s = K/K' each, so s·G = A/K' >= A'/K'),
which needs K to be a multiple of K'. So 9 heads over 3 kv heads cannot become 8 over 2: 2 q heads of 4
would need a kv group of 3 to give 4 of its 3 q heads.
"""

from __future__ import annotations

from ..errors import TensorscaleError
from ..rulebook.compile import Space


def needs_equal_groups(space: Space, parent: Space) -> bool:
    """True when the kv clusters must be equal for `space`'s q heads to fit (G' > G)."""
    return space.target_units * parent.units > space.units * parent.target_units


def fits(
    heads: int, kv_heads: int, target_heads: int, target_kv_heads: int, equal: bool = False, parent_equal: bool = False
) -> bool:
    """Whether `heads` over `kv_heads` fold into `target_heads` over `target_kv_heads` (see the module doc)."""
    if not (1 <= target_kv_heads <= kv_heads and 1 <= target_heads <= heads) or heads % kv_heads:
        return False
    if target_heads % target_kv_heads:
        return False
    group, target_group = heads // kv_heads, target_heads // target_kv_heads
    balanced = parent_equal or target_group > group
    if balanced and kv_heads % target_kv_heads:
        return False
    sizes = [kv_heads // target_kv_heads] if balanced else range(1, kv_heads - target_kv_heads + 2)
    return all(s * group >= target_group and not (equal and (s * group) % target_group) for s in sizes)


def check_head_targets(spaces: dict[str, Space]) -> None:
    """Refuse, in one line that names the reachable targets, head counts cluster-fold cannot make."""
    for space in spaces.values():
        if space.within is None or space.within not in spaces:
            continue
        parent = spaces[space.within]
        if space.target == space.size and parent.target == parent.size:
            continue
        a, k, a2, k2 = space.units, parent.units, space.target_units, parent.target_units
        if fits(a, k, a2, k2, space.equal, parent.equal):
            continue
        raise TensorscaleError(
            f"--num-attention-heads {a2} with --num-key-value-heads {k2} cannot be folded from "
            f"{a} heads over {k} kv heads: {_why(a, k, a2, k2)}; {_choices(space, parent)}"
        )


def _why(a: int, k: int, a2: int, k2: int) -> str:
    if a2 > a or k2 > k:
        return "down only lowers head counts (up raises them)"
    if a2 % k2:
        return f"{k2} kv heads cannot share {a2} heads evenly"
    group, target_group = a // k, a2 // k2
    if target_group > group and k % k2:
        return (
            f"each new kv head would serve {target_group} heads, more than a source kv head's {group}, so it must "
            f"merge whole kv heads in equal groups, and {k} kv heads do not split into {k2} equal groups (down "
            "merges heads, it never splits one)"
        )
    return f"the {k} kv heads' groups of {group} heads do not fold evenly into groups of {target_group}"


def _choices(space: Space, parent: Space) -> str:
    a, k, a2, k2 = space.units, parent.units, space.target_units, parent.target_units
    ok = lambda heads, kv: fits(a, k, heads, kv, space.equal, parent.equal)  # noqa: E731
    same_kv = [h for h in range(1, a + 1) if ok(h, k2)] if 1 <= k2 <= k else []
    same_heads = [kv for kv in range(1, k + 1) if ok(a2, kv)] if 1 <= a2 <= a else []
    parts = []
    if same_kv:
        parts.append(f"with {k2} kv heads choose {_listed(same_kv)} heads")
    if same_heads:
        parts.append(f"or keep {a2} heads with {_listed(same_heads)} kv head{'s' if same_heads[-1] > 1 else ''}")
    if not parts:
        pairs = [f"{h}/{kv}" for kv in range(k, 0, -1) for h in range(a, 0, -1) if ok(h, kv)]
        parts.append("possible heads/kv heads: " + ", ".join(pairs[:12]) + (" ..." if len(pairs) > 12 else ""))
    return ", ".join(parts)


def _listed(values: list[int]) -> str:
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
