"""Evaluate a rules file against one model: the environment its expressions see, ``let``, ``checks``, and
which tensor rule a tensor matches.

This is rulebook logic, kept here so that everything that reads rules (``rules check``, planning, the
``down`` analysis) shares one copy, and so that the rulebook never imports the planning that builds on it.
"""

from __future__ import annotations

from ..errors import TensorscaleError
from .expr import ExpressionError
from .schema import RuleSet, render_template

# The growth ratios of a model rewritten to its own size: what `rules check` and the size read-back see.
UNIT_RATIOS = {"n": 1, "m": 1, "nh": 1, "nkv": 1}
MAX_REPLICATE = 65_536  # copies one tensor rule may write


def rules_env(config: dict, ratios: dict, *, snr_db=None, untie_embeddings: bool = False) -> dict:
    """Config fields plus the options rules see: n (hidden), m (FFN), nh (heads), nkv (kv heads) as growth
    ratios (new size / old size), n_tiles, snr_db and untie_embeddings."""
    env = {
        key: value for key, value in config.items() if isinstance(value, (int, float, str, bool, list)) or value is None
    }
    ratios = dict(ratios)
    # n_tiles: how many whole copies of the source hidden state the new one holds (a tied head sums them).
    # Tiling: n. Down: n too (a fraction). Zero-padding: 1; any width: the whole part of n, the rest padded.
    ratios.setdefault("n_tiles", ratios["n"])
    env.update(ratios, snr_db=snr_db, untie_embeddings=untie_embeddings)
    return env


def evaluate_let(rule_set: RuleSet, env: dict) -> dict:
    """Add the rules file's `let` values to `env`, in order (each sees the ones above it)."""
    for name, expression in rule_set.let:
        try:
            env[name] = expression.evaluate(env)
        except ExpressionError as exc:
            raise TensorscaleError(f"{rule_set.path}: let.{name}: {exc}") from None
    return env


def first_failed_check(checks, env: dict, where: str | None) -> str | None:
    """The message of the first (assertion, message) that does not hold, or None. An assertion that cannot
    be evaluated is an error in the rules file, named by `where`; with `where` None it counts as failed
    (a size read back from a rewritten config that the rules cannot even evaluate is not possible)."""
    for expression, message in checks:
        try:
            ok = expression.evaluate(env)
        except ExpressionError as exc:
            if where is None:
                return message
            raise TensorscaleError(f"{where} {expression.source!r}: {exc}") from None
        if not ok:
            return message
    return None


def evaluate_rules(rule_set: RuleSet, env: dict) -> dict:
    """`env` with the `let` values added, once every check holds; a failed check is one line naming it."""
    evaluate_let(rule_set, env)
    message = first_failed_check(rule_set.checks, env, f"{rule_set.path}: check")
    if message is not None:
        raise TensorscaleError(f"{message} (rules {rule_set.name})")
    return env


def match_rule(rule_set: RuleSet, name: str, env: dict):
    """The first rule whose regex fully matches `name` and whose `when` holds, with the regex groups
    added to the environment; (None, env) when no rule applies."""
    for candidate in rule_set.tensors:
        match = candidate.regex.fullmatch(name)
        if not match:
            continue
        rule_env = _group_env(env, match)
        if candidate.when is not None and not truthy(candidate.when, rule_env, f"{rule_set.path}: {candidate.label}"):
            continue
        return candidate, rule_env
    return None, env


def _group_env(env: dict, match) -> dict:
    groups = {}
    for key, value in match.groupdict().items():
        if value is not None:
            groups[key] = int(value) if value.isdigit() else value
    return {**env, **groups}


def truthy(expression, env, where) -> bool:
    """A `when` condition, evaluated."""
    try:
        return bool(expression.evaluate(env))
    except ExpressionError as exc:
        raise TensorscaleError(f"{where}: when: {exc}") from None


def replicate_count(expression, env, where) -> int:
    """A rule's `replicate.count`: a whole number of copies, bounded."""
    try:
        value = expression.evaluate(env)
    except ExpressionError as exc:
        raise TensorscaleError(f"{where}: replicate.count: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TensorscaleError(f"{where}: replicate.count must be a whole number >= 0, got {value!r}")
    if value > MAX_REPLICATE:
        raise TensorscaleError(
            f"{where}: replicate.count {value:,} is more than the {MAX_REPLICATE:,} copies "
            "a rule may write (per-head tensors of the widest model need a few hundred)"
        )
    return value


def render_name(template, env, where) -> str:
    """A tensor name from a `replicate.name` template."""
    try:
        return render_template(template, env)
    except ExpressionError as exc:
        raise TensorscaleError(f"{where}: name template: {exc}") from None


# The growth ratios (new size / old size) rules see. `down` runs the same rules with them below 1.
RATIO_NAMES = ("n", "m", "nh", "nkv", "n_tiles")


def inverted(ratios: dict) -> dict:
    """The ratios of the `down` that undoes a rewrite with `ratios`: every growth ratio r is 1/r."""
    return {key: (1 / value if key in RATIO_NAMES and value else value) for key, value in ratios.items()}


def scale_inverts(rule_set: RuleSet, transform, config: dict, ratios: dict, **options) -> bool:
    """The rule that lets one rules file drive `up` and `down`: a tensor rule's scale, evaluated with the
    ratios inverted (n -> 1/n, as `down` evaluates it, `let` values included), undoes the scale at n.
    `1 / n_tiles` and `1 / sqrt(n)` do; `1 / n + 1` does not. With an offset (y = x·c + o; (1+w) gains
    have o = c − 1) the two affine maps must compose to the identity: c·c' = 1 and o·c' + o' = 0."""

    def affine(env):
        factor = 1 if transform.scale is None else transform.scale.evaluate(env)
        offset = 0 if transform.scale_offset is None else transform.scale_offset.evaluate(env)
        return float(factor), float(offset)

    up = evaluate_let(rule_set, rules_env(config, ratios, **options))
    down = evaluate_let(rule_set, rules_env(config, inverted(ratios), **options))
    (c, o), (c_back, o_back) = affine(up), affine(down)
    return abs(c * c_back - 1) < 1e-9 and abs(o * c_back + o_back) < 1e-9
