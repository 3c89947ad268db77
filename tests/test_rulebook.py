"""The rulebook as data: the roles table, the scale rule that lets one file drive up and down, and the
import direction (the rulebook is read by planning, folding and the CLI, and reads none of them)."""

from __future__ import annotations

import ast
import pathlib

import pytest

from fixtures import TINY
from tensorscale.ops.library import Interleave, Merge, OpContext, Tile, TileDivide
from tensorscale.rulebook.compile import Space, _grow_leaf
from tensorscale.rulebook.evaluate import scale_inverts
from tensorscale.rulebook.layout import plan_layouts
from tensorscale.rulebook.registry import shipped_rules
from tensorscale.rulebook.roles import REDUCE_SCALES, REDUCE_WEIGHTS, ROLE_OPS, Role, role_label, split_role
from tensorscale.rulebook.schema import load_rules_text
from tensorscale.folding.fold import Fold

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


# Only "tile": a reader of a `clone: interleave` space gets TileDivide (tiled blocks), so its copies do not
# sit where Interleave put the writer's copies. No shipped rules file declares an interleaved space.
@pytest.mark.parametrize("clone", ["tile"])
def test_the_table_drives_up_and_its_reduce_op_undoes_it(clone):
    space = Space("hidden", 4, 8, 1, clone, scaled=True, norm="rms")
    leaf = _grow_leaf({"snr_db": None}, "test", plan_layouts({"hidden": space}, "clone"))
    expected = {Role.OUT: Interleave if clone == "interleave" else Tile, Role.IN: TileDivide, Role.NORM: Tile}
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
                    assert scale_inverts(rule_set, rule.transform, config, ratios, untie_embeddings=not tie), (name, rule)
                    checked += 1
    assert checked > 20


def test_a_scale_that_does_not_invert_itself_is_caught():
    rules = load_rules_text("name: t\nlet: {g: 'sqrt(n)'}\nspaces: {hidden: {size: 4, grow: n}}\ntensors:\n"
                            "  - {match: a, axes: [hidden], scale: '1 / n + 1'}\n"
                            "  - {match: b, axes: [hidden], scale: {factor: '1 / g', offset: '1 / g - 1'}}\n"
                            "  - {match: c, axes: [hidden], scale: {factor: '1 / n', offset: '0.5'}}\n")
    ratios = {"n": 2, "m": 1, "nh": 2, "nkv": 2}
    assert [scale_inverts(rules, rule.transform, {}, ratios) for rule in rules.tensors] == [False, True, False]


FORBIDDEN = ("tensorscale.planning", "tensorscale.folding", "tensorscale.writing", "tensorscale.cli",
             "tensorscale.convert")


def _imports(path: pathlib.Path):
    """Every module a file imports, at the top or deferred inside a function, as absolute names."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def test_the_rulebook_imports_nothing_above_it():
    files = sorted((PACKAGE / "rulebook").rglob("*.py"))
    assert len(files) > 8
    upward = [(str(path.relative_to(PACKAGE)), name) for path in files for name in _imports(path)
              if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)]
    assert upward == []


def test_the_import_walker_sees_deferred_imports(tmp_path):
    package = PACKAGE / "rulebook"
    names = set(_imports(package / "check.py"))
    assert "tensorscale.rulebook.evaluate" in names and "tensorscale.reading.source" in names
    ast_probe = PACKAGE / "planning" / "allocation.py"  # imports plan inside a method
    assert "tensorscale.planning.plan" in set(_imports(ast_probe))
