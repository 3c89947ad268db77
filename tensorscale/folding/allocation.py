"""`down --reduction 25%` / `--params 100M`: turn a parameter budget into target sizes.

Parameters are counted from the rules alone (headers only): every tensor's size is the product of its
axes, and an axis in a space shrinks with that space's target. Cuts are allocated in the order that
measured cheapest per parameter on a real pretrained model (SmolLM2-135M, `down --method refit`,
benchmarks/down_variants.py, held-out ppl ratio on the Python library reference / the license texts / GNU
manuals; benchmarks/README.md).

A residual stream that refit rotates (an RMSNorm stream: folding.rotation): the FFN to FFN_ROTATED_FLOOR of its
width, then the hidden size to HIDDEN_FLOOR, then query heads inside their kv groups, down to HEADS_FLOOR, then
the FFN further. While only the FFN is cut, refit's readers reproduce the original weights on their own inputs
(its `self` target), which made the FFN alone the better cut down to -40%: at -27% FFN 832 x1.62 / x3.89 / x2.01
against hidden 540 + FFN 960 x1.77 / x3.88; at -40% FFN 512 x2.34 / x7.16 / x3.89 against hidden 540 + FFN 576
x2.60 / x7.31 / x3.80. Beyond that the rotated stream is cheaper than heads or a narrower FFN: at -50% hidden
468 + FFN 512 x4.37 / x12.0 / x6.56 against x5.55 / x16.2 / x7.88 with heads 9 -> 6 (hidden 504, FFN 512) and
x4.84 / x12.3 / x6.73 for hidden 432 + FFN 640.

A stream refit only selects dimensions of (LayerNorm) costs more to narrow: the FFN first, down to FFN_FLOOR
(FFN only at -24.7%: x1.64 / x3.69, against x3.12 / x7.26 for FFN 1024 with heads 9 -> 6 and x2.32 / x5.22 for
FFN 1024 with 3 layers removed; these measured keeping dimensions); then the heads, then the hidden size.

Last, the FFN gets back what a coarse step overshot. Layers are removed only when the user asks
(--remove-layers; they then count towards the budget): on that model depth cost more than width at -25% and
-40%. Sizes the user gave are kept; only the others are chosen. Where the hidden size is heads × head_dim
(GPT-2, GPT-NeoX, OPT), whole heads are cut with it.
"""

from __future__ import annotations

import math
import re

from ..errors import TensorscaleError

FFN_FLOOR = 0.25  # the FFN keeps at least this share of its width before other axes are cut (measured
# cheaper than any other axis down to 1/3; 1/4 is below what was measured)
FFN_ROTATED_FLOOR = 1 / 3  # a rotated stream: the FFN's share before the hidden size is cut
HEADS_FLOOR = 2 / 3  # query heads kept per kv group, at least, before other axes are cut
HIDDEN_FLOOR = 0.5
FFN_STEP = 64  # widths are multiples of this (and hidden of the head count), as hardware likes them


