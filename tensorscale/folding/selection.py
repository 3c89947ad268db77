"""Select-and-refit: how `down` shrinks a space whose units are not copies of each other.

Cluster-fold is exact where a space holds copies (a HyperCloned model), but in a trained network similar
weights do not make interchangeable units: a merged FFN neuron writes the sum of its members' columns, and
the model breaks. Where the analysis finds no copies, a space is shrunk instead by keeping its most
important units and refitting the one matrix that reads them:

* producers (rows that write the space) and norm gains keep the selected units unchanged (a Gather);
* the consumer of a per-layer space (down_proj for FFN neurons, o_proj for heads) is refitted by least
  squares on calibration activations, W' = W·G[:, K]·G[K, K]⁻¹ with G the second moment of its input and
  K the kept units: the closed-form best reader of what is left (SparseGPT / ZipLM structured
  reconstruction). The units are chosen by the same objective, greedily (structured OBS): the unit whose
  removal, after the others compensate, loses the least output energy goes first;
* the residual stream keeps the dimensions its readers use most (Wanda-sp: Σ‖W[:, i]‖²·E[h_i²] over
  every reader), massive-activation dimensions always among them, and every reader is scaled by
  sqrt(D/d·f), f the share of the residual's energy that the kept dimensions carry, so that each RMSNorm
  sees the same scale as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import TensorscaleError
from ..ops.library import Gather, Op, Scale, _replace


@dataclass(eq=False)
class Mix(Op):
    """A dense linear map of one axis: out = x ·ₐₓᵢₛ matrix ([input size, output size]). The refitted
    reader of a space (least squares on calibration activations) is this op on the reader's input axis."""

    axis: int
    matrix: torch.Tensor
    label: str = ""
    name = "mix"
    arithmetic = True

    def out_shape(self, shape):
        self._check_axis(shape)
        if shape[self.axis] != self.matrix.shape[0]:
            raise TensorscaleError(f"mix {self.label}: axis {self.axis} has size {shape[self.axis]}, expected {self.matrix.shape[0]}")
        return _replace(shape, self.axis, self.matrix.shape[1])

    def apply(self, x, ctx, op_index):
        moved = x.float().movedim(self.axis, -1)
        return (moved @ self.matrix).movedim(-1, self.axis)

    def describe(self):
        return f"mix(axis={self.axis}, {self.label} {self.matrix.shape[0]}->{self.matrix.shape[1]}, least squares)"


@dataclass
class Selection:
    """A space shrunk by keeping units `keep` (sorted), with an optional refitted reader and reader scale.

    It stands where a Fold stands (Folds.by_key), so the plan asks it for each role's ops the same way."""

    keep: list[int]
    units: int
    refit: torch.Tensor | None = field(default=None, repr=False)  # [units·unit, kept·unit]: the reader's map
    reader_scale: float = 1.0
    exact: bool = False
    importance: list[float] | None = None
    estimate: float | None = None  # the share of the reader's output energy that the refit could not keep
    reader_refits: dict = field(default_factory=dict, repr=False)  # residual readers: tensor name -> map

    @property
    def cluster(self):  # Folds.lookup checks its length against the space
        return range(self.units)

    @property
    def clusters(self) -> int:
        return len(self.keep)

    def merge_op(self, axis: int, role: str, space, tensor: str | None = None) -> list[Op]:
        gather = Gather(axis, space.unit, tuple(self.keep))
        if role != "in":
            return [gather]
        if tensor in self.reader_refits:
            return [Mix(axis, self.reader_refits[tensor], label=f"{space.name} reader")]
        if self.refit is not None:
            return [Mix(axis, self.refit, label=space.name)]
        if self.reader_scale != 1.0:
            return [gather, Scale(self.reader_scale)]
        return [gather]


