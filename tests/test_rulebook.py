"""The rulebook as data: the roles table, the scale rule that lets one file drive up and down, and the
import direction (the rulebook is read by planning, folding and the CLI, and reads none of them)."""

from __future__ import annotations

import pathlib

import pytest
from fixtures import TINY

from tensorscale.folding.fold import Fold
from tensorscale.ops.library import Gather, Interleave, Merge, OpContext, Tile, TileDivide
from tensorscale.rulebook.compile import Space, _grow_leaf
from tensorscale.rulebook.evaluate import scale_inverts
from tensorscale.rulebook.layout import plan_layouts
from tensorscale.rulebook.registry import shipped_rules
from tensorscale.rulebook.roles import REDUCE_SCALES, REDUCE_WEIGHTS, ROLE_OPS, Role, role_label, split_role
from tensorscale.rulebook.schema import load_rules_text

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tensorscale"


def _labels(axes):
    for label in axes or []:
        if isinstance(label, list):
            yield from _labels(label)
        elif label != "-":
            yield label


def test_every_role_has_an_expand_and_a_reduce_op():
    assert set(ROLE_OPS) == set(Role)
    for role, ops in ROLE_OPS.items():
        assert ops.expand_op("tile") in ("tile", "tile_divide") and ops.expand_op("interleave")
        assert ops.reduce_weights in REDUCE_WEIGHTS and ops.reduce_scale in REDUCE_SCALES
        assert split_role(role_label("hidden", role)) == ("hidden", role)
    # A reader's copies are ÷copies in up, so down sums them; a writer's copies are averaged back.
    assert ROLE_OPS[Role.IN].divides and ROLE_OPS[Role.IN].reduce_weights == "sum"
    assert not ROLE_OPS[Role.OUT].divides and ROLE_OPS[Role.OUT].reduce_weights == "mean"


def test_every_role_used_by_a_shipped_rules_file_is_in_the_table():
    used = set()
    for rule_set in shipped_rules().values():
        for rule in [*rule_set.tensors, *rule_set.create]:
            for label in _labels(rule.transform.axes):
                space, role = split_role(label)
                assert space in rule_set.spaces, (rule_set.name, label)
                used.add(role)
    assert used == set(Role)  # and no role of the table is unused


