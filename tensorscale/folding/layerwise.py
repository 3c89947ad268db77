"""`down` for trained models: keep the units that matter and re-solve every reader, one layer at a time.

Why: a trained network has no copies to merge. What keeps it working, measured on SmolLM2-135M, is
(1) choosing which units to drop from what they contribute on real activations, and (2) re-solving what
reads the remaining units so that it reproduces the original layer's outputs (folding.refit). Done one
layer at a time on two streams of hidden states, the original model's and the smaller model's, each
layer's readers are fitted on the inputs the smaller model really produces, with the original model's
outputs as targets: error that earlier layers left behind is corrected where a reader can correct it.

Everything comes from the rules' axis roles; nothing here knows an architecture:
* a reader is a 2-D weight with a `space.in` axis (nn.Linear: axis 1; one stored [in, out], GPT-2's Conv1D,
  is worked on as its transpose and written back as stored). Its module's input is caught by a forward
  pre-hook, in both streams; in the small stream the hook re-solves the weight before it is used, so within
  a layer each reader sees the outputs of the readers re-solved before it;
* a fused axis (Phi-3's qkv_proj rows [q; k; v], gate_up_proj [gate; up]) is cut part by part, each part
  by its own space;
* per-layer spaces (FFN neurons, heads) are cut at their consumer (down_proj, o_proj reads `ffn.in`,
  `heads.in`): all units run, then the consumer drops the units whose removal costs least after the others
  are re-solved (structured OBS), and the producers' rows of dropped units are removed afterwards;
* kv heads are chosen before the layer runs (they shape attention itself): the groups whose query heads
  write the most energy through the output projection are kept, and query heads are then dropped evenly
  within the kept groups, so GQA stays valid. Without kv heads (multi-head attention) each head is its own
  group, so the heads themselves are chosen that way: where the hidden size is heads × head_dim (GPT-2,
  GPT-NeoX, OPT) the small stream cannot run more heads than it keeps;
* the residual stream (a global space) is cut once for the whole model. Where its norm is an RMSNorm it is
  rotated onto its principal directions (folding.rotation, SliceGPT with one rotation, so the architecture
  stays stock): the normalised stream's second moment over a first pass, massive-activation dimensions
  (mean square far above the median, Sun et al. 2024) kept as they are, and with a tied head only
  dimensions of equal final-norm gain mixed. Measured on SmolLM2-135M at hidden 522 (benchmarks/README.md,
  down_variants): held-out ppl x1.37 / x2.01 / x1.53 on three domains, against x1.66 / x2.75 / x1.92 for
  keeping the dimensions readers use most (Wanda-sp: Σ ‖W[:, i]‖² E[x_i²]), which a LayerNorm stream
  still gets;
* everything else with an axis in a cut space keeps the kept units (norm gains, biases, embeddings).

Memory: one layer's weights (twice: original and small) and the calibration activations of one layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import interrupts
from ..errors import TensorscaleError
from ..reading.tensor_reader import ShardReader
from ..rulebook.schema import split_role
from .refit import drop_units, drop_units_fast, refit, refit_rows
from .rotation import project_axis, project_gain, residual_projection

MASSIVE = 20.0  # a residual dimension whose mean square is this many times the median is "massive"
# The ridge of every re-solve once the stream is rotated: the readers' priors (gain-folded rotated readers) and
# the writers' (P^T W) are exact where the stream lies in the kept directions, and a stronger pull towards them
# generalises. SmolLM2-135M, hidden 522, held-out ppl on three domains: ridge 0.01 x1.45 / x2.49 / x1.71; 0.1
# on the stream's readers only x1.45 / x2.29 / x1.66; 0.1 on every re-solve x1.37 / x2.01 / x1.53 (the
# structured-OBS choice of units keeps `ridge`; benchmarks/README.md).
ROTATED_RIDGE = 0.1
EMBEDDING_SHARE = 0.01  # of the rotation's second moment that comes from the whole embedding, beside the text's
HEAD_BLOCK = 4096  # rows of an untied head re-solved at a time: a float64 copy of 32,000 x 4,096 would be 1 GiB


class _HeadReached(Exception):
    pass


@dataclass
class TensorRoles:
    name: str
    info: object
    axes: list  # per axis: (space, role) or None
    layer: int | None
    slot_name: str
    layer_span: tuple[int, int] | None = None  # where the layer index is in `name`
    # stored [in, out] (GPT-2's Conv1D): the engine works on the transpose, so every reader is [out, in]
    transposed: bool = False
    scale: tuple[float, float] | None = None  # the rule's (factor, offset) at these sizes, if it has a scale

    def renumbered(self, index: int) -> str:
        """The name in the output, as layer `index` (layers after a removed one move down)."""
        if self.layer_span is None:
            return self.name
        start, end = self.layer_span
        return f"{self.name[:start]}{index}{self.name[end:]}"

    @property
    def reader(self):
        """(input axis, input space) for a 2-D weight that reads a space, else None."""
        if len(self.info.shape) != 2 or not self.name.endswith("weight"):
            return None
        for axis, label in enumerate(self.axes):
            if isinstance(label, tuple) and label[1] == "in":
                return axis, label[0]
        return None


@dataclass
class Cut:
    """Which source units of each space survive: `working` runs in the small stream, `final` is written."""

    working: dict = field(default_factory=dict)  # (space, layer|None) -> list of unit indices
    final: dict = field(default_factory=dict)


def _axis_label(label):
    """An axis of the rules as refit reads it: None (no space), (space, role), or for a fused axis
    (Phi-3's [q; k; v] rows) the list of its parts' (space, role), laid end to end."""
    if isinstance(label, list):
        return [split_role(part) for part in label]
    return split_role(label) if isinstance(label, str) and label != "-" else None


def _rule_scale(match) -> tuple[float, float] | None:
    """(factor, offset) of the tensor rule's `scale` at the down's sizes, or None without one."""
    transform = match.rule.transform
    if transform.scale is None and transform.scale_offset is None:
        return None
    factor = 1 if transform.scale is None else transform.scale.evaluate(match.env)
    offset = 0 if transform.scale_offset is None else transform.scale_offset.evaluate(match.env)
    return float(factor), float(offset)


def classify(matches, group: str) -> tuple[dict[int, list[TensorRoles]], list[TensorRoles]]:
    """The layers' tensors by layer index, and the rest. A weight stored [in, out] (a `space.in` role on
    its first axis only) is marked transposed, with its axes listed as the engine sees it, [out, in]."""
    layers: dict[int, list[TensorRoles]] = {}
    others: list[TensorRoles] = []
    for match in matches:
        labels = [_axis_label(label) for label in match.rule.transform.axes or []]
        is_in = [isinstance(label, tuple) and label[1] == "in" for label in labels]
        transposed = len(labels) == 2 and is_in == [True, False] and match.name.endswith("weight")
        if transposed:
            labels = labels[::-1]
        layer = match.env.get(group)
        scale = _rule_scale(match)
        if isinstance(layer, int):
            found = match.rule.regex.fullmatch(match.name)
            start, end = found.span(group)
            slot_name = match.name[:start] + "0" + match.name[end:]
            layers.setdefault(layer, []).append(
                TensorRoles(match.name, match.info, labels, layer, slot_name, (start, end), transposed)
            )
        else:
            others.append(
                TensorRoles(match.name, match.info, labels, None, match.name, transposed=transposed, scale=scale)
            )
    return layers, others


def _output_scaled(prior: torch.Tensor, reference: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor):
    """s·prior with the s minimising Σ‖W x − s·P' x̃‖² (W the reference on the original inputs x, P' the prior
    on the new ones x̃), from the moments: Σ (Wx)·(P'x̃) = Σ (W C ⊙ P'), Σ ‖P'x̃‖² = Σ (P' H ⊙ P')."""
    agreement, energy = _output_scale_terms(prior, reference, gram, cross)
    return prior * (agreement / energy) if energy > 0 else prior