def obs_select(gram: torch.Tensor, weight: torch.Tensor, unit: int, keep_units: int, groups: int = 1,
               damp: float = 0.01, step: int = 1) -> list[int]:
    """The `keep_units` units (of `unit` columns each) of a reader `weight` [out, n·unit] to keep, chosen
    greedily by structured OBS on the input second moment `gram` [n·unit, n·unit]: the unit whose removal
    costs least output energy after the remaining columns compensate (tr W_u (H⁻¹_uu)⁻¹ W_uᵀ) goes first.
    `groups` > 1 removes whole groups of consecutive units at once (a kv head and its q heads)."""
    n = gram.shape[0] // unit
    block = unit * groups
    count = n // groups
    h = gram.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean().clamp_min(1e-12))
    hinv = _spd_inverse(h)
    w = weight.double().clone()
    alive = list(range(count))
    while len(alive) > keep_units // groups:
        costs = []
        for g in alive:
            idx = slice(g * block, (g + 1) * block)
            wg = w[:, idx]
            costs.append(float(torch.trace(wg @ torch.linalg.solve(hinv[idx, idx], wg.T))))
        order = sorted(range(len(alive)), key=lambda i: costs[i])
        drop = sorted(alive[i] for i in order[:min(step, len(alive) - keep_units // groups)])
        idx = torch.cat([torch.arange(g * block, (g + 1) * block) for g in drop])
        hdd = hinv[idx][:, idx]
        inv_dd = torch.linalg.inv(hdd)
        # OBS update: the remaining columns take over what the dropped ones wrote
        w -= w[:, idx] @ inv_dd @ hinv[idx, :]
        hinv -= hinv[:, idx] @ inv_dd @ hinv[idx, :]
        w[:, idx] = 0
        alive = [g for g in alive if g not in drop]
    return [g * groups + k for g in alive for k in range(groups)]


def _spd_inverse(h: torch.Tensor) -> torch.Tensor:
    """Inverse of a damped second moment (symmetric positive definite): Cholesky, a third of LU's work."""
    factor, info = torch.linalg.cholesky_ex(h)
    return torch.cholesky_inverse(factor) if int(info) == 0 else torch.linalg.inv(h)


def least_squares_reader(gram: torch.Tensor, unit: int, keep: list[int], damp: float = 0.01) -> torch.Tensor:
    """M [n·unit, k·unit] with W' = W·M the best reader of the kept units alone: G[:, K]·(G[K, K] + λ)⁻¹."""
    index = torch.cat([torch.arange(u * unit, (u + 1) * unit) for u in keep])
    g = gram.double()
    gkk = g[index][:, index].clone()
    gkk.diagonal().add_(damp * gkk.diagonal().mean().clamp_min(1e-12))
    factor, info = torch.linalg.cholesky_ex(gkk)
    solved = torch.cholesky_solve(g[index, :], factor) if int(info) == 0 else torch.linalg.solve(gkk, g[index, :])
    return solved.T.float().contiguous()


def lost_share(gram: torch.Tensor, weight: torch.Tensor, matrix: torch.Tensor, keep: list[int], unit: int) -> float:
    """‖W X − W M X_K‖² / ‖W X‖² in expectation over the calibration tokens (from the second moment)."""
    index = torch.cat([torch.arange(u * unit, (u + 1) * unit) for u in keep])
    g = gram.double()
    w = weight.double()
    select = torch.zeros(g.shape[0], len(index), dtype=torch.float64)
    select[index, torch.arange(len(index))] = 1.0
    diff = w - w @ matrix.double() @ select.T
    total = float(torch.einsum("ij,jk,ik->", w, g, w))
    return float(torch.einsum("ij,jk,ik->", diff, g, diff)) / max(total, 1e-30)


def residual_selection(scores: torch.Tensor, share: torch.Tensor, keep_units: int, massive: float = 8.0):
    """Residual dimensions to keep and the readers' scale: massive-activation dimensions (an energy share
    over `massive`× the average) first, then the highest reader scores."""
    size = scores.numel()
    forced = [int(i) for i in torch.nonzero(share > massive / size).flatten()]
    if len(forced) > keep_units:
        raise TensorscaleError(f"the residual stream has {len(forced)} massive-activation dimensions, more than the "
                               f"{keep_units} kept; choose a larger --hidden-size")
    ranked = [int(i) for i in torch.argsort(scores, descending=True) if int(i) not in forced]
    keep = sorted(forced + ranked[:keep_units - len(forced)])
    kept_share = float(share[keep].sum() / share.sum().clamp_min(1e-30))
    scale = math.sqrt(size / keep_units * kept_share)
    return keep, scale, forced


def obs_select_grouped(gram: torch.Tensor, weight: torch.Tensor, unit: int, keep_units: int,
                       group_of: list[int], per_group: int, damp: float = 0.01) -> list[int]:
    """obs_select for heads inside kv groups: drop the cheapest head whose group still holds more than
    `per_group` heads, until every group holds `per_group` (GQA needs equal groups)."""
    n = gram.shape[0] // unit
    h = gram.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean().clamp_min(1e-12))
    hinv = _spd_inverse(h)
    w = weight.double().clone()
    alive = list(range(n))
    while len(alive) > keep_units:
        counts: dict[int, int] = {}
        for u in alive:
            counts[group_of[u]] = counts.get(group_of[u], 0) + 1
        best, best_cost = None, math.inf
        for u in alive:
            if counts[group_of[u]] <= per_group:
                continue
            idx = slice(u * unit, (u + 1) * unit)
            wu = w[:, idx]
            cost = float(torch.trace(wu @ torch.linalg.solve(hinv[idx, idx], wu.T)))
            if cost < best_cost:
                best, best_cost = u, cost
        idx = torch.arange(best * unit, (best + 1) * unit)
        inv_dd = torch.linalg.inv(hinv[idx][:, idx])
        w -= w[:, idx] @ inv_dd @ hinv[idx, :]
        hinv -= hinv[:, idx] @ inv_dd @ hinv[idx, :]
        w[:, idx] = 0
        alive.remove(best)
    return alive


def obs_select_columns(gram: torch.Tensor, weight: torch.Tensor, keep_units: int, damp: float = 0.01,
                       step: int = 8) -> list[int]:
    """obs_select for single columns (FFN neurons), vectorised: cost_j = ‖w_j‖² / H⁻¹_jj, `step` at a time."""
    h = gram.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean().clamp_min(1e-12))
    hinv = _spd_inverse(h)
    w = weight.double().clone()
    alive = torch.ones(h.shape[0], dtype=torch.bool)
    while int(alive.sum()) > keep_units:
        cost = w.pow(2).sum(0) / hinv.diagonal().clamp_min(1e-30)
        cost[~alive] = math.inf
        take = min(step, int(alive.sum()) - keep_units)
        idx = torch.topk(cost, take, largest=False).indices
        inv_dd = torch.linalg.inv(hinv[idx][:, idx])
        w -= w[:, idx] @ inv_dd @ hinv[idx, :]
        hinv -= hinv[:, idx] @ inv_dd @ hinv[idx, :]
        w[:, idx] = 0
        hinv[idx, idx] = 1.0  # a removed column stays out: its cost is masked, its row of H⁻¹ is zero
        alive[idx] = False
    return [int(i) for i in torch.nonzero(alive).flatten()]


def plan_selections(folds, stats, spaces: dict, progress=None) -> list[str]:
    """Replace every clustering that is not an exact fold of copies by a Selection from `stats`
    (folding.statistics). Returns notes for the user (e.g. massive-activation dimensions kept)."""
    notes = []
    by_key = folds.by_key
    for name, space in spaces.items():
        key = (name, None)
        if space.per is None and key in by_key and not by_key[key].exact:
            score = stats.residual_score.get(name)
            if score is None:
                raise TensorscaleError(f"space {name}: no reader of the residual stream ran on the calibration text")
            share = stats.residual_share.get(name)
            share = share / max(1, stats.share_count.get(name, 1)) if share is not None else torch.full_like(score, 1 / space.size)
            keep, scale, forced = residual_selection(score, share, space.target_units)
            # Each reader refitted on its own input: W' = W·C[:, K]·C[K, K]⁻¹, times the norm's scale change.
            grams = {owner: least_squares_reader(gram, 1, keep) * scale for owner, gram in stats.reader_grams.items()}
            refits = {reader: grams[owner] for reader, owner in stats.reader_alias.items() if owner in grams}
            by_key[key] = Selection(keep, space.units, reader_scale=scale, reader_refits=refits,
                                    estimate=1 - float(share[keep].sum() / share.sum().clamp_min(1e-30)))
            if forced:
                notes.append(f"kept {len(forced)} massive-activation dimension(s) of {name}: {forced[:8]}")
    per_layer = [s for s in spaces.values() if s.per is not None and s.clusters_of is None]
    folded = [s for s in per_layer if s.target != s.size]
    names = {s.name for s in folded}
    instances = sorted({inst for (n, inst) in by_key if n in names}, key=lambda v: (str(type(v)), v))
    for instance in instances:
        for space in per_layer:
            children = [c for c in per_layer if c.within == space.name]
            if children and (space.name in names or children[0].name in names):
                _select_heads(by_key, stats, space, children[0], instance)
            elif not children and space.within is None and space.name in names:
                _select_plain(by_key, stats, space, instance)
        if progress:
            progress(instance)
    return notes


def _reader(stats, key):
    readers = stats.readers.get(key, [])
    gram = stats.grams.get(key)
    if gram is None or not readers:
        return None, None
    return gram, readers[0] if len(readers) == 1 else torch.cat(readers, dim=0)


def _select_plain(by_key, stats, space, instance):
    key = (space.name, instance)
    fold = by_key.get(key)
    if fold is None or fold.exact:
        return
    gram, weight = _reader(stats, key)
    if gram is None:
        raise TensorscaleError(f"space {space.name} ({space.per} {instance}): its reader did not run on the calibration text")
    if space.unit == 1:
        keep = obs_select_columns(gram, weight, space.target_units)
    else:
        keep = obs_select_grouped(gram, weight, space.unit, space.target_units, list(range(space.units)), 0)
    refit = least_squares_reader(gram, space.unit, keep) if len(stats.readers[key]) == 1 else None
    estimate = lost_share(gram, weight, refit, keep, space.unit) if refit is not None else None
    by_key[key] = Selection(keep, space.units, refit=refit, estimate=estimate)


def _select_heads(by_key, stats, parent, child, instance):
    """kv heads (parent) and the q heads within them, for one layer: kv groups first, by the cost of
    dropping a whole group (its q heads' columns of o_proj), then q heads inside the kept groups."""
    pkey, ckey = (parent.name, instance), (child.name, instance)
    pfold, cfold = by_key.get(pkey), by_key.get(ckey)
    if (pfold is None or pfold.exact) and (cfold is None or cfold.exact):
        return
    gram, weight = _reader(stats, ckey)
    if gram is None:
        raise TensorscaleError(f"space {child.name} ({child.per} {instance}): its reader did not run on the calibration text")
    group = child.units // parent.units
    kv_keep = list(range(parent.units))
    if parent.target != parent.size:
        kept = obs_select(gram, weight, child.unit, parent.target_units * group, groups=group)
        kv_keep = sorted({u // group for u in kept})
    per_group = child.target_units // parent.target_units
    if per_group > group:
        # More q heads per kv head than a kv head has: no selection gives that, but merging kv heads does
        # (their q heads then share one); the weight clustering of this layer's heads stays.
        return
    members = [u for g in kv_keep for u in range(g * group, (g + 1) * group)]
    index = torch.cat([torch.arange(u * child.unit, (u + 1) * child.unit) for u in members])
    sub_gram = gram[index][:, index]
    local = obs_select_grouped(sub_gram, weight[:, index], child.unit, per_group * len(kv_keep),
                               [i // group for i in range(len(members))], per_group)
    keep = sorted(members[i] for i in local)
    refit = least_squares_reader(gram, child.unit, keep) if len(stats.readers[ckey]) == 1 else None
    estimate = lost_share(gram, weight, refit, keep, child.unit) if refit is not None else None
    if parent.target != parent.size:
        by_key[pkey] = Selection(kv_keep, parent.units)
    by_key[ckey] = Selection(keep, child.units, refit=refit, estimate=estimate)
