"""SliceGPT-style baseline for bench_down.py: one global rotation of the residual stream, stock architecture.

SliceGPT (Ashkboos et al. 2024, arXiv 2401.15024) rotates the residual stream into its principal directions and
drops the weakest. With one global orthogonal Q (instead of SliceGPT's per-layer Q, which needs an extra matrix on
every residual connection) the result stays the stock architecture:

1. every RMSNorm gain g that feeds readers is folded into those readers' input columns, W -> W diag(g), so
   the norm is gain-free and RMSNorm(x Q) = RMSNorm(x) Q for any orthogonal Q;
2. every tensor with an axis on the residual space, reader or writer, embedding or bias, gets that axis
   multiplied by Q (a reader W -> W Q, a writer W -> Qᵀ W, an embedding row e -> e Q, a bias b -> b Q);
3. the first d of the rotated dimensions are kept (bench_down.py's apply_selection does the slicing).

The norm over d dimensions instead of D: for a stream vector y that lies in the kept directions (no energy
dropped), stock RMSNorm over its d coordinates divides by sqrt(|y|²/d + eps') where the original divided by
sqrt(|y|²/D + eps). With a uniform gain c = sqrt(D/d) and eps' = eps·D/d the two are equal:
c / sqrt(|y|²/d + eps·D/d) = 1 / sqrt(|y|²/D + eps). The gains are set to c; eps is left as it is (the
residual stream's mean square is many orders above eps, so eps' differs from eps by a relative 1e-6 or less,
and leaving it keeps the config untouched).

The tied head. A final norm that feeds a head tied to the embedding cannot be folded into the head without
untying it (the head *is* the embedding, whose rows are also the stream's input). With `untie=True` the head
is written as its own tensor (E diag(g) Q: exact, but vocab × d more parameters); by default the tie is kept
and the final norm keeps a per-dimension gain γ in the rotated basis, fitted by least squares on the logits
over the calibration tokens: minimise Σ_t ‖((z_t Q_d) ⊙ γ) (E Q_d)ᵀ − (z_t ⊙ g) Eᵀ‖², z_t the final norm's
gain-free output. That is a d × d linear system: (M ⊙ Σ_t a_tᵀ a_t) γ = Σ_t a_t ⊙ (u_t G Q_d), with
a_t = z_t Q_d, u_t = z_t ⊙ g, G = EᵀE, M = Q_dᵀ G Q_d. It is exact when g is uniform, and not in general
(Q diag(γ) Qᵀ cannot equal diag(g) unless Q maps g's level sets onto themselves). On SmolLM2-135M (final-norm
gains 1.5-3.3, one at -2.1) a Q from the plain PCA leaves the full-size rotated model at KL 2.34 nats from the
original on calibration text: useless. So with a tied head Q only mixes dimensions whose final-norm gains agree
within a factor 1 + TIED_GAIN_TOLERANCE (gain_groups; PCA inside each group, all groups' directions ordered by
eigenvalue together): there Q nearly commutes with diag(g). Measured on 512 calibration tokens, full size,
tolerance: KL, energy kept in 522 / 432 of 576 directions (plain PCA: 0.992 / 0.976):
0.10 (12 groups): 1.7e-3, 0.990 / 0.968; 0.05 (19): 3.8e-4, 0.988 / 0.964; 0.02 (28): 6.5e-5, 0.987 / 0.960;
0.01 (44): 2.0e-5, 0.986 / 0.958. 0.02 costs almost no compression and leaves the rotation nearly exact.

Q: the eigenvectors of Σ over every norm's input (the residual stream before each layer's norms and before the
final norm) of the per-token RMS-normalised stream's second moment, x̂ᵀx̂ with x̂ = x / rms(x), largest
eigenvalue first. Normalised, because what every reader sees is the normalised stream (and a few
"massive-activation" tokens would otherwise decide the whole PCA); SliceGPT's own PCA is of the raw layer
inputs, per layer.

Everything here is generic: the residual space is the one the rules' `norm` roles are on, readers and writers
are the rules' `in`/`out` roles on it, and which norm feeds which reader is observed in one forward pass (a
reader fed by a norm receives exactly that norm's output tensor). Architectures whose residual norm is not a
plain-gain RMSNorm (LayerNorm with its centring and bias, (1 + w) gains) are skipped with a reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# the grouped PCA is the engine's (down --method refit rotates the stream the same way)
from tensorscale.folding.rotation import TIED_GAIN_TOLERANCE, gain_groups, principal_rotation  # noqa: F401

CALIB_SEQUENCE = 256
PROBE_TOKENS = 32  # tokens of the one forward pass that finds which norm feeds which reader


def residual_space(layout) -> str | None:
    """The space every norm-role tensor is on (the residual stream), or None where there is not exactly one."""
    found = {s for m in layout.matches.values() for _, s, role in m.roles() if role == "norm"}
    return next(iter(found)) if len(found) == 1 else None


def skip_reason(layout) -> str | None:
    space = residual_space(layout)
    if space is None:
        return "no single residual space that the rules' norm roles are on"
    if layout.spaces[space].norm != "rms":
        return (
            f"the residual norm is {layout.spaces[space].norm!r}, not a plain-gain RMSNorm: a global rotation "
            "needs a norm that commutes with it (LayerNorm would need its centring folded first)"
        )
    if layout.spaces[space].unit != 1:
        return f"residual space {space} has units of {layout.spaces[space].unit}"
    return None


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _residual_axis(layout, name: str, residual: str):
    """(axis, role) of `name`'s residual axis, or None."""
    for axis, space, role in layout.roles(name):
        if space == residual:
            return axis, role
    return None