def parse_budget(reduction, params, total: int) -> int:
    """The parameter count wanted, from "25%" / "0.25" or "100M" / "1.2B" / "135000000"."""
    if (reduction is None) == (params is None):
        raise TensorscaleError("give one budget: --reduction P% or --params N")
    if reduction is not None:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%?)\s*", str(reduction))
        if not match:
            raise TensorscaleError(f"cannot read --reduction {reduction!r}; write it like 25%")
        share = float(match.group(1)) / (100 if match.group(2) or float(match.group(1)) > 1 else 1)
        if not 0 < share < 1:
            raise TensorscaleError(f"--reduction {reduction} must be between 0% and 100%")
        return int(total * (1 - share))
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBkmb]?)\s*", str(params))
    if not match:
        raise TensorscaleError(f"cannot read --params {params!r}; write it like 100M or 1.2B")
    wanted = int(float(match.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[match.group(2).upper()])
    if not 0 < wanted < total:
        raise TensorscaleError(
            f"--params {params}: the model has {total:,} parameters; ask for fewer (and more than 0)"
        )
    return wanted


class Counter:
    """Parameters of the model at given target sizes, from the rules' axis roles and the headers."""

    def __init__(self, source_label: str, rules_path: str | None, remove_layers: int = 0):
        from ..planning.plan import DownOptions, current_units, evaluate_env
        from ..reading.source import open_source
        from ..rulebook.compile import resolve_spaces
        from ..rulebook.registry import resolve_rules

        self.source = open_source(source_label, headers_only=True)
        self.rules = resolve_rules(self.source.config, rules_path)
        self.current = current_units(self.rules, self.source.config, DownOptions())
        depth = self.rules.depth
        count = self.source.config.get(depth.count) if depth is not None else None
        if remove_layers and not (isinstance(count, int) and not isinstance(count, bool) and count > remove_layers):
            raise TensorscaleError(
                f"--remove-layers {remove_layers} needs a model with more layers (its rules' depth section "
                f"counts {count!r})"
            )
        # a removed layer takes its share of every per-layer tensor with it
        self.layer_share = (count - remove_layers) / count if remove_layers else 1.0
        self.group = depth.group if depth is not None else None
        self.spaces = resolve_spaces(self.rules, evaluate_env(self.rules, self.source.config, DownOptions()))

    def count(self, targets: dict, removal: bool = True) -> int:
        """Parameters at `targets`, with the removed layers gone (removal=False: all layers)."""
        from ..planning.plan import DownOptions, evaluate_env
        from ..rulebook.compile import resolve_spaces
        from .analysis import match_all

        options = DownOptions(
            targets={k: v for k, v in targets.items() if v != self.current[k]}
            or {"hidden_size": self.current["hidden_size"]}
        )
        env = evaluate_env(self.rules, self.source.config, options)
        spaces = resolve_spaces(self.rules, env)
        total = 0
        matched = set()
        for match in match_all(self.source, self.rules, env):
            matched.add(match.name)
            numel = 1
            for axis, size in enumerate(match.info.shape):
                numel *= size
            for axis, name, _ in match.roles():
                space = spaces[name]
                numel = numel // match.info.shape[axis] * (match.info.shape[axis] * space.target // space.size)
            if removal and self.group is not None and isinstance(match.env.get(self.group), int):
                numel = numel * self.layer_share
            total += numel
        total += sum(info.numel for name, info in self.source.tensors.items() if name not in matched)
        return int(total)

    def rotatable(self) -> bool:
        """Whether refit rotates this residual stream rather than selecting its dimensions (an RMSNorm stream
        of single-dimension units; folding.layerwise). A stream with post-norms (OLMo-2, Gemma-2) is found
        to need selection only in refit's first pass, from activations: it is counted as rotatable here."""
        space = next((s for s in self.spaces.values() if s.name == self.rules.targets.get("hidden_size")), None)
        return space is not None and space.norm in ("rms", "rms_one_plus") and space.unit == 1

    def possible(self, targets: dict) -> bool:
        """Whether the architecture can have these sizes, by its rules' checks on the new config (GPT-2's
        hidden size is always heads × head_dim)."""
        from ..planning.plan import DownOptions, checked_down_config

        options = DownOptions(targets={k: v for k, v in targets.items() if v != self.current[k]})
        try:
            checked_down_config(self.rules, self.source.config, options)  # as down writes it
        except TensorscaleError:
            return False
        return True


def allocate_budget(
    source_label: str, rules_path, given: dict, reduction, params, edd=None, upd=None, remove_layers: int = 0
) -> dict:
    """Target sizes within the budget; the user's own targets stay as given, and layers the user removes
    count towards it (the widths are cut only as far as the rest of the budget needs)."""
    if edd is not None or upd is not None:
        raise TensorscaleError("give either a budget (--reduction/--params) or divisors, not both")
    counter = Counter(source_label, rules_path, remove_layers)
    current = counter.current
    total = counter.count(dict(current), removal=False)
    wanted = parse_budget(reduction, params, total)
    targets = {key: (given.get(key) if given.get(key) is not None else value) for key, value in current.items()}
    fixed = {key for key, value in given.items() if value is not None}

    def fits():
        return counter.count(targets) <= wanted

    def shrink(key, floor, step):
        while not fits() and key not in fixed and targets[key] - step >= floor:
            targets[key] -= step
        return fits()

    def shrink_hidden(floor):
        """Hidden sizes that every head count divides (transformers checks hidden % heads): the output's
        and the one refit runs while it re-solves a layer (every query head of the kept kv groups), in steps
        of 4·lcm(those) so that the width stays a multiple of 4. Where the architecture ties the hidden size
        to heads × head_dim (GPT-2, GPT-NeoX, OPT), the heads are cut with it, in whole heads."""
        if "hidden_size" in fixed:
            return fits()
        if not coupled:
            working_heads = targets["num_key_value_heads"] * group
            step = 4 * math.lcm(targets["num_attention_heads"], working_heads)
            while not fits() and targets["hidden_size"] - step >= floor:
                targets["hidden_size"] = (targets["hidden_size"] - 1) // step * step
            return fits()
        head_width = current["hidden_size"] // heads
        while not fits() and targets["num_attention_heads"] - kv_step >= 1:
            trial = dict(targets, num_attention_heads=targets["num_attention_heads"] - kv_step)
            trial["hidden_size"] = trial["num_attention_heads"] * head_width
            trial["num_key_value_heads"] = trial["num_attention_heads"] // group
            if trial["hidden_size"] < floor or not counter.possible(trial):
                break
            targets.update(trial)
        return fits()

    heads, kv = current["num_attention_heads"], current["num_key_value_heads"]
    group = heads // kv if kv else 1
    kv_step = group  # whole kv groups
    # the hidden size cannot move on its own where it is heads × head_dim: a step of one head count says so
    coupled = not counter.possible(dict(current, hidden_size=current["hidden_size"] - 4 * math.lcm(heads, group)))
    ffn_step = FFN_STEP if current["intermediate_size"] % FFN_STEP == 0 else 1
    ffn, hidden = current["intermediate_size"], current["hidden_size"]

    def heads_stage():
        return shrink(
            "num_attention_heads",
            max(targets["num_key_value_heads"], int(heads * HEADS_FLOOR + 0.999)),
            targets["num_key_value_heads"],
        )

    if counter.rotatable():
        stages = [
            lambda: shrink("intermediate_size", int(ffn * FFN_ROTATED_FLOOR), ffn_step),
            lambda: shrink_hidden(int(hidden * HIDDEN_FLOOR)),
            heads_stage,
        ]
    else:
        stages = [
            lambda: shrink("intermediate_size", int(ffn * FFN_FLOOR), ffn_step),
            heads_stage,
            lambda: shrink_hidden(int(hidden * HIDDEN_FLOOR)),
        ]
    stages.append(lambda: shrink("intermediate_size", ffn_step, ffn_step))
    for stage in stages:
        if stage():
            break
    if not fits():
        raise TensorscaleError(f"cannot reach {wanted:,} parameters within what the architecture allows; ask for less")
    # a coarse step (the hidden size moves in multiples of the head counts) can overshoot the budget: give
    # the FFN back what still fits
    while "intermediate_size" not in fixed and targets["intermediate_size"] + ffn_step <= current["intermediate_size"]:
        targets["intermediate_size"] += ffn_step
        if not fits():
            targets["intermediate_size"] -= ffn_step
            break
    from ..planning.plan import has_kv_space

    if not has_kv_space(counter.rules):  # multi-head: no kv heads to name
        targets.pop("num_key_value_heads")
    return {key: value for key, value in targets.items() if value != current[key]}