def _output_scale_terms(prior, reference, gram, cross) -> tuple[float, float]:
    """Σ (W C ⊙ P') and Σ (P' H ⊙ P'), the two sums of _output_scaled's s; they add up over blocks of rows."""
    prior, reference = prior.double(), reference.double()
    return float(((reference @ cross) * prior).sum()), float(((prior @ gram) * prior).sum())


def _expand(units: list[int], unit: int) -> torch.Tensor:
    if unit == 1:
        return torch.tensor(units, dtype=torch.long)
    return (torch.tensor(units, dtype=torch.long)[:, None] * unit + torch.arange(unit)).reshape(-1)


class LayerwiseDown:
    """Cut a model to the spaces' targets, reading `source` and writing tensors through
    `emit(output name, tensor, source name)` (they differ for the layers after a removed one)."""

    def __init__(
        self,
        source,
        spaces: dict,
        new_config: dict,
        working_config: dict,
        matches,
        group: str,
        ids: torch.Tensor,
        progress=None,
        ridge: float = 1e-2,
        target: str | float = "auto",
        prior: bool = True,
        remove_layers: int = 0,
        remove_at: tuple[int, ...] | None = None,
        hidden_cut: str = "rotate",
        rotated_ridge: float = ROTATED_RIDGE,
        selection_ridge: float | None = None,
    ):
        """`target`: "cross" re-solves each reader to reproduce the original layer's outputs from the original
        stream (it also corrects what earlier layers left behind); "self" reproduces the original weights'
        outputs on the small stream's own inputs (plain OBS compensation). `prior`: the ridge pulls towards
        the same units' original weights instead of towards zero. A number α in [0, 1] blends the two: the
        solution is α·cross + (1-α)·self (least squares is linear in its target, so that is the refit to the
        blended target). "auto": self where only per-layer units are cut (the residual stream and the depth
        kept), cross where the stream or the depth changes. Measured on SmolLM2-135M (benchmarks/README.md,
        down_variants; held-out ppl on three domains): FFN 1280 self x1.14 / x1.57 / x1.28 against cross x1.16 /
        x1.71 / x1.31; but with the stream cut self loses (hidden 468 + FFN 512: x9.42 / x23.8 / x10.7 against
        x4.37 / x12.0 / x6.56), since only cross corrects what the narrower stream carries from earlier layers.

        `remove_layers`: layers left out (depth); `remove_at` names them, else the ones of least block
        influence on the calibration text (ShortGPT: 1 - cos(layer input, layer output)) are removed. The
        small stream skips them, so the layers after them are re-solved on what the shorter model computes.

        `hidden_cut`: how the residual stream is narrowed. "rotate" projects it onto its principal directions
        (folding.rotation; one rotation for the whole model, massive dimensions kept as they are) where its
        norm is an RMSNorm, whose gains have a rotated diagonal; "select" keeps the dimensions that readers
        use most. A LayerNorm stream (its centring does not commute with a rotation) is always selected."""
        from ..inference.layer_slot import LayerSlot

        self.source = source
        self.spaces = spaces
        # Windows the refit never sees, for an honest estimate of the damage: in-sample, a refit on 8k
        # tokens looked 100x better than on held-out text (SmolLM2-135M: ppl x1.003 against x1.25).
        held = len(ids) // 8 if len(ids) >= 4 else 0
        self.ids = ids[: len(ids) - held]
        self.check_ids = ids[len(ids) - held :] if held else None
        self.progress = progress
        self.ridge = ridge
        self.rotated_ridge = max(ridge, rotated_ridge)
        self.selection_ridge = ridge if selection_ridge is None else selection_ridge
        self.prior = prior
        self.layers, self.others = classify(matches, group)
        if not self.layers:
            raise TensorscaleError("down --calibration found no layers in the rules' tensor names")
        first = self.layers[min(self.layers)][0]
        prefix = first.slot_name[: first.slot_name.index(".0.") + 3] if ".0." in first.slot_name else None
        if prefix is None:
            raise TensorscaleError(f"cannot tell the layer prefix of {first.name}")
        self.reader = ShardReader()
        self._transposed = {t.slot_name for t in self.others + sum(self.layers.values(), []) if t.transposed}
        self.original = LayerSlot(source.config, prefix)
        self.small = LayerSlot(working_config, prefix)
        self.new_config = new_config
        self.cut = Cut()
        self.hidden = next(
            (
                s
                for s in spaces.values()
                if s.per is None
                and any(t.axes and t.axes[-1] == (s.name, "in") for ts in self.layers.values() for t in ts)
            ),
            None,
        )
        self.heads = self._head_space()  # the query heads' space, None without attention heads
        self.statistics = {}
        self._moment_cache = None
        if hidden_cut not in ("rotate", "select"):
            raise TensorscaleError(f"internal: hidden_cut {hidden_cut!r} is neither rotate nor select")
        self.rotate = (
            hidden_cut == "rotate"
            and self.hidden is not None
            and self.hidden.norm in ("rms", "rms_one_plus")
            and self.hidden.unit == 1
        )
        if target == "auto":
            stream_changes = (self.hidden is not None and self.hidden.target < self.hidden.size) or remove_layers
            target = "cross" if stream_changes else "self"
        self.statistics["target"] = target
        self.mix = {"cross": 1.0, "self": 0.0}[target] if target in ("cross", "self") else float(target)
        if not 0.0 <= self.mix <= 1.0:
            raise TensorscaleError(f"internal: refit target {target!r} is neither cross, self nor a share in [0, 1]")
        self.projection = None  # D × d, when the residual stream is rotated (set by the first pass)
        self._feeds = {}  # reader slot name -> the effective gain of the norm feeding it (a rotated stream)
        self.remove_layers = remove_layers
        self.removed = set(remove_at) if remove_at is not None else None
        if remove_at is not None and not self.removed <= set(self.layers):
            raise TensorscaleError(f"--at names layer {min(self.removed - set(self.layers))}, which the model lacks")
        if remove_layers >= len(self.layers):
            raise TensorscaleError(
                f"--remove-layers {remove_layers} would remove all {len(self.layers)} layers; keep at least one"
            )

    def read(self, roles: TensorRoles) -> torch.Tensor:
        """A tensor as the engine works on it: float32, a transposed reader turned to [out, in]."""
        tensor = self.reader.read(roles.info).float()
        if roles.transposed:
            tensor = tensor.T.contiguous()
        if not bool(torch.isfinite(tensor).all()):
            raise TensorscaleError(
                f"tensor {roles.name} holds NaN or Inf: refit cannot re-solve around it; repair "
                "the checkpoint, or fold it: --method fold --allow-nonfinite"
            )
        return tensor

    def _load(self, slot, tensors: dict) -> None:
        """Weights into a slot by slot name, a transposed reader back in its stored [in, out] layout."""
        slot.load({name: t.T if name in self._transposed else t for name, t in tensors.items()})

    # ---- selection of global units -------------------------------------------------------------
    def _globals(self) -> dict:
        return {t.slot_name: self.read(t) for t in self.others}

    def _first_pass(self, h: torch.Tensor, kwargs: dict) -> None:
        """A pass over the original model before any refit, for what must be chosen for the whole model: the
        residual dimensions to keep (when the hidden size is cut) and the layers to remove (when the user
        did not name them)."""
        score_hidden = self.hidden is not None and self.hidden.target < self.hidden.size
        influence = {}
        space = self.hidden
        if score_hidden:
            score = torch.zeros(space.size, dtype=torch.float64)
            energy = torch.zeros(space.size, dtype=torch.float64)
            moment = torch.zeros(space.size, space.size, dtype=torch.float64)
        for layer in sorted(self.layers):
            tensors = {t.slot_name: self.read(t) for t in self.layers[layer]}
            self._load(self.original, tensors)
            readers = [
                t
                for t in self.layers[layer]
                if score_hidden and not self.rotate and t.reader and t.reader[1] == space.name
            ]
            if score_hidden:
                energy += h.double().pow(2).reshape(-1, h.shape[-1]).mean(0)
                if self.rotate:
                    moment += self._normalised_moment(h)
            if score_hidden and self.rotate and layer == min(self.layers):
                self.rotate = self._only_pre_norms(h, kwargs)
                readers = (
                    [] if self.rotate else [t for t in self.layers[layer] if t.reader and t.reader[1] == space.name]
                )
            h_next, inputs = self._run_catching(self.original, h, kwargs, readers)
            cosine = torch.nn.functional.cosine_similarity(h.double(), h_next.double(), dim=-1)
            influence[layer] = float(1 - cosine.mean())
            h = h_next
            for name, x in inputs.items():
                weight = tensors[name]
                usage = weight.double().pow(2).sum(0) * x.double().pow(2).reshape(-1, x.shape[-1]).mean(0)
                score += usage / usage.sum().clamp_min(1e-30)
            if self.progress:
                self.progress("score", layer)
        self.statistics["block_influence"] = influence
        if self.removed is None:
            self.removed = set(sorted(influence, key=lambda i: (influence[i], i))[: self.remove_layers])
        if score_hidden and self.rotate:
            moment += self._normalised_moment(h)
            self._rotate_hidden(moment / float(moment.diagonal().sum()) + self._embedding_moment(), energy)
        elif score_hidden:
            self._keep_hidden(score, energy)

    def _only_pre_norms(self, h: torch.Tensor, kwargs: dict) -> bool:
        """Whether every norm on the stream in the first layer feeds a reader (a pre-norm block), as a
        rotation needs: a reader re-solved around the rotated gain absorbs it, but a norm on a writer's output
        (OLMo-2's and Gemma-2's post-norms) writes its gain straight into the stream, where a rotation cannot
        carry a per-dimension gain. Otherwise the stream keeps dimensions instead."""
        roles = self.layers[min(self.layers)]
        norms = [t for t in roles if t.axes == [(self.hidden.name, "norm")]]
        readers = [t for t in roles if t.reader and t.reader[1] == self.hidden.name]
        _, caught = self._run_catching(self.original, h, kwargs, readers, norms)
        fed = {n.slot_name for n in self._feeding_norms(roles, norms, caught).values()}
        unfed = [n.name for n in norms if n.slot_name not in fed]
        if unfed:
            self.statistics["hidden_cut_reason"] = f"{unfed[0]} normalises a writer's output, not a reader's input"
        return not unfed

    @staticmethod
    def _normalised_moment(h: torch.Tensor) -> torch.Tensor:
        """Σ x̂ᵀx̂ over the tokens of `h`, x̂ = x / rms(x): what the readers see is the normalised stream, and
        unnormalised, a few tokens with massive activations would decide the whole PCA."""
        x = h.double().reshape(-1, h.shape[-1])
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).clamp_min(1e-30))
        return x.T @ x

    def _embedding_moment(self) -> torch.Tensor:
        """EMBEDDING_SHARE of a second moment over the rows (normalised) of the first stored writer of the
        stream outside the layers, the token embedding: the calibration text meets a few thousand tokens, the
        embedding holds them all, so no token's input direction is left with no weight at all (a direction
        the calibration never excited would otherwise tie with directions that carry nothing)."""
        size = self.hidden.size
        moment = torch.zeros(size, size, dtype=torch.float64)
        writers = [t for t in self.others if len(t.info.shape) == 2 and t.axes[1] == (self.hidden.name, "out")]
        for t in writers[:1]:
            x = self.read(t).double()
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).clamp_min(1e-30))
            moment += x.T @ x / float(x.pow(2).sum().clamp_min(1e-30))
        return moment * EMBEDDING_SHARE

    def _tied_gain(self):
        """The final norm's gain when the output head is the embedding (no stored reader of the stream
        outside the layers): that head cannot be re-solved, so the rotation must nearly commute with it."""
        if any(t.reader and t.reader[1] == self.hidden.name for t in self.others):
            return None
        norm = self._final_norm()
        if norm is None:
            return None
        return self._effective_gain(self.read(norm))

    def _final_norm(self):
        """The final norm's gain (its weight: a LayerNorm's bias has the same role, and sorts first)."""
        norms = [t for t in self.others if t.axes == [(self.hidden.name, "norm")]]
        return next((t for t in norms if t.name.endswith("weight")), norms[0] if norms else None)

    def _effective_gain(self, stored: torch.Tensor) -> torch.Tensor:
        """The gain a norm on the stream multiplies by: its stored weight, plus 1 where stored as w in (1 + w)."""
        return stored.double() + (1.0 if self.hidden.norm == "rms_one_plus" else 0.0)

    def _rotate_hidden(self, moment: torch.Tensor, energy: torch.Tensor) -> None:
        """The projection of the residual stream onto its principal directions (massive dimensions first,
        each as it is)."""
        massive = energy > MASSIVE * energy.median()
        always = [int(i) for i in massive.nonzero().flatten()]
        self.projection, kept = residual_projection(moment, self.hidden.target, always, self._tied_gain())
        self.statistics["hidden_energy"] = energy
        self.statistics["massive"] = always
        self.statistics["hidden_cut"] = "rotate"
        self.statistics["hidden_energy_kept"] = kept

    def _keep_hidden(self, score: torch.Tensor, energy: torch.Tensor) -> None:
        """The residual dimensions kept: massive ones always, then by reader usage."""
        space = self.hidden
        self.statistics["hidden_energy"] = energy
        massive = energy > MASSIVE * energy.median()
        keep = space.target
        order = sorted(range(space.size), key=lambda i: (not bool(massive[i]), -float(score[i])))
        self.cut.working[(space.name, None)] = sorted(order[:keep])
        self.cut.final[(space.name, None)] = self.cut.working[(space.name, None)]
        self.statistics["massive"] = [int(i) for i in massive.nonzero().flatten()]
        self.statistics["hidden_cut"] = "select"

    @staticmethod
    def _run_catching(slot, h, kwargs, readers: list[TensorRoles], outputs_of: list[TensorRoles] = ()):
        """Run the slot's layer on `h`, catching the input of every reader in `readers` (by slot name), and
        the output of the modules of `outputs_of` (under "out:" + slot name)."""
        caught = {}
        handles = [
            slot.module(t.slot_name).register_forward_pre_hook(
                lambda mod, args, key=t.slot_name: caught.__setitem__(key, args[0].detach())
            )
            for t in readers
        ]
        handles += [
            slot.module(t.slot_name).register_forward_hook(
                lambda mod, args, out, key="out:" + t.slot_name: caught.__setitem__(key, out.detach())
            )
            for t in outputs_of
        ]
        try:
            return slot.run(h, kwargs), caught
        finally:
            for handle in handles:
                handle.remove()

    # ---- helpers ----------------------------------------------------------------------------------
    def _units(self, space_name: str, layer, which: str) -> list[int] | None:
        space = self.spaces[space_name]
        key = (space.clusters_of or space_name, layer if space.per else None)
        table = self.cut.working if which == "working" else self.cut.final
        return table.get(key)

    def _select(self, tensor: torch.Tensor, roles: TensorRoles, which: str, skip_axis=None) -> torch.Tensor:
        for axis, label in enumerate(roles.axes):
            if label is None or axis == skip_axis:
                continue
            if isinstance(label, list):  # a fused axis: each part is cut on its own, then they are rejoined
                parts = tensor.split([self.spaces[name].size for name, _ in label], axis)
                cut = [self._select_axis(p, axis, part, roles.layer, which) for p, part in zip(parts, label)]
                tensor = torch.cat(cut, axis)
            else:
                tensor = self._select_axis(tensor, axis, label, roles.layer, which)
        return tensor

    def _select_axis(self, tensor: torch.Tensor, axis: int, label: tuple, layer, which: str) -> torch.Tensor:
        """`tensor` with axis `axis` (of space and role `label`) cut to the units kept, or projected onto the
        kept directions of a rotated stream."""
        if self.projection is not None and label[0] == self.hidden.name:
            if label[1] == "norm":
                return project_gain(tensor, self.projection, self.hidden.norm == "rms_one_plus")
            return project_axis(tensor, axis, self.projection)
        units = self._units(label[0], layer, which)
        if units is None:
            return tensor
        return tensor.index_select(axis, _expand(units, self.spaces[label[0]].unit))

    def _head_space(self):
        """The query heads' space: per layer, units wider than one dimension, read by a reader (o_proj)."""
        read = {t.reader[1] for roles in self.layers.values() for t in roles if t.reader}
        return next((s for s in self.spaces.values() if s.per and s.unit > 1 and s.name in read), None)

    def _choose_kv(self, layer: int, tensors: dict, o_input: torch.Tensor | None) -> None:
        """Keep the kv groups whose query heads write the most energy through the output projection. Without
        a kv space (multi-head attention) every head is its own group, so the heads themselves are chosen
        here: the small stream must run at the final head count where the hidden size is heads × head_dim
        (GPT-2, GPT-NeoX, OPT)."""
        heads = self.heads
        if heads is None:
            return
        kv = self.spaces[heads.within] if heads.within else None
        groups = kv.units if kv is not None else heads.units
        kept_groups = kv.target_units if kv is not None else heads.target_units
        group = heads.units // groups
        if kept_groups < groups:
            reader = next(t for t in self.layers[layer] if t.reader and t.reader[1] == heads.name)
            weight = tensors[reader.slot_name]
            x = o_input.reshape(-1, o_input.shape[-1]).double()
            energy = []
            for g in range(groups):
                block = slice(g * group * heads.unit, (g + 1) * group * heads.unit)
                y = x[:, block] @ weight[:, block].double().T
                energy.append(float(y.pow(2).sum()))
            kept = sorted(sorted(range(groups), key=lambda g: -energy[g])[:kept_groups])
        else:
            kept = list(range(groups))
        if kv is not None:
            self.cut.working[(kv.name, layer)] = kept
            self.cut.final[(kv.name, layer)] = kept
        key = (heads.clusters_of or heads.name, layer)
        self.cut.working[key] = [g * group + j for g in kept for j in range(group)]
        if kv is None:
            self.cut.final[key] = self.cut.working[key]

    # ---- the layer pass ------------------------------------------------------------------------------
    def _skip_layer(self, layer: int, h_orig, h_small, kw_orig):
        """A removed layer: the original stream runs it, the small one goes on without it."""
        self._load(self.original, {t.slot_name: self.read(t) for t in self.layers[layer]})
        return self.original.run(h_orig, kw_orig), h_small

    def _layer(self, layer: int, h_orig, h_small, kw_orig, kw_small, emit):
        roles = self.layers[layer]
        tensors = {t.slot_name: self.read(t) for t in roles}
        by_slot = {t.slot_name: t for t in roles}
        self._load(self.original, tensors)
        norms = [t for t in roles if self.projection is not None and t.axes == [(self.hidden.name, "norm")]]
        h_orig_next, caught = self._run_catching(self.original, h_orig, kw_orig, [t for t in roles if t.reader], norms)
        self._feeds = self._norm_feeds(roles, tensors, norms, caught)

        heads = self.heads
        o_reader = next((t for t in roles if heads is not None and t.reader and t.reader[1] == heads.name), None)
        self._choose_kv(layer, tensors, caught.get(o_reader.slot_name) if o_reader else None)
        for s in self.spaces.values():
            if s.per and (s.name, layer) not in self.cut.working and s.clusters_of is None:
                self.cut.working[(s.name, layer)] = list(range(s.units))

        working = {}
        for t in roles:
            working[t.slot_name] = self._select(tensors[t.slot_name], t, "working")
        self._load(self.small, working)
        refitted = {}
        handles = []
        for t in roles:
            if t.reader:
                module = self.small.module(t.slot_name)
                handles.append(
                    module.register_forward_pre_hook(self._refit_hook(t, tensors, by_slot, caught, refitted, layer))
                )
        h_small_next = self.small.run(h_small, kw_small)
        for handle in handles:
            handle.remove()
        for s in self.spaces.values():
            key = (s.name, layer)
            if s.per and key in self.cut.working and key not in self.cut.final:
                self.cut.final[key] = self.cut.working[key]
        for t in roles:
            if t.slot_name in refitted:
                weight, bias = refitted[t.slot_name]
                weight = self._final_rows(weight, t)
                emit(t.name, weight)
                if bias is not None:
                    bias_roles = by_slot.get(t.slot_name[: -len("weight")] + "bias")
                    emit(bias_roles.name, self._final_rows(bias, bias_roles))
        for t in roles:
            if t.slot_name in refitted or (
                t.slot_name.endswith("bias") and t.slot_name[: -len("bias")] + "weight" in refitted
            ):
                continue
            emit(t.name, self._select(tensors[t.slot_name], t, "final"))
        return h_orig_next, h_small_next

    def _feeding_norms(self, roles, norms, caught) -> dict:
        """Reader slot name -> the norm (of `norms`) whose output it reads, for the stream's readers in
        `roles`: found by value, since a reader fed by a norm receives that norm's output tensor."""
        found = {}
        for t in roles:
            if not t.reader or t.reader[1] != self.hidden.name:
                continue
            x = caught[t.slot_name]
            for norm in norms:
                out = caught.get("out:" + norm.slot_name)
                if out is not None and out.shape == x.shape and torch.equal(out, x):
                    found[t.slot_name] = norm
                    break
        return found

    def _norm_feeds(self, roles, tensors, norms, caught) -> dict:
        """Reader slot name -> the effective gain of the norm whose output it reads, for a rotated stream."""
        return {
            reader: self._effective_gain(tensors[norm.slot_name])
            for reader, norm in self._feeding_norms(roles, norms, caught).items()
        }

    def _reader_prior(self, tensor: torch.Tensor, t: TensorRoles) -> torch.Tensor:
        """The reader the ridge pulls towards, over the working units. For a reader of a rotated stream fed
        by a norm, its gain g is folded in and the rotated norm's diagonal γ taken out, W diag(g) P diag(1/γ):
        exact wherever the stream lies in the kept directions."""
        gain = self._feeds.get(t.slot_name) if self.projection is not None else None
        if gain is None:
            return self._select(tensor, t, "working").double()
        gamma = (self.projection * (gain[:, None] * self.projection)).sum(0)
        safe = gamma.abs() > 1e-6 * float(gamma.abs().max().clamp_min(1e-30))
        folded = self._select(tensor.double() * gain, t, "working").double()
        folded[:, safe] /= gamma[safe]
        return folded

    def _final_rows(self, tensor: torch.Tensor, roles: TensorRoles) -> torch.Tensor:
        """Rows of a re-solved weight (laid out over the working units) that are written; a fused axis part
        by part."""
        label = roles.axes[0]
        if label is None:
            return tensor
        if isinstance(label, list):
            sizes = [self._working_rows(name, roles.layer) for name, _ in label]
            parts = tensor.split(sizes, 0)
            return torch.cat([self._final_part(p, name, roles.layer) for p, (name, _) in zip(parts, label)], 0)
        if label[1] == "in":
            return tensor
        return self._final_part(tensor, label[0], roles.layer)

    def _working_rows(self, space_name: str, layer) -> int:
        """How many rows a part over `space_name` has in the working layout."""
        space = self.spaces[space_name]
        if self.projection is not None and space is self.hidden:
            return self.projection.shape[1]
        units = self._units(space_name, layer, "working")
        return space.size if units is None else len(units) * space.unit

    def _final_part(self, tensor: torch.Tensor, space_name: str, layer) -> torch.Tensor:
        working = self._units(space_name, layer, "working")
        final = self._units(space_name, layer, "final")
        if working is None or final == working:
            return tensor
        position = {u: i for i, u in enumerate(working)}
        return tensor.index_select(0, _expand([position[u] for u in final], self.spaces[space_name].unit))

    def _moments(self, x_small: torch.Tensor, x_orig: torch.Tensor, with_bias: bool):
        """H = Σ x̃x̃ᵀ and C = Σ x x̃ᵀ over the calibration tokens, in float64 (products in float32, which
        is 4x faster here and far inside what the ridge tolerates). Readers of one input (q, k, v; gate,
        up) share them: the last pair is kept, keyed by the two input tensors."""
        key = (x_small.data_ptr(), x_small.shape, x_orig.data_ptr(), x_orig.shape, with_bias)
        if self._moment_cache is not None and self._moment_cache[0] == key:
            return self._moment_cache[1]
        xs = x_small.reshape(-1, x_small.shape[-1]).float()
        xo = x_orig.reshape(-1, x_orig.shape[-1]).float()
        if with_bias:
            xs = torch.cat([xs, torch.ones(len(xs), 1)], 1)
            xo = torch.cat([xo, torch.ones(len(xo), 1)], 1)
        result = ((xs.T @ xs).double(), (xo.T @ xs).double())
        self._moment_cache = (key, result)
        return result

    def _rescaled_prior(self, prior, t: TensorRoles, in_space, layer, gram, cross, with_bias, reference):
        """The same units' original weights, scaled by the least-squares ratio of the old input to the new
        one on those units (an RMSNorm over fewer dimensions scales every kept input by sqrt(D/d)), so
        that the ridge pulls towards the reader that would be exact if only the scale had changed. On a
        rotated stream the inputs are not the same units, and the ratio is taken on the outputs instead:
        the s minimising Σ‖W x − s·P' x̃‖², from the moments (Σ (Wx)·(P'x̃) = Σ (W C ⊙ P'), Σ ‖P'x̃‖² =
        Σ (P' H ⊙ P'))."""
        if self.projection is not None and in_space is self.hidden:
            prior = prior.double().clone()
            end = -1 if with_bias else None  # a bias column is the original bias already: left as it is
            prior[:, :end] = _output_scaled(
                prior[:, :end], reference.double()[:, :end], gram[:end, :end], cross[:end, :end]
            )
            return prior
        units = self._units(in_space.name, layer if in_space.per else None, "working")
        if units is None:
            return prior
        columns = _expand(units, in_space.unit)
        n = len(columns)
        matched = cross[columns, torch.arange(n)].sum()
        energy = gram.diagonal()[:n].sum()
        if float(energy) <= 0:
            return prior
        scale = float(matched / energy)
        prior = prior.clone()
        prior[:, :n] *= scale
        return prior

    def _refit_hook(self, t: TensorRoles, tensors, by_slot, caught, refitted, layer):
        in_axis, in_space_name = t.reader
        if in_axis != 1:
            raise TensorscaleError(f"{t.name}: down --calibration re-solves nn.Linear weights only ([out, in])")
        in_space = self.spaces[in_space_name]
        bias_name = t.slot_name[: -len("weight")] + "bias"

        def hook(module, args):
            weight = self._select(tensors[t.slot_name], t, "working", skip_axis=1).double()
            bias = tensors.get(bias_name)
            if bias is not None:
                bias = self._select(bias, by_slot[bias_name], "working").double()
                weight = torch.cat([weight, bias[:, None]], 1)
            prior = self._reader_prior(tensors[t.slot_name], t)
            if bias is not None:
                prior = torch.cat([prior, bias[:, None]], 1)
            solved = None
            # the original layer on the original stream (cross), and the original weights on the small
            # stream's own inputs (self), in the shares self.mix and 1 - self.mix
            for share, source, reference in (
                (self.mix, caught[t.slot_name], weight),
                (1.0 - self.mix, args[0].detach(), prior),
            ):
                if share == 0.0:
                    continue
                gram, cross = self._moments(args[0].detach(), source, bias is not None)
                pull = None
                if self.prior:
                    pull = (
                        prior
                        if reference is prior
                        else self._rescaled_prior(prior, t, in_space, layer, gram, cross, bias is not None, reference)
                    )
                part = refit(
                    reference, cross, gram, self.rotated_ridge if self.projection is not None else self.ridge, pull
                )
                solved = part * share if solved is None else solved + part * share
            working_units = self._units(in_space_name, layer, "working") if in_space.per else None
            new_bias = None
            if working_units is not None and len(working_units) > in_space.target_units:
                core, core_gram = (solved[:, :-1], gram[:-1, :-1]) if bias is not None else (solved, gram)
                drop = len(working_units) - in_space.target_units
                if in_space.unit == 1:
                    kept, core = drop_units_fast(core, core_gram, drop, self.selection_ridge)
                    if self.selection_ridge != self.ridge:  # chosen under one damping, re-solved under the other
                        core = self._resolved_on(solved[:, : core_gram.shape[0]], core_gram, kept)
                else:
                    group = None
                    if in_space.within:
                        size = in_space.units // self.spaces[in_space.within].units
                        by_group = {}
                        for position, u in enumerate(working_units):
                            by_group.setdefault(u // size, []).append(position)
                        group = list(by_group.values())
                    kept, core = drop_units(core, core_gram, in_space.unit, drop, group, self.ridge)
                self.cut.final[(in_space.clusters_of or in_space_name, layer)] = [working_units[i] for i in kept]
                if bias is not None:
                    new_bias = solved[:, -1]
                full = torch.zeros(core.shape[0], len(working_units) * in_space.unit, dtype=core.dtype)
                full[:, _expand(kept, in_space.unit)] = core
                module.weight.data = (full.T if t.transposed else full).float()
                refitted[t.slot_name] = (core.float(), None if new_bias is None else new_bias.float())
            else:
                if bias is not None:
                    solved, new_bias = solved[:, :-1], solved[:, -1]
                module.weight.data = (solved.T if t.transposed else solved).float()
                refitted[t.slot_name] = (solved.float(), None if new_bias is None else new_bias.float())
            if new_bias is not None and getattr(module, "bias", None) is not None:
                module.bias.data = new_bias.float()

        return hook

    def _resolved_on(self, weight: torch.Tensor, gram: torch.Tensor, kept: list[int]) -> torch.Tensor:
        """The least-squares reader of the kept columns only that reproduces `weight` over all of them:
        W H[:, K] (H_KK + λ)⁻¹, what OBS's removal of the others gives under the ridge λ."""
        h = gram.double()
        h = h + self.ridge * float(h.diagonal().mean().clamp_min(1e-12)) * torch.eye(len(h), dtype=torch.float64)
        index = torch.tensor(kept, dtype=torch.long)
        return torch.linalg.solve(h[index][:, index], (weight.double() @ h[:, index]).T).T

    # ---- the whole model -------------------------------------------------------------------------------
    def run(self, emit) -> dict:
        stored_transposed = {t.name for t in self.others + sum(self.layers.values(), []) if t.transposed}
        emit_canonical = emit

        def emit(name, tensor, source_name):  # a transposed reader is written as it was stored, [in, out]
            emit_canonical(name, tensor.T.contiguous() if source_name in stored_transposed else tensor, source_name)

        globals_ = self._globals()
        self._load(self.original, globals_)
        h_orig, kw_orig = self.original.first_inputs(self.ids)
        if (self.hidden is not None and self.hidden.target < self.hidden.size) or (
            self.remove_layers and self.removed is None
        ):
            self._first_pass(h_orig, kw_orig)
        removed = self.removed or set()
        self.statistics["removed_layers"] = sorted(removed)
        kept_layers = [layer for layer in sorted(self.layers) if layer not in removed]
        output_index = {layer: index for index, layer in enumerate(kept_layers)}
        by_name = {t.name: t for roles in self.layers.values() for t in roles}

        def emit_renumbered(name, tensor):
            roles = by_name.get(name)
            emit(roles.renumbered(output_index[roles.layer]) if roles is not None else name, tensor, name)

        small_globals = {}
        for t in self.others:
            small_globals[t.slot_name] = self._stream_scaled(t, self._select(globals_[t.slot_name], t, "final"))
        self._load(self.small, {k: v for k, v in small_globals.items() if self.small.has(k)})
        h_small, kw_small = self.small.first_inputs(self.ids)
        check = None
        if self.check_ids is not None:
            check = [*self.original.first_inputs(self.check_ids), *self.small.first_inputs(self.check_ids)]
        for layer in sorted(self.layers):
            interrupts.check()  # a Ctrl-C that landed inside a hook is raised here, between layers
            if layer in removed:
                h_orig, h_small = self._skip_layer(layer, h_orig, h_small, kw_orig)
                if check is not None:
                    check[0] = self.original.run(check[0], check[1])
            else:
                h_orig, h_small = self._layer(layer, h_orig, h_small, kw_orig, kw_small, emit_renumbered)
                if check is not None:  # the slots now hold this layer, original and refitted
                    check[0] = self.original.run(check[0], check[1])
                    check[2] = self.small.run(check[2], check[3])
            if self.progress:
                self.progress("refit", layer)
        if self.hidden is not None and self.hidden.target < self.hidden.size:
            self._refit_head(globals_, small_globals, h_orig, h_small)
        for t in self.others:
            emit(t.name, small_globals[t.slot_name], t.name)
        self.reader.close()
        if check is not None:
            self.statistics.update(self._damage(self.check_ids, check[0], check[2]), calibration_held_out=True)
        else:
            self.statistics.update(self._damage(self.ids, h_orig, h_small), calibration_held_out=False)
        return self.statistics

    def _stream_scaled(self, t: TensorRoles, tensor: torch.Tensor) -> torch.Tensor:
        """A writer of the residual stream outside the layers (the embedding), with its rule's scale when the
        hidden size is cut: what the model does to it at run time may depend on the hidden size (Gemma
        multiplies the embedding by sqrt(hidden_size); its rules scale the rows by 1/sqrt(n), which under down
        is sqrt(D/d)), so the stream keeps the scale the layers were trained on. Readers and norms are
        re-solved or rescaled from the calibration text instead, so their rule scales are not applied."""
        cut = self.hidden is not None and self.hidden.target < self.hidden.size
        writes = any(label == (self.hidden.name, "out") for label in t.axes) if cut else False
        if t.scale is None or not writes or t.reader:
            return tensor
        factor, offset = t.scale
        return tensor * factor + offset

    @torch.no_grad()
    def _head_inputs(self, slot, h: torch.Tensor, batch: int = 8) -> torch.Tensor:
        """What the output head reads (the final norm's output), for every calibration token."""
        head = slot.model.get_output_embeddings()
        found = []

        def catch(module, args):
            found.append(args[0].detach().reshape(-1, args[0].shape[-1]))
            raise _HeadReached

        handle = head.register_forward_pre_hook(catch)
        try:
            for begin in range(0, len(self.ids), batch):
                try:
                    slot.logits(self.ids[begin : begin + batch], h[begin : begin + batch])
                except _HeadReached:
                    pass
        finally:
            handle.remove()
        return torch.cat(found)

    def _refit_head(self, globals_, small_globals, h_orig, h_small) -> None:
        """After a cut of the residual stream, the head reads a final norm taken over fewer dimensions.
        An untied head is re-solved like any reader; a tied one cannot change without changing the
        embedding, so the final norm's gain takes a per-dimension least-squares rescale instead."""
        x_orig = self._head_inputs(self.original, h_orig).double()
        x_small = self._head_inputs(self.small, h_small).double()
        if self.projection is not None:
            kept_part = x_orig @ self.projection  # the original head input, in the kept directions
        else:
            kept_part = x_orig[:, _expand(self.cut.final[(self.hidden.name, None)], self.hidden.unit)]
        head = next((t for t in self.others if t.reader and t.reader[1] == self.hidden.name), None)
        final_norm = self._final_norm()
        if head is not None:  # vocabulary x hidden: solved in blocks of rows, never whole in float64
            weight = globals_[head.slot_name]
            gram, cross = x_small.T @ x_small, x_orig.T @ x_small
            if self.projection is not None and final_norm is not None:
                self._feeds[head.slot_name] = self._effective_gain(globals_[final_norm.slot_name])
            blocks = [(begin, min(len(weight), begin + HEAD_BLOCK)) for begin in range(0, len(weight), HEAD_BLOCK)]
            if self.projection is not None:  # the least-squares scale on the outputs (_output_scaled)
                # the priors are made again below, block by block: holding them all would be the whole head
                terms = [
                    _output_scale_terms(self._reader_prior(weight[b:e], head), weight[b:e], gram, cross)
                    for b, e in blocks
                ]
                agreement, energy = (sum(column) for column in zip(*terms))
                scale = agreement / energy if energy > 0 else 1.0
            else:
                scale = float((kept_part * x_small).sum() / gram.diagonal().sum())
            ridge = self.rotated_ridge if self.projection is not None else self.ridge
            small_globals[head.slot_name] = refit_rows(
                len(weight),
                lambda b, e: (weight[b:e], scale * self._reader_prior(weight[b:e], head)),
                cross,
                gram,
                ridge,
                block=HEAD_BLOCK,
            )
        else:
            norm = final_norm
            if norm is None:
                return
            target = kept_part
            scale = (target * x_small).sum(0) / x_small.pow(2).sum(0).clamp_min(1e-30)
            gain = small_globals[norm.slot_name].double()
            if self.hidden.norm == "rms_one_plus":
                gain = (1 + gain) * scale - 1
            else:
                gain = gain * scale
            small_globals[norm.slot_name] = gain.float()
            bias_name = norm.slot_name[: -len("weight")] + "bias"
            if norm.slot_name.endswith("weight") and bias_name in small_globals:  # a LayerNorm's output scales too
                small_globals[bias_name] = (small_globals[bias_name].double() * scale).float()
        self._load(self.small, {k: v for k, v in small_globals.items() if self.small.has(k)})

    @torch.no_grad()
    def _damage(self, windows: torch.Tensor, h_orig: torch.Tensor, h_small: torch.Tensor, batch: int = 1) -> dict:
        """KL(original ‖ small) per token and the perplexity ratio on `windows` (the held-back calibration
        windows; all of them when there were too few to hold any back)."""
        kl = nll_orig = nll_small = count = 0.0
        for begin in range(0, len(windows), batch):
            ids = windows[begin : begin + batch]
            logp = torch.log_softmax(self.original.logits(ids, h_orig[begin : begin + batch]).float()[:, :-1], -1)
            logq = torch.log_softmax(self.small.logits(ids, h_small[begin : begin + batch]).float()[:, :-1], -1)
            target = ids[:, 1:, None]
            kl += float((logp.exp() * (logp - logq)).sum())
            nll_orig -= float(logp.gather(-1, target).sum())
            nll_small -= float(logq.gather(-1, target).sum())
            count += target.numel()
        return {"calibration_kl": kl / count, "calibration_ppl_ratio": math.exp((nll_small - nll_orig) / count)}
