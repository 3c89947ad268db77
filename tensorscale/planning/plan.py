"""Plan a rewrite from headers alone: which rule each tensor matched, its ops, shapes, dtypes and shards.

A plan is complete before a byte of tensor data is read, so `plan` is a dry run of exactly what `up` will
do, and each output shard can later be produced on its own (in parallel, or on another machine).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

from ..errors import TensorscaleError
from ..ops.library import Op, Scale
from ..ops.rowmap import RowMap
from ..reading.describe import guess_component
from ..reading.safetensors_header import DTYPE_SIZES, FLOAT_DTYPES, TensorInfo
from ..reading.source import ModelSource
from ..rulebook.compile import Grow, Reduce, Space, compile_transform, resolve_spaces
from ..rulebook.evaluate import (
    UNIT_RATIOS,
    evaluate_let,
    evaluate_rules,
    first_failed_check,
    match_rule,
    render_name,
    replicate_count,
    rules_env,
    truthy,
)
from ..rulebook.expr import ExpressionError
from ..rulebook.layout import plan_layouts
from ..rulebook.schema import RuleSet, Transform
from ..rulebook.targets import TARGET_KEYS
from . import depth
from .completeness import check_complete

MIN_SNR_DB = -20  # noise 10x the weights' RMS; below that the zero-sum pairs cancel only up to rounding
MAX_TENSORS = 250_000  # tensors in one plan: dense checkpoints hold hundreds to thousands, MoE up to ~10^5
MAX_ADDED_LAYERS = 10_000
MAX_OUTPUT_BYTES = 2**50  # 1 PiB: beyond any disk; the free space itself is checked when the run starts

DTYPE_CHOICES = {"keep": None, "float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass(frozen=True, kw_only=True)
class ResizeOptions:
    """What the user asked for, in either direction: the seed, the storage dtype, the shard size and any target
    sizes (TARGET_KEYS key -> hidden/FFN size in dimensions, heads and kv heads in counts).

    Frozen, and `targets` is copied: planning reads options and never changes them, so one object may plan
    several times (a retie, a batch's workers) and a caller's dict is never aliased."""

    mode: ClassVar[str]  # "up" or "down": what the model card, the summary and the plan record
    seed: int = 0
    dtype: str = "keep"
    max_shard_size: int = 5 * 10**9
    targets: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "targets", dict(self.targets))

    def validate(self) -> None:
        """One line naming the option and the fix for the first value planning cannot use."""
        _check_counts((f"--{key.replace('_', '-')}" for key in self.targets), self.targets.values())
        unknown = set(self.targets) - set(TARGET_KEYS)
        if unknown:
            raise TensorscaleError(f"unknown target {sorted(unknown)[0]}")
        if self.dtype not in DTYPE_CHOICES:
            raise TensorscaleError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}")
        if self.max_shard_size <= 0:
            raise TensorscaleError("--max-shard-size must be positive")

    def recorded(self) -> dict:
        """The options as summaries, plans and manifests record them, with the same keys in both directions:
        `down` records up's neutral values (×1, no noise, the tie kept, strategy clone)."""
        up = self if isinstance(self, UpOptions) else UpOptions()
        return {
            "mode": self.mode,
            "embed_dim_multiplier": up.embed_dim_multiplier,
            "up_proj_multiplier": up.up_proj_multiplier,
            "snr_db": up.snr_db,
            "seed": self.seed,
            "untie_embeddings": up.untie_embeddings,
            "dtype": self.dtype,
            "max_shard_size": self.max_shard_size,
            "strategy": up.strategy,
            "targets": dict(self.targets),
        }


def _check_counts(flags, values) -> None:
    for flag, value in zip(flags, values):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TensorscaleError(f"{flag} must be a whole number >= 1, got {value!r}")


@dataclass(frozen=True)
class UpOptions(ResizeOptions):
    """`up`: HyperCloning's multipliers `n` (hidden and heads) and `m` (FFN), or target sizes at least the
    model's; noise, the untie, the strategy and depth growth are up's alone."""

    mode: ClassVar[str] = "up"
    embed_dim_multiplier: int = 1
    up_proj_multiplier: int = 1
    snr_db: float | None = field(default=None, kw_only=True)
    untie_embeddings: bool = field(default=False, kw_only=True)
    strategy: str = field(default="clone", kw_only=True)  # "clone" (HyperCloning / Net2Net) or "pad" (top-left)
    add_layers: int = field(default=0, kw_only=True)  # identity layers to insert
    insert_at: tuple[int, ...] | None = field(default=None, kw_only=True)  # source layers they go before
    duplicate_layers: str | None = field(default=None, kw_only=True)  # "START:END", SOLAR-style block copy

    def validate(self) -> None:
        _check_counts(
            ("--embed-dim-multiplier", "--up-proj-multiplier"), (self.embed_dim_multiplier, self.up_proj_multiplier)
        )
        super().validate()
        if self.strategy not in ("clone", "pad"):
            raise TensorscaleError(f"--strategy must be clone or pad, got {self.strategy!r}")
        if isinstance(self.add_layers, bool) or not isinstance(self.add_layers, int) or self.add_layers < 0:
            raise TensorscaleError(f"--add-layers must be a whole number >= 0, got {self.add_layers!r}")
        if self.add_layers > MAX_ADDED_LAYERS:
            raise TensorscaleError(f"--add-layers {self.add_layers:,} is more than {MAX_ADDED_LAYERS:,} layers")
        if self.snr_db is not None and not math.isfinite(self.snr_db):
            raise TensorscaleError("--snr-db must be a finite number of decibels")
        if self.snr_db is not None and self.snr_db < MIN_SNR_DB:
            raise TensorscaleError(
                f"--snr-db {self.snr_db:g} is below {MIN_SNR_DB} dB: noise that much louder than "
                "the weights drowns them in float32 rounding; use a value such as 20"
            )


@dataclass(frozen=True)
class DownOptions(ResizeOptions):
    """`down`: divisors (the mirror of up's multipliers), or target sizes at most the model's."""

    mode: ClassVar[str] = "down"
    embed_dim_divisor: int | None = None
    up_proj_divisor: int | None = None
    remove_layers: int = field(default=0, kw_only=True)  # layers to remove (ShortGPT-style depth cut)
    remove_at: tuple[int, ...] | None = field(default=None, kw_only=True)  # which; None: chosen by measurement

    def validate(self) -> None:
        given = [
            (flag, value)
            for flag, value in (
                ("--embed-dim-divisor", self.embed_dim_divisor),
                ("--up-proj-divisor", self.up_proj_divisor),
            )
            if value is not None
        ]
        _check_counts((flag for flag, _ in given), (value for _, value in given))
        super().validate()
        if self.targets and given:
            raise TensorscaleError("give either divisors or target sizes, not both")
        if isinstance(self.remove_layers, bool) or not isinstance(self.remove_layers, int) or self.remove_layers < 0:
            raise TensorscaleError(f"--remove-layers must be a whole number >= 0, got {self.remove_layers!r}")
        if self.remove_at is not None:
            if len(self.remove_at) != self.remove_layers:
                raise TensorscaleError(
                    f"--at names {len(self.remove_at)} layer(s) but --remove-layers asks for {self.remove_layers}"
                )
            if len(set(self.remove_at)) != len(self.remove_at):
                raise TensorscaleError(f"--at names a layer twice: {','.join(map(str, self.remove_at))}")


class UnitFolds(Protocol):
    """The clusterings a fold plan merges with (folding.fold.Folds), as planning sees them."""

    by_key: dict

    def lookup(self, space: Space, env: dict, where: str): ...


@dataclass(frozen=True)
class DownSection:
    """What `down` adds to a plan. `method` "fold": the clusterings the merges use and the head tensor dropped
    because the output is tied again. "refit": the folder of refitted tensors the plan writes from (the plan's
    `source` stays the real model, for provenance, side files and the input checks)."""

    method: Literal["fold", "refit"]
    folds: UnitFolds | None = None
    retied: str | None = None
    spill: ModelSource | None = None

    @property
    def exact(self) -> bool:
        """Whether every clustering merged only copies: the plan is then an exact inverse of `up`."""
        folds = self.folds.by_key.values() if self.folds is not None else []
        return bool(folds) and all(fold.exact for fold in folds)


@dataclass
class TensorPlan:
    name: str
    source: TensorInfo
    rule: str
    ops: list[Op]
    out_shape: tuple[int, ...]
    out_dtype: str
    component: str
    row_map: RowMap | None = None  # set when the tensor can stream in row chunks
    row_ops: list[Op] = field(default_factory=list)  # ops applied to each row chunk
    offset: int = 0  # byte offset inside its shard's data section

    @property
    def nbytes(self) -> int:
        return math.prod(self.out_shape) * DTYPE_SIZES[self.out_dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.out_shape)


@dataclass
class ShardPlan:
    filename: str
    tensors: list[TensorPlan]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class Plan:
    """Everything a rewrite needs, fixed before a byte is written. Frozen: a step that adds to it (the shards'
    metadata, refit's real source) makes a new Plan with dataclasses.replace."""

    source: ModelSource
    rules: RuleSet
    options: UpOptions | DownOptions
    env: dict
    spaces: dict[str, Space]
    config: dict
    tensors: list[TensorPlan]
    shards: list[ShardPlan]
    dropped: list[str] = field(default_factory=list)
    unused_rules: list[str] = field(default_factory=list)
    down: DownSection | None = None  # down: how the plan narrows (None for up)
    depth: depth.Layers | None = None  # up: the output layers when depth grows
    layouts: dict | None = None  # up: where each space's new units come from (rulebook.layout)
    notes: list[str] = field(default_factory=list)  # what the user should know (e.g. rounding in bf16)
    metadata: dict | None = None  # the shards' __metadata__ (string values); None: {"format": "pt"}
    nonfinite_inputs: set = field(default_factory=set)  # input tensors seen holding NaN/Inf while written

    @property
    def total_parameters(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def base_env(config: dict, options: ResizeOptions, ratios: dict | None = None) -> dict:
    """The environment rules see (rulebook.evaluate.rules_env) for these options: `up`'s multipliers unless
    `ratios` are given (down records up's neutral values: see ResizeOptions.recorded)."""
    recorded = options.recorded()
    if ratios is None:
        n = recorded["embed_dim_multiplier"]
        ratios = {"n": n, "m": recorded["up_proj_multiplier"], "nh": n, "nkv": n}
    return rules_env(config, ratios, snr_db=recorded["snr_db"], untie_embeddings=recorded["untie_embeddings"])


def down_ratios(rule_set: RuleSet, config: dict, options: DownOptions) -> dict:
    """Turn divisors or target sizes into the ratios n, m, nh, nkv, checking that each target is possible."""
    current = current_units(rule_set, config, options)
    if current["hidden_size"] is None or current["intermediate_size"] is None:
        raise TensorscaleError(f"rules {rule_set.name} name no 'hidden' and 'ffn' spaces, which down needs")
    wanted = dict(current)
    if options.targets:
        wanted.update(options.targets)
        if not has_kv_space(rule_set) and "num_attention_heads" in options.targets:
            wanted["num_key_value_heads"] = wanted["num_attention_heads"]  # multi-head: every head its own kv
    else:
        n, m = options.embed_dim_divisor or 1, options.up_proj_divisor or 1
        for key, divisor in (("hidden_size", n), ("num_attention_heads", n), ("intermediate_size", m)):
            if current[key] % divisor:
                raise TensorscaleError(f"{key} {current[key]} is not divisible by {divisor}; give target sizes instead")
            wanted[key] = current[key] // divisor
        kv = current["num_key_value_heads"]
        wanted["num_key_value_heads"] = kv // n if kv % n == 0 else (1 if kv == 1 else None)
        if wanted["num_key_value_heads"] is None:
            raise TensorscaleError(f"num_key_value_heads {kv} is not divisible by {n}; give target sizes instead")
    for key, value in wanted.items():
        if value > current[key]:
            raise TensorscaleError(
                f"--{key.replace('_', '-')} {value} is larger than the model's {current[key]}; use `up` to grow"
            )
    if wanted["num_attention_heads"] % wanted["num_key_value_heads"]:
        raise TensorscaleError(
            f"{wanted['num_attention_heads']} attention heads are not a multiple of {wanted['num_key_value_heads']} "
            "kv heads"
        )
    return {
        "n": wanted["hidden_size"] / current["hidden_size"],
        "m": wanted["intermediate_size"] / current["intermediate_size"],
        "nh": wanted["num_attention_heads"] / current["num_attention_heads"],
        "nkv": wanted["num_key_value_heads"] / current["num_key_value_heads"],
    }


def has_kv_space(rule_set: RuleSet) -> bool:
    """Whether the rules declare a space for kv heads apart from query heads (GQA); without one, each head
    is its own kv (current_units then counts as many kv heads as heads)."""
    return rule_set.targets.get("num_key_value_heads") in rule_set.spaces


def current_units(rule_set: RuleSet, config: dict, options: ResizeOptions) -> dict:
    """The model's size in each TARGET_KEYS key (hidden and FFN in dimensions, heads in counts), read from the
    spaces the rules file's `targets` name."""
    env = evaluate_let(rule_set, base_env(config, options, UNIT_RATIOS))
    spaces = resolve_spaces(rule_set, env)
    current = {key: (spaces[name].units if name in spaces else None) for key, name in rule_set.targets.items()}
    if current["num_key_value_heads"] is None:
        current["num_key_value_heads"] = current["num_attention_heads"]
    return current


def up_ratios(rule_set: RuleSet, config: dict, options: UpOptions) -> dict:
    """`up`'s ratios n, m, nh, nkv and n_tiles from the multipliers, overridden by any target sizes.

    A target may be any larger size; heads not given follow the hidden ratio where that gives whole counts.
    n_tiles is how many whole copies of the hidden state the result holds: n when tiling by a whole factor,
    its whole part when the rest is zero-padded (clone with a hidden size that is not a multiple), 1 for pad."""
    n, m = options.embed_dim_multiplier, options.up_proj_multiplier
    ratios = {"n": n, "m": m, "nh": n, "nkv": n}
    if options.targets:
        current = current_units(rule_set, config, options)
        for key, value in options.targets.items():
            if current.get(key) is None:
                raise TensorscaleError(f"rules {rule_set.name} have no space for --{key.replace('_', '-')}")
            if value < current[key]:
                raise TensorscaleError(
                    f"--{key.replace('_', '-')} {value} is smaller than the model's {current[key]}; use `down` to "
                    "shrink"
                )
        targets = options.targets
        if "hidden_size" in targets:
            ratios["n"] = targets["hidden_size"] / current["hidden_size"]
        if "intermediate_size" in targets:
            ratios["m"] = targets["intermediate_size"] / current["intermediate_size"]
        follow = ratios["n"]  # heads not given follow the hidden ratio (the multiplier's, if no hidden target)
        for key, ratio in (("num_attention_heads", "nh"), ("num_key_value_heads", "nkv")):
            if key in targets:
                ratios[ratio] = targets[key] / current[key]
            elif current[key] and abs(current[key] * follow - round(current[key] * follow)) > 1e-9:
                ratios[ratio] = 1  # the hidden ratio gives no whole count: keep the count
            else:
                ratios[ratio] = follow
        if "num_key_value_heads" not in targets and "num_attention_heads" in targets:
            # keep the query heads per kv head when the new count allows it, else keep the kv count
            group = current["num_attention_heads"] // current["num_key_value_heads"]
            wanted = targets["num_attention_heads"]
            kv = wanted // group if wanted % group == 0 else current["num_key_value_heads"]
            ratios["nkv"] = kv / current["num_key_value_heads"]
    if options.strategy == "pad":
        ratios["n_tiles"] = 1
    else:
        ratios["n_tiles"] = max(1, math.floor(ratios["n"] + 1e-9))
    return ratios


def evaluate_env(rule_set: RuleSet, config: dict, options: UpOptions | DownOptions) -> dict:
    if isinstance(options, DownOptions):
        ratios = down_ratios(rule_set, config, options)
    else:
        ratios = up_ratios(rule_set, config, options)
    return evaluate_rules(rule_set, base_env(config, options, ratios))


def rewrite_config(rule_set: RuleSet, config: dict, env: dict, options: ResizeOptions) -> dict:
    new = copy.deepcopy(config)
    for key, expression in rule_set.config:
        try:
            value = expression.evaluate(env)
        except ExpressionError as exc:
            raise TensorscaleError(f"{rule_set.path}: config.{key}: {exc}") from None
        if isinstance(value, float) and abs(value - round(value)) < 1e-6 and isinstance(config.get(key), int):
            value = int(round(value))  # down's ratios: 64 * (48/64) is 48, not 47.99999
        new[key] = value
    if options.dtype != "keep":
        for key in ("torch_dtype", "dtype"):
            if key in new or key == "dtype":
                new[key] = options.dtype
    return new


def _out_dtype(info: TensorInfo, options: ResizeOptions) -> str:
    wanted = DTYPE_CHOICES[options.dtype]
    if wanted is None or info.dtype not in FLOAT_DTYPES:
        return info.dtype
    return wanted


def _row_plan(tensor: TensorPlan) -> None:
    """Split the chain into a row map (axis-0 moves) and per-chunk ops, or leave it whole."""
    if not tensor.source.shape:
        return
    row_map = RowMap.identity(tensor.source.shape[0])
    rest = []
    for op in tensor.ops:
        if op.axis == 0:
            row_map = op.map_rows(row_map)
            if row_map is None:
                return
        else:
            rest.append(op)
    has_fill = any(seg.is_fill for seg in row_map.segments)
    if has_fill and any(op.arithmetic for op in rest):
        return
    tensor.row_map = row_map
    tensor.row_ops = rest


def pin_head_dim(config: dict, env: dict) -> None:
    """Heads keep their width when the residual stream is cut to a size the head count does not divide
    into it: write head_dim, which transformers otherwise derives as hidden_size // num_attention_heads."""
    head_dim = env.get("head_dim")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if (
        isinstance(head_dim, int)
        and isinstance(hidden, int)
        and isinstance(heads, int)
        and heads
        and config.get("head_dim") is None
        and hidden // heads != head_dim
    ):
        config["head_dim"] = head_dim


def checked_down_config(rule_set: RuleSet, config: dict, options: DownOptions) -> dict:
    """The config `down` writes at these sizes (head_dim pinned where heads keep their width), once the rules'
    own checks pass on it; else one line saying why the architecture cannot have them."""
    env = evaluate_env(rule_set, config, options)
    new = rewrite_config(rule_set, config, env, options)
    pin_head_dim(new, env)
    check_new_config(rule_set, new, resolve_spaces(rule_set, env), options)
    return new


def check_new_config(rule_set: RuleSet, new_config: dict, spaces: dict, options: ResizeOptions) -> None:
    """The rewritten config must describe the rewritten tensors: every space's size, read back from the new
    config, equals its planned size (e.g. hidden = heads × head_dim where the architecture derives it)."""
    env = evaluate_let(rule_set, base_env(new_config, options, UNIT_RATIOS))
    message = first_failed_check(rule_set.checks, env, None)
    if message is not None:
        raise TensorscaleError(f"these sizes are not possible for {rule_set.name}: {message}")
    again = resolve_spaces(rule_set, env)
    for name, space in spaces.items():
        if name in again and again[name].size != space.target:
            raise TensorscaleError(
                f"these sizes are not possible for {rule_set.name}: space {name} would be {space.target} in the "
                f"tensors but {again[name].size} by the new config (e.g. hidden_size must equal heads × head_dim); "
                "choose other targets"
            )


def build_plan(
    source: ModelSource, rule_set: RuleSet, options: UpOptions | DownOptions, down: DownSection | None = None
) -> Plan:
    """The full plan, for `up` (UpOptions) or for a fold `down` (DownOptions and the analysis's section: its
    folds turn roles into merges; its `retied` names a head tensor the analysis found equal to the embedding,
    so it is dropped and the output is tied again). Reads `options`, never changes them."""
    if isinstance(options, DownOptions) != (down is not None and down.folds is not None):
        raise ValueError("build_plan plans down from DownOptions with the analysis's folds, up from UpOptions")
    options.validate()
    env = evaluate_env(rule_set, source.config, options)
    check_complete(rule_set, source, env)
    spaces = resolve_spaces(rule_set, env)
    new_config = rewrite_config(rule_set, source.config, env, options)
    layers = None
    if isinstance(options, UpOptions):
        layers = depth.plan_layers(rule_set, source.config, env, options)  # None unless depth grows
    elif options.remove_layers:
        if options.remove_at is None:
            raise TensorscaleError(
                "a fold reads no text, so it cannot measure which layers matter: name them with --at "
                "(e.g. --at 12,14), or remove them with --method refit, which measures block influence"
            )
        layers = depth.removal_layers(rule_set, source.config, options.remove_at)
    depth.rewrite_config(rule_set, source.config, new_config, layers)
    folds = down.folds if down is not None else None
    retie = down.retied if down is not None else None
    if retie:
        new_config[rule_set.tie] = True
    check_new_config(rule_set, new_config, spaces, options)
    layouts = plan_layouts(spaces, options.strategy) if isinstance(options, UpOptions) else None
    # one walk over the axis roles for both directions; a refit writes from its spill, so it only copies
    direction = Reduce(folds) if folds is not None else Grow(layouts or plan_layouts(spaces, "clone"))

    tensors: list[TensorPlan] = []
    dropped: list[str] = []
    used = set()
    unmatched = []

    def add(name, info, rule_label, transform, component, rule_env, extra=()):
        where = f"{rule_label}, tensor {name}"
        ops = compile_transform(transform, info.shape, spaces, rule_env, where, direction)
        ops = [*ops, *extra]  # an identity layer's fills (planning.depth)
        shape = info.shape
        for op in ops:
            shape = op.out_shape(shape)
        plan = TensorPlan(
            name, info, rule_label, ops, shape, _out_dtype(info, options), component or guess_component(name)
        )
        _row_plan(plan)
        tensors.append(plan)

    creates_after: dict[str, list] = {}
    for create in rule_set.create:
        if create.when is not None and not truthy(create.when, env, rule_set.path):
            continue
        if create.name in source.tensors:
            continue
        if create.source not in source.tensors:
            raise TensorscaleError(
                f"{rule_set.path}: create {create.name} needs tensor {create.source}, which the checkpoint lacks"
            )
        creates_after.setdefault(create.source, []).append(create)

    # Rules match the source name (and see the source layer index); depth growth only renames and adds copies.
    for entry in depth.entries(source.tensors, rule_set, env, layers):
        name, info = entry.source, entry.info
        rule, rule_env = match_rule(rule_set, name, env)
        if rule is None:
            if rule_set.unmatched == "copy":
                add(entry.name, info, "unmatched (copied)", Transform(), None, env, entry.extra)
            elif entry.original:
                unmatched.append(name)
            continue
        used.add(rule.index)
        if rule.drop or name == retie:
            dropped.append(entry.name)
            continue
        if rule.replicate_count is not None and folds is not None:
            for out_name in _down_unit_names(rule, rule_env, spaces, folds, entry):
                add(out_name, info, rule.label, rule.transform, rule.component, rule_env, entry.extra)
        elif rule.replicate_count is not None:
            count = replicate_count(rule.replicate_count, rule_env, rule.label)
            for k in range(count):
                out_name = render_name(rule.replicate_name, {**rule_env, **entry.rename, "k": k}, rule.label)
                add(out_name, info, rule.label, rule.transform, rule.component, rule_env, entry.extra)
        else:
            add(entry.name, info, rule.label, rule.transform, rule.component, rule_env, entry.extra)
        for create in creates_after.get(name, []) if entry.original else []:
            add(create.name, info, f"create {create.name}", create.transform, create.component, env)
        if len(tensors) > MAX_TENSORS:
            raise TensorscaleError(
                f"the plan would write more than {MAX_TENSORS:,} tensors; check the rules' "
                "replicate counts and the depth options"
            )

    if unmatched:
        more = f" and {len(unmatched) - 1} more" if len(unmatched) > 1 else ""
        raise TensorscaleError(
            f"no rule in {rule_set.name} matches tensor {unmatched[0]!r}{more}; add a rule "
            "(or `unmatched: copy`) to the rules file; `tensorscale rules check` lists them all"
        )
    seen = set()
    for tensor in tensors:
        if tensor.name in seen:
            raise TensorscaleError(
                f"two rules write tensor {tensor.name!r}; fix the rules file's replicate/create names"
            )
        seen.add(tensor.name)

    total = sum(t.nbytes for t in tensors)
    if total > MAX_OUTPUT_BYTES:
        raise TensorscaleError(f"the output would be {total / 2**40:,.0f} TiB; check config.json and the size options")
    shards = layout_shards(tensors, options.max_shard_size)
    unused = [rule.label for rule in rule_set.tensors if rule.index not in used]
    return Plan(
        source,
        rule_set,
        options,
        env,
        spaces,
        new_config,
        tensors,
        shards,
        dropped,
        unused,
        down=down,
        depth=layers,
        layouts=layouts,
        notes=storage_notes(tensors),
    )


def _scales(ops):
    for op in ops:
        if isinstance(op, Scale):
            yield op
        for chain in getattr(op, "parts", None) or []:
            yield from _scales(chain)


def _inexact_scales(tensors: list[TensorPlan]) -> list[tuple[TensorPlan, Scale]]:
    inexact = []
    for tensor in tensors:
        if tensor.out_dtype not in ("BF16", "F16"):
            continue
        for op in _scales(tensor.ops):
            if op.factor and (op.offset or math.frexp(op.factor)[0] not in (0.5, -0.5)):  # 0·x + c is exact
                inexact.append((tensor, op))
                break
    return inexact


def inexact_storage(plan: "Plan") -> str | None:
    """'bfloat16' or 'float16' when that storage dtype rounds the function (see storage_notes), else None."""
    dtypes = {tensor.out_dtype for tensor, _ in _inexact_scales(plan.tensors)}
    return "bfloat16" if "BF16" in dtypes else ("float16" if dtypes else None)


def storage_notes(tensors: list[TensorPlan]) -> list[str]:
    """Say where a 16-bit storage dtype cannot hold the exact function: a gain or embedding scaled by a
    factor that is not a power of two (or shifted by an offset, as (1+w) gains are) is rounded entry by
    entry. Blocks that sum back (÷copies) are rounded with compensation and are not reported."""
    inexact = _inexact_scales(tensors)
    if not inexact:
        return []
    tensor, op = inexact[0]
    more = f" and {len(inexact) - 1} more tensor(s)" if len(inexact) > 1 else ""
    offset = f" with offset {op.offset:+.6g}" if op.offset else ""
    dtype = {"BF16": "bfloat16", "F16": "float16"}[tensor.out_dtype]
    return [
        f"not exact in {dtype}: {tensor.name}{more} scaled by {op.factor:.6g}{offset}, which rounds every entry "
        "(expect relative logit errors near 1e-3); --dtype float32 keeps the function exactly"
    ]


def _down_unit_names(rule, env, spaces, folds, entry) -> list[str]:
    """`down` of a tensor written once per unit (StableLM's per-head q/k norms, `replicate.unit_of`): the
    mirror of `up`'s copies. Output unit j takes the tensor of its cluster's representative (the first
    member; on a HyperCloned model all members are copies, so their tensors are equal), under the name the
    template gives unit j; the other source units' tensors are not written."""
    if rule.replicate_unit_of is None:
        raise TensorscaleError(
            f"{rule.label}: down cannot fold a tensor written per unit without replicate.unit_of "
            "(the space whose units the regex group h counts) in the rules file"
        )
    space = spaces[rule.replicate_unit_of]
    if space.target == space.size:
        return [entry.name]
    try:
        unit = int(env["h"])
    except (KeyError, TypeError, ValueError):
        raise TensorscaleError(
            f"{rule.label}: replicate.unit_of needs the unit index as the regex group (?P<h>...)"
        ) from None
    representatives = folds.lookup(space, env, rule.label).representatives()
    return [
        render_name(rule.replicate_name, {**env, **entry.rename, "h": j, "k": 0}, rule.label)
        for j, source in enumerate(representatives)
        if source == unit
    ]


def layout_shards(tensors: list[TensorPlan], max_shard_size: int) -> list[ShardPlan]:
    """Fill shards in order up to max_shard_size bytes (a tensor larger than that gets a shard alone)."""
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    total = len(groups)
    shards = []
    for i, group in enumerate(groups):
        filename = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        offset = 0
        for tensor in group:
            tensor.offset = offset
            offset += tensor.nbytes
        shards.append(ShardPlan(filename, group))
    return shards


SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal, as huggingface_hub), '512MiB' -> binary; a bare number is bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in SIZE_UNITS:
        raise TensorscaleError(f"cannot read size {text!r}; write it like 5GB, 500MB or 2GiB")
    value = int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])
    if value <= 0:
        raise TensorscaleError(f"size {text!r} must be positive")
    return value