# A reader of a `clone: interleave` space gets its copies side by side too (a dividing Gather), where the
# writer's Interleave put them: before, it got TileDivide's blocks, and down(up(M)) was not M.
@pytest.mark.parametrize("clone", ["tile", "interleave"])
def test_the_table_drives_up_and_its_reduce_op_undoes_it(clone):
    space = Space("hidden", 4, 8, 1, clone, scaled=True, norm="rms")
    leaf = _grow_leaf({"snr_db": None}, "test", plan_layouts({"hidden": space}, "clone"))
    interleaved = clone == "interleave"
    expected = {
        Role.OUT: Interleave if interleaved else Tile,
        Role.IN: Gather if interleaved else TileDivide,
        Role.NORM: Interleave if interleaved else Tile,
    }
    fold = Fold([j // 2 if clone == "interleave" else j % 4 for j in range(8)], 4)
    merged = Space("hidden", 8, 4, 1, clone, scaled=True, norm="rms")
    import torch

    ctx = OpContext(torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    for role in Role:
        (op,) = leaf(space, role, 0)
        assert type(op) is expected[role]
        reduce = fold.merge_op(0, role, merged)
        assert isinstance(reduce, Merge) and reduce.label == f"hidden.{role.value}"
        # the S of an RMS-scaled space: copies are exact, so S = 1 per cluster and down∘up is the identity
        torch.testing.assert_close(reduce.apply(op.apply(x, ctx, 0), ctx, 1).double(), x, rtol=1e-6, atol=1e-6)


def _configs():
    from transformers import AutoConfig

    for name, rule_set in sorted(shipped_rules().items()):
        model_type = rule_set.detect_model_types[0]
        yield name, rule_set, AutoConfig.for_model(model_type, **TINY[model_type]).to_dict()


def test_every_shipped_scale_inverts_itself_at_one_over_n():
    """down evaluates a rule's scale with the ratios below 1; it must undo up's (see scale_inverts)."""
    checked = 0
    for name, rule_set, config in _configs():
        for n, tie in ((2, True), (3, False), (4, True)):
            ratios = {"n": n, "m": 2, "nh": n, "nkv": n}
            for rule in [*rule_set.tensors, *rule_set.create]:
                if rule.transform.scale is not None:
                    assert scale_inverts(rule_set, rule.transform, config, ratios, untie_embeddings=not tie), (
                        name,
                        rule,
                    )
                    checked += 1
    assert checked > 20


def test_a_scale_that_does_not_invert_itself_is_caught():
    rules = load_rules_text(
        "name: t\nlet: {g: 'sqrt(n)'}\nspaces: {hidden: {size: 4, grow: n}}\ntensors:\n"
        "  - {match: a, axes: [hidden], scale: '1 / n + 1'}\n"
        "  - {match: b, axes: [hidden], scale: {factor: '1 / g', offset: '1 / g - 1'}}\n"
        "  - {match: c, axes: [hidden], scale: {factor: '1 / n', offset: '0.5'}}\n"
    )
    ratios = {"n": 2, "m": 1, "nh": 2, "nkv": 2}
    assert [scale_inverts(rules, rule.transform, {}, ratios) for rule in rules.tensors] == [False, True, False]


# ---- extends -------------------------------------------------------------------------------------------

from tensorscale.rulebook import schema  # noqa: E402
from tensorscale.rulebook.extends import merge  # noqa: E402
from tensorscale.rulebook.registry import resolved_text, shipped_text  # noqa: E402
from tensorscale.rulebook.schema import RulesError  # noqa: E402

BASE = {
    "name": "base",
    "detect": {"model_type": ["base"]},
    "let": {"a": "1", "b": "a + 1"},
    "checks": [{"assert": "a == 1"}],
    "spaces": {"hidden": {"size": "h", "grow": "n"}, "ffn": {"size": "f", "grow": "m"}},
    "config": {"h": "h * n", "f": "f * m", "head_dim": "head_dim"},
    "tensors": [
        {"match": "x", "axes": ["hidden"]},
        {"match": "y", "when": "t", "axes": ["hidden.in"], "scale": "1 / n"},
        {"match": "y", "axes": ["hidden.in"]},
        {"match": "z", "axes": ["ffn"]},
    ],
    "create": [{"name": "c", "from": "x", "axes": ["hidden"]}],
    "depth": {"count": "layers", "lists": ["a"], "identity": [{"match": "x", "fill": 0}]},
}


def test_extends_merges_mappings_by_key_extends_checks_and_merges_rules_in_place():
    refining = {
        "name": "mine",
        "extends": "base",
        "let": {"b": "a + 2", "c": "b"},  # replaced in place, added after
        "checks": [{"assert": "b == 3"}],
        "spaces": {"ffn": {"size": "f", "grow": "m", "per": "layer"}},  # a space is replaced whole
        "config": {"head_dim": None},  # null removes the base's key
        "tensors": [
            {"match": "y", "when": "t", "axes": ["hidden.in"]},  # same match and when: replaced in place
            {"match": "x", "omit": True},
            {"match": "w", "after": "y", "axes": ["-"]},  # after the base's last rule matching y
            {"match": "v", "axes": ["-"]},
        ],
        "depth": {"lists": ["b"]},
        "unmatched": "copy",
    }
    merged = merge(BASE, refining, "mine.yaml")
    assert merged["name"] == "mine" and "detect" not in merged and "extends" not in merged
    assert list(merged["let"].items()) == [("a", "1"), ("b", "a + 2"), ("c", "b")]
    assert merged["checks"] == [{"assert": "a == 1"}, {"assert": "b == 3"}]
    assert merged["spaces"]["ffn"] == {"size": "f", "grow": "m", "per": "layer"} and "hidden" in merged["spaces"]
    assert list(merged["config"]) == ["h", "f"]
    assert merged["tensors"] == [
        {"match": "y", "when": "t", "axes": ["hidden.in"]},
        {"match": "y", "axes": ["hidden.in"]},
        {"match": "w", "axes": ["-"]},
        {"match": "z", "axes": ["ffn"]},
        {"match": "v", "axes": ["-"]},
    ]
    assert merged["create"] == BASE["create"] and merged["unmatched"] == "copy"
    assert merged["depth"] == {"count": "layers", "lists": ["b"], "identity": [{"match": "x", "fill": 0}]}
    assert BASE["let"] == {"a": "1", "b": "a + 1"} and len(BASE["tensors"]) == 4  # the base is not changed


def _bases(files):
    return lambda name: __import__("copy").deepcopy(files.get(name))


@pytest.mark.parametrize(
    "files, text, words",
    [
        ({}, "name: mine\nextends: nope\n", ["mine.yaml: extends 'nope' names no shipped rules file", "rules list"]),
        (
            {"a": {"extends": "b"}, "b": {"extends": "a"}},
            "name: mine\nextends: a\n",
            ["mine.yaml (through rules/b.yaml): extends cycle a -> b -> a", "remove the extends"],
        ),
        (
            {"a": {"extends": "a"}},
            "name: mine\nextends: a\n",
            ["mine.yaml (through rules/a.yaml): extends cycle a -> a"],
        ),
        ({}, "name: mine\nextends: [a]\n", ["mine.yaml: extends must name a shipped rules file"]),
        (
            {"a": BASE},
            "name: mine\nextends: a\ntensors:\n  - {match: q, omit: true}\n",
            ["mine.yaml: tensors[0]: omit: true removes a base rule, but the base has none"],
        ),
        (
            {"a": BASE},
            "name: mine\nextends: a\ntensors:\n  - {match: q, after: nothing, axes: ['-']}\n",
            ["mine.yaml: tensors[0]: after 'nothing' matches no base rule"],
        ),
    ],
)
def test_extends_errors_are_one_line_naming_the_file_and_the_fix(monkeypatch, files, text, words):
    monkeypatch.setattr(schema, "shipped_data", _bases(files))
    with pytest.raises(RulesError) as caught:
        schema.load_rules_text(text, "mine.yaml")
    message = str(caught.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_a_users_file_extends_a_shipped_base():
    mine = schema.load_rules_text(
        "name: mine\ndetect: {model_type: [mine]}\nextends: llama\nlet: {tied: 'true'}\n", "mine.yaml"
    )
    llama = shipped_rules()["llama"]
    assert mine.name == "mine" and mine.detect_model_types == ["mine"]
    assert [r.pattern for r in mine.tensors] == [r.pattern for r in llama.tensors]
    assert dict(mine.let)["tied"].source == "true" and [c.message for c in mine.checks] == [
        c.message for c in llama.checks
    ]


def test_the_decoder_family_extends_one_base_and_bases_are_not_architectures():
    family = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2"}
    assert {name for name in shipped_rules() if "extends: _decoder" in shipped_text(name)} == family
    assert not any(name.startswith("_") for name in shipped_rules())
    assert "tensors:" in shipped_text("_decoder")


@pytest.mark.parametrize("name", sorted(shipped_rules()))
def test_rules_show_resolved_is_the_complete_file_the_engine_reads(name, tmp_path):
    from click.testing import CliRunner

    from tensorscale.cli.main import cli

    result = CliRunner().invoke(cli, ["rules", "show", name, "--resolved"])
    assert result.exit_code == 0 and "extends" not in result.output
    again = schema.load_rules_text(result.output, f"rules/{name}.yaml")
    assert _canon(again) == _canon(shipped_rules()[name])
    assert result.output.rstrip("\n") == resolved_text(name).rstrip("\n")


def _canon(value):
    import dataclasses

    from tensorscale.rulebook.expr import Expression
    from tensorscale.rulebook.patterns import Pattern

    if isinstance(value, Expression):
        return ("expr", value.source)
    if isinstance(value, Pattern):
        return ("re", value.pattern)
    if dataclasses.is_dataclass(value):
        return {f.name: _canon(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {key: _canon(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canon(item) for item in value]
    return value


# ---- validation as data --------------------------------------------------------------------------------

from tensorscale.rulebook.validate import yaml_keys  # noqa: E402

SPACES = "spaces: {hidden: {size: 4, grow: n}}\n"


@pytest.mark.parametrize(
    "text, line",
    [
        # unknown keys: the file, the place (the rule, with its pattern), the key, and the keys that exist
        (
            SPACES + "tensors:\n  - {match: 'a\\.w', axis: [hidden]}\n",
            "r.yaml: tensors[0]: unknown key 'axis' (known: axes, component, copy, drop, match, note, ops, replicate, "
            "required, scale, when)",
        ),
        (
            SPACES + "tensors:\n  - {match: 'a\\.w', axes: [hidden], replicate: {count: 2, name: 'b{k}', times: 3}}\n",
            "r.yaml: tensors[0] (a\\.w): replicate: unknown key 'times' (known: count, name, note, unit_of)",
        ),
        (
            "spaces: {hidden: {size: 4, grows: n}}\ntensors: [{match: a}]\n",
            "r.yaml: spaces.hidden: unknown key 'grows' (known: clone, clusters_of, equal, grow, norm, note, per, "
            "scaled, "
            "size, unit, within)",
        ),
        (
            "tensors: [{match: a}]\ncolour: red\n",
            "r.yaml: unknown key 'colour' (known: checks, config, create, depth, "
            "description, detect, let, name, note, spaces, targets, tensors, tie, unmatched)",
        ),
        # wrong types: what the value must be
        (
            "spaces: {hidden: {size: 4, scaled: 'yes'}}\ntensors: [{match: a}]\n",
            "r.yaml: spaces.hidden: scaled must be true or false",
        ),
        (
            "spaces: {hidden: {size: 4, clone: copy}}\ntensors: [{match: a}]\n",
            "r.yaml: spaces.hidden: clone must be 'tile' or 'interleave'",
        ),
        (
            "spaces: {hidden: {size: 4, norm: batch}}\ntensors: [{match: a}]\n",
            "r.yaml: spaces.hidden: norm must be one of rms, rms_one_plus, layer",
        ),
        (
            SPACES + "tensors:\n  - {match: 'a\\.w', axes: [hidden], component: brain}\n",
            "r.yaml: tensors[0] (a\\.w): component must be one of attention, embeddings, head, mlp, norms, other",
        ),
        (
            SPACES + "tensors:\n  - {match: 'a\\.w', drop: 1}\n",
            "r.yaml: tensors[0] (a\\.w): drop must be true or false",
        ),
        (
            "detect: {model_type: 3}\ntensors: [{match: a}]\n",
            "r.yaml: detect.model_type must be a string or a list of strings",
        ),
        ("tensors: [{match: a}]\nunmatched: skip\n", "r.yaml: unmatched must be 'error' or 'copy'"),
        ("tensors: [{match: a}]\ncreate: {name: x}\n", "r.yaml: create must be a list"),
        # missing keys: which one, and what it is for
        ("spaces: {hidden: {grow: n}}\ntensors: [{match: a}]\n", "r.yaml: spaces.hidden needs 'size'"),
        (
            SPACES + "tensors:\n  - {axes: [hidden]}\n",
            "r.yaml: tensors[0] needs 'match', a regular expression for tensor names",
        ),
        (
            SPACES + "tensors:\n  - {match: 'a\\.w', replicate: {count: 2}}\n",
            "r.yaml: tensors[0] (a\\.w): replicate needs 'count' and a 'name' template",
        ),
        (
            "tensors: [{match: a}]\ncreate: [{name: x, axes: ['-']}]\n",
            "r.yaml: create[0] needs 'name' and 'from' tensor names",
        ),
        ("tensors: [{match: a}]\nchecks: [{message: m}]\n", "r.yaml: checks[0] needs 'assert'"),
        ("spaces: {}\n", "r.yaml: 'tensors' must be a non-empty list of rules"),
        (
            "tensors:\n  - {match: 'a\\.w', axes: [hidden]}\n",
            "r.yaml: tensors[0] (a\\.w): axis role 'hidden' names no space (spaces: none)",
        ),
    ],
)
def test_rules_errors_are_one_line_naming_the_file_the_rule_and_the_fix(text, line):
    with pytest.raises(RulesError) as caught:
        schema.load_rules_text("name: r\n" + text, "r.yaml")
    assert str(caught.value) == line


def test_the_known_keys_are_the_dataclass_fields():
    """One definition: a field added to a rule's dataclass is a key the files may give, and nothing else is."""
    import dataclasses

    def keys(cls):
        found = set()
        for field in dataclasses.fields(cls):
            if field.metadata.get("inline"):
                found |= keys(field.metadata["inline"])
            elif field.metadata.get("yaml", True):
                found.add(field.metadata.get("key") or field.name)
        return found

    for cls in (
        schema.RuleSet,
        schema.SpaceSpec,
        schema.TensorRule,
        schema.CreateRule,
        schema.DepthSpec,
        schema.IdentityRule,
        schema.Replicate,
        schema.Check,
        schema.Detect,
    ):
        assert set(yaml_keys(cls)) == keys(cls) | {"note"}, cls
    assert {"axes", "ops", "scale", "match", "replicate"} <= set(yaml_keys(schema.TensorRule))
    assert "index" not in yaml_keys(schema.TensorRule) and "path" not in yaml_keys(schema.RuleSet)


# ---- what the engine no longer hard-wires --------------------------------------------------------------


def test_targets_and_tie_key_are_declared_by_the_rules():
    from tensorscale.planning.plan import UpOptions, current_units
    from tensorscale.rulebook.targets import DEFAULT_TARGETS, DEFAULT_TIE_KEY

    text = (
        "name: t\nspaces:\n  residual: {size: d, grow: n}\n  mlp: {size: f, grow: m}\n"
        "  att: {size: a * 4, unit: 4, grow: nh}\n"
        "targets: {hidden_size: residual, intermediate_size: mlp, num_attention_heads: att}\ntie: tied\n"
        "tensors: [{match: w, axes: [residual, mlp.in]}]\n"
    )
    rules = schema.load_rules_text(text, "t.yaml")
    assert (
        rules.targets
        == {**DEFAULT_TARGETS, "hidden_size": "residual", "intermediate_size": "mlp", "num_attention_heads": "att"}
        and rules.tie == "tied"
    )
    assert current_units(rules, {"d": 8, "f": 12, "a": 2}, UpOptions()) == {
        "hidden_size": 8,
        "intermediate_size": 12,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
    }
    for name, shipped in shipped_rules().items():
        assert shipped.tie == DEFAULT_TIE_KEY and set(shipped.targets) == set(DEFAULT_TARGETS), name
    with pytest.raises(RulesError, match=r"t.yaml: targets: unknown size option 'width' \(known: hidden_size"):
        schema.load_rules_text(text.replace("hidden_size: residual", "width: residual"), "t.yaml")
    with pytest.raises(RulesError, match=r"t.yaml: targets.hidden_size must name a space of the rules file"):
        schema.load_rules_text(text.replace("hidden_size: residual", "hidden_size: hidden"), "t.yaml")


# ---- components ---------------------------------------------------------------------------------------


def test_every_shipped_tensor_rule_declares_its_component():
    """Components are data: what `desc` and `plan` report a tensor as is its rule's `component:`, and the
    name-based guess (reading/describe.py) is only the fallback for models no shipped file describes."""
    for name, rule_set in shipped_rules().items():
        for rule in rule_set.tensors:
            if rule.drop:
                continue
            assert rule.component is not None, (name, rule.label)


def test_desc_counts_parameters_by_the_rules_components(tmp_path, monkeypatch):
    """A declared component wins over the guess: OPT's project_in/out are the embedding's projections, which
    the guess from their names would call "other"."""
    from fixtures import build_checkpoint

    from tensorscale.reading import describe
    from tensorscale.reading.source import open_source

    source = open_source(build_checkpoint(tmp_path / "opt", "opt", word_embed_proj_dim=16))
    projections = [name for name in source.tensors if "project_" in name]
    assert projections and all(describe.guess_component(name) == "other" for name in projections)
    declared = describe.declared_components(source)
    assert all(declared[name] == "embeddings" for name in projections)
    report = describe.describe(source)
    assert "other" not in report["parameters_by_component"]
    assert sum(report["parameters_by_component"].values()) == report["total_parameters"]
