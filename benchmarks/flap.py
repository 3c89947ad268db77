"""FLAP-style baseline for bench_down.py: fluctuation importance and bias compensation (An et al. 2024, FLAP,
arXiv 2312.11983), in stock architecture.

* Importance of a reader's input channel j: the fluctuation of the channel over the calibration tokens times
  the squared norm of the reader's column, S_j = Var_t(x_tj) · ‖W_:,j‖²; a unit (an FFN neuron, a head of
  head_dim channels) sums its channels. Scores are standardised per reader ((S − mean) / std) before the
  readers of one space are added. FLAP standardises so that it can compare layers and modules and give each
  layer its own width; the stock config has one width for all layers, so here every layer keeps the same
  count and the standardisation only weighs readers against each other (it does not change a single
  reader's ranking).
* Compensation: a removed channel's mean contribution goes into the reader's bias, b += W[:, removed] ·
  E_t[x_t, removed], so the layer's output keeps its mean.

Llama's down_proj and o_proj have no bias tensor, but its config has switches that add biases
(`mlp_bias`, `attention_bias`). Found generically: every false boolean config key with "bias" in its name is
switched on in an empty (meta-device) model, and the parameters it adds are listed; the switches that add a
bias to a compensated reader are turned on, the compensation goes where it belongs and every other added
bias is written as zeros. The added parameters are counted. Without such a switch, FLAP is skipped.
"""

from __future__ import annotations

from collections import defaultdict

import torch

CALIB_SEQUENCE = 256


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def parameter_shapes(config: dict) -> dict[str, tuple]:
    """Parameter names and shapes of the model `config` describes, built on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def bias_switches(config: dict) -> dict[str, set[str]]:
    """Each false boolean config key with 'bias' in its name -> the parameter names switching it on adds."""
    base = parameter_shapes(config)
    found = {}
    for key, value in config.items():
        if value is False and "bias" in key:
            added = set(parameter_shapes({**config, key: True})) - set(base)
            if added:
                found[key] = added
    return found


def compensated_readers(layout) -> list[str]:
    """Stored reader matrices (role `in` on axis 1) of a space that the level cuts."""
    return [
        name
        for name, match in layout.matches.items()
        if name.endswith(".weight")
        and any(
            axis == 1 and role == "in" and layout.spaces[s].target != layout.spaces[s].size
            for axis, s, role in match.roles()
        )
    ]


def skip_reason(layout, weights: dict, config: dict) -> str | None:
    readers = compensated_readers(layout)
    if not readers:
        return "the level cuts no reader's input"
    need = {_module(r) + ".bias" for r in readers} - set(weights)
    if not need:
        return None
    switches = bias_switches(config)
    covered = set().union(*switches.values()) if switches else set()
    if need - covered:
        return (
            f"no bias on pruned readers such as {sorted(need - covered)[0]} and no config switch that adds one "
            "to take FLAP's compensation"
        )
    return None


@torch.no_grad()
def input_statistics(layout, model, ids: torch.Tensor, readers: list[str]) -> dict[str, tuple]:
    """reader -> (mean, variance) of each input channel over the calibration tokens (float64)."""
    sums, squares, counts, handles = {}, {}, defaultdict(int), []
    for name in readers:

        def hook(module, inputs, name=name):
            x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.sum(0)
            squares[name] = squares.get(name, 0) + x.pow(2).sum(0)
            counts[name] += x.shape[0]

        handles.append(model.get_submodule(_module(name)).register_forward_pre_hook(hook))
    for begin in range(0, ids.numel(), CALIB_SEQUENCE):
        model(ids[begin : begin + CALIB_SEQUENCE].unsqueeze(0))
    for h in handles:
        h.remove()
    out = {}
    for name in readers:
        n = counts[name]
        mean = sums[name] / n
        out[name] = (mean, (squares[name] / n - mean.pow(2)).clamp_min(0) * n / max(n - 1, 1))
    return out


def fluctuation_scores(layout, weights: dict, stats: dict) -> dict:
    """(space, instance) -> per-unit score: Σ over readers of the standardised Σ_channels Var(x_j)·‖W_:,j‖²."""
    scores = {}
    for name, (_, variance) in stats.items():
        match = layout.matches[name]
        axis, space_name = next((a, s) for a, s, r in match.roles() if a == 1 and r == "in")
        space = layout.spaces[space_name]
        column = weights[name].double().pow(2).sum(0)
        per_unit = (variance * column).reshape(space.units, space.unit).sum(1)
        standard = (per_unit - per_unit.mean()) / per_unit.std().clamp_min(1e-30)
        key = (space_name, match.env.get(space.per) if space.per else None)
        scores[key] = scores[key] + standard if key in scores else standard
    return {k: v.float() for k, v in scores.items()}


def compensation(layout, weights: dict, stats: dict, keep: dict) -> dict[str, torch.Tensor]:
    """reader -> full-size bias: its own bias (if stored) + W[:, removed] · mean(x[:, removed])."""
    out = {}
    for name, (mean, _) in stats.items():
        match = layout.matches[name]
        space_name = next(s for a, s, r in match.roles() if a == 1 and r == "in")
        space = layout.spaces[space_name]
        units = keep[(space_name, match.env.get(space.per) if space.per else None)]
        kept = (torch.tensor(units)[:, None] * space.unit + torch.arange(space.unit)[None, :]).reshape(-1)
        removed = torch.ones(space.size, dtype=torch.bool)
        removed[kept] = False
        w = weights[name].double()
        bias = w[:, removed] @ mean[removed]
        stored = weights.get(_module(name) + ".bias")
        out[_module(name) + ".bias"] = bias + (stored.double() if stored is not None else 0)
    return out


def added_biases(small_config: dict, weights: dict, biases: dict) -> tuple[dict, dict, int]:
    """The switches to turn on, every tensor they add (compensation where computed, zeros elsewhere, in the
    small model's shapes), and the number of added parameters."""
    switches = bias_switches(small_config)
    wanted = {k: v for k, v in switches.items() if v & (set(biases) - set(weights))}
    updates = {k: True for k in wanted}
    shapes = parameter_shapes({**small_config, **updates})
    added = {}
    for name in sorted(set().union(*wanted.values()) if wanted else set()):
        if name in biases:
            if tuple(biases[name].shape) != shapes[name]:
                raise ValueError(f"{name}: compensation {tuple(biases[name].shape)} but the model has {shapes[name]}")
            added[name] = biases[name].float()
        else:
            added[name] = torch.zeros(shapes[name])
    return updates, added, sum(t.numel() for t in added.values())
