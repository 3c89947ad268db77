"""`down`'s head targets under GQA: those cluster-fold can make work on any model; the others are refused
before any weight is read, in one line that names the reachable ones (folding/head_groups.py)."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner
from fixtures import build_checkpoint, load, logits, read_config

from tensorscale.cli.main import cli
from tensorscale.convert import execute_plan, plan_down
from tensorscale.folding import analysis
from tensorscale.folding.head_groups import fits
from tensorscale.planning.plan import DownOptions


@pytest.fixture(scope="module")
def smollm_like(tmp_path_factory):
    """SmolLM2-135M's head layout (9 heads over 3 kv heads), at a tiny width."""
    return build_checkpoint(
        tmp_path_factory.mktemp("nine-three") / "src",
        "llama",
        hidden_size=72,
        num_attention_heads=9,
        num_key_value_heads=3,
    )


def test_nine_over_three_to_eight_over_two_is_refused_before_any_work(smollm_like, tmp_path, monkeypatch):
    """Before: "space heads (layer 0), kv cluster 1: cannot fold 3 units into 4", after reading the weights."""

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read before the targets were checked")

    monkeypatch.setattr(analysis, "match_all", no_weights)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["down", smollm_like, "-o", str(out), "-q", "--num-attention-heads", "8", "--num-key-value-heads", "2"]
    )
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert lines[0].startswith(
        "tensorscale: error: --num-attention-heads 8 with --num-key-value-heads 2 cannot be "
        "folded from 9 heads over 3 kv heads"
    )
    assert "with 2 kv heads choose 2, 4 or 6 heads, or keep 8 heads with 1 kv head" in lines[0]
    assert os.listdir(tmp_path) == []


def test_every_target_the_rule_allows_is_written_and_every_other_refused(smollm_like, tmp_path):
    """The rule is the clustering's: for 9/3, each allowed pair folds and loads; each refused one is refused."""
    allowed = {(a, k) for k in (1, 2, 3) for a in range(1, 10) if fits(9, 3, a, k)}
    assert allowed == {(a, 1) for a in range(1, 10)} | {(2, 2), (4, 2), (6, 2), (3, 3), (6, 3), (9, 3)}
    for a, k in sorted({(a, k) for k in (1, 2, 3) for a in range(1, 10)} - allowed):
        result = CliRunner().invoke(
            cli,
            [
                "down",
                smollm_like,
                "-o",
                str(tmp_path / f"no-{a}-{k}"),
                "-q",
                "--num-attention-heads",
                str(a),
                "--num-key-value-heads",
                str(k),
            ],
        )
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, (a, k, result.output)
    assert os.listdir(tmp_path) == []
    for a, k in [(8, 1), (6, 2)]:
        out = tmp_path / f"{a}-{k}"
        plan = plan_down(
            smollm_like, DownOptions(targets=dict(num_attention_heads=a, num_key_value_heads=k, hidden_size=8 * a))
        )
        execute_plan(plan, str(out), show_progress=False)
        assert (read_config(out)["num_attention_heads"], read_config(out)["num_key_value_heads"]) == (a, k)
        model, info = load(out)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert logits(model).isfinite().all()


@pytest.mark.parametrize("seed", range(3))
def test_kv_heads_merge_in_equal_groups_when_each_must_serve_more_heads(tmp_path, seed):
    """8 heads over 4 kv heads to 6 over 2: each new kv head serves 3 heads, one source kv head has 2, so the
    kv heads are merged in pairs. Before, k-means could pair them 3 + 1, and the lone kv head's 2 heads could
    not make 3 ("cannot fold 2 units into 3"; 8 of 9 seed pairs failed)."""
    source = build_checkpoint(
        tmp_path / "src", "llama", seed=seed, hidden_size=64, num_attention_heads=8, num_key_value_heads=4
    )
    plan = plan_down(
        source, DownOptions(seed=seed, targets=dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2))
    )
    for layer in range(2):
        assert plan.down.folds.by_key[("kv_heads", layer)].sizes() == [2, 2]
        assert plan.down.folds.by_key[("heads", layer)].clusters == 6
    execute_plan(plan, str(tmp_path / "out"), show_progress=False)
    model, info = load(tmp_path / "out")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert logits(model).isfinite().all()