@dataclass
class Calibration:
    """What the rotation needs from the original model on calibration tokens."""

    feeds: dict[str, str]  # reader tensor name -> the norm tensor whose output it reads
    second_moment: torch.Tensor  # D × D, float64: Σ x̂ᵀx̂ over every norm input
    head_norm: str | None = None  # the norm feeding a head that is not a stored tensor (tied to the embedding)
    head_inputs: torch.Tensor | None = None  # tokens × D: that norm's gain-free output (x / rms(x))
    tokens: int = 0
    notes: list[str] = field(default_factory=list)


@torch.no_grad()
def calibrate(layout, model, ids: torch.Tensor) -> Calibration:
    residual = residual_space(layout)
    norms = [n for n in layout.matches if any(r == "norm" for _, _, r in layout.roles(n))]
    readers = [
        n
        for n in layout.matches
        if (found := _residual_axis(layout, n, residual)) and found[1] == "in" and n.endswith(".weight")
    ]
    eps_of = {n: float(getattr(model.get_submodule(_module(n)), "variance_epsilon", 1e-6)) for n in norms}

    # 1. Which norm feeds which reader: the reader's input equals a norm's output (same values, same shape).
    outputs, feeds, handles = {}, {}, []
    for n in norms:
        handles.append(
            model.get_submodule(_module(n)).register_forward_hook(
                lambda mod, args, out, n=n: outputs.__setitem__(n, out.detach())
            )
        )
    modules = {_module(r): r for r in readers}
    head_modules = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):

            def pre(mod, args, path=path):
                x = args[0]
                for n, y in reversed(list(outputs.items())):
                    if y.shape == x.shape and torch.equal(y, x):
                        if path in modules:
                            feeds[modules[path]] = n
                        else:
                            head_modules[path] = n
                        return

            handles.append(module.register_forward_pre_hook(pre))
    model(ids[:PROBE_TOKENS].unsqueeze(0))
    for h in handles:
        h.remove()
    missing = [r for r in readers if r not in feeds]
    if missing:
        raise ValueError(f"readers of {residual} that read no norm's output (not pre-norm blocks): {missing[:3]}")
    head_norm = None
    unfed = set(head_modules.values()) - set(feeds.values())
    if unfed:
        if len(unfed) != 1 or not layout.tie_compensator(next(iter(unfed))):
            raise ValueError(f"norms feeding modules that are no stored tensor: {sorted(unfed)}")
        head_norm = next(iter(unfed))

    # 2. The normalised stream's second moment at every norm input; the head norm's gain-free outputs.
    size = layout.spaces[residual].size
    moment = torch.zeros(size, size, dtype=torch.float64)
    head_rows, handles = [], []
    for n in norms:

        def hook(mod, args, n=n):
            x = args[0].detach().double().reshape(-1, size)
            xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps_of[n])
            moment.add_(xhat.T @ xhat)
            if n == head_norm:
                head_rows.append(xhat)

        handles.append(model.get_submodule(_module(n)).register_forward_pre_hook(hook))
    for begin in range(0, ids.numel(), CALIB_SEQUENCE):
        model(ids[begin : begin + CALIB_SEQUENCE].unsqueeze(0))
    for h in handles:
        h.remove()
    return Calibration(
        feeds=feeds,
        second_moment=moment,
        head_norm=head_norm,
        head_inputs=torch.cat(head_rows) if head_rows else None,
        tokens=int(ids.numel()),
    )


def fit_tied_gain(embedding: torch.Tensor, gain: torch.Tensor, z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """γ (d) minimising Σ_t ‖((z_t Q_d) ⊙ γ)(E Q_d)ᵀ − (z_t ⊙ g) Eᵀ‖² (see the module docstring)."""
    e = embedding.double()
    g = gain.double()
    z = z.double()
    gram = e.T @ e  # D × D
    a = z @ q  # T × d
    u = z * g
    m = q.T @ gram @ q
    lhs = m * (a.T @ a)
    rhs = (a * (u @ gram @ q)).sum(0)
    ridge = 1e-10 * lhs.diagonal().mean()
    return torch.linalg.solve(lhs + ridge * torch.eye(len(rhs), dtype=lhs.dtype), rhs)


def _rotate_axis(tensor: torch.Tensor, axis: int, q: torch.Tensor) -> torch.Tensor:
    moved = tensor.double().movedim(axis, -1)
    return (moved @ q).movedim(-1, axis)


def rotate(layout, weights: dict, calib: Calibration, q: torch.Tensor, target: int, untie: bool = False):
    """Full-size rotated weights (the first `target` rotated dimensions are the ones to keep), the config
    updates, and notes. Norm gains: folded into their readers and replaced by sqrt(D/target); the tied head's
    norm gets sqrt(D/target)·γ (fitted for the first `target` directions), or the head is untied."""
    residual = residual_space(layout)
    size = layout.spaces[residual].size
    scale = math.sqrt(size / target)
    q_kept = q[:, :target]
    out, updates, notes = {}, {}, []
    gains = {n: weights[n].double() for n in set(calib.feeds.values()) | {calib.head_norm} - {None}}
    head_name = None
    if calib.head_norm and untie:
        creates = [c for c in layout.rules.create if f"{residual}.in" in (c.transform.axes or [])]
        if len(creates) != 1 or target != size:
            raise ValueError("untie: needs exactly one rules `create` head and the full size (an exactness check)")
        head_name = creates[0].name
        out[head_name] = (weights[creates[0].source].double() * gains[calib.head_norm]) @ q
        updates[layout.rules.tie] = False
        notes.append(f"untied: {head_name} written ({out[head_name].numel():,} more parameters)")
    for name, tensor in weights.items():
        found = _residual_axis(layout, name, residual)
        if found is None:
            out[name] = tensor
            continue
        axis, role = found
        if role == "norm":
            new = torch.full_like(tensor.double(), scale)
        else:
            t = tensor.double()
            if name in calib.feeds:
                shape = [1] * t.dim()
                shape[axis] = size
                t = t * gains[calib.feeds[name]].reshape(shape)
            new = _rotate_axis(t, axis, q)
        out[name] = new
    if calib.head_norm and not untie:
        embedding = _tied_embedding(layout, weights, residual)
        gamma = fit_tied_gain(weights[embedding], gains[calib.head_norm], calib.head_inputs, q_kept)
        full = torch.ones(size, dtype=torch.float64)
        full[:target] = gamma
        out[calib.head_norm] = full * scale
        notes.append(
            f"tied head kept: {calib.head_norm} is a per-dimension gain fitted by least squares on the logits "
            f"({calib.head_inputs.shape[0]} calibration tokens)"
        )
    return {k: v.to(weights[k].dtype if k in weights else torch.float32) for k, v in out.items()}, updates, notes


def _tied_embedding(layout, weights: dict, residual: str) -> str:
    """The stored tensor that is also the head: the one writer of the residual with a non-residual first axis
    of the head's space (the embedding: [vocab, hidden])."""
    writers = [
        n
        for n in weights
        if weights[n].dim() == 2
        and (f := _residual_axis(layout, n, residual))
        and f == (1, "out")
        and not any(layout.spaces[s].per for _, s, _ in layout.roles(n))
    ]
    if len(writers) != 1:
        raise ValueError(f"cannot tell the tied embedding among {writers}")
    return writers[0]


def kept_fraction(values: torch.Tensor, target: int) -> float:
    """Share of the normalised stream's energy in the first `target` principal directions."""
    return float(values[:target].sum() / values.sum())
