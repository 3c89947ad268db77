"""benchmarks/bench_down.py's bookkeeping (no model is run): the --levels parser, the parameter count a
level's shape gives, and the ShortGPT layer removal's renumbering, on the toy checkpoint in examples/."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "examples", "pydoc-llama")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_down", os.path.join(REPO, "benchmarks", "bench_down.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_levels_parse_and_reject(bench):
    assert bench.parse_levels("576,1280,9,3; 576,1024,6,3;") == [(576, 1280, 9, 3), (576, 1024, 6, 3)]
    assert len(bench.parse_levels(bench.REAL_LEVELS)) == 4
    for bad in ("576,1280,9", "576,1280,9,x", "576,0,9,3", "", ";"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_levels(bad)


def test_target_parameters_match_what_slice_writes(bench):
    weights = bench.tensors(TOY)
    shapes = bench.tensor_shapes(TOY)
    for _, hidden, inter, heads, kv in bench.TARGETS:
        layout = bench.Layout(TOY, dict(zip(bench.TARGET_KEYS, (hidden, inter, heads, kv))))
        sliced = bench.apply_selection(layout, weights, bench.select_units(layout, None), False)
        assert bench.target_parameters(layout, shapes) == sum(t.numel() for t in sliced.values())
    assert sum(math.prod(s) for s in shapes.values()) == sum(t.numel() for t in weights.values())


def test_remove_layers_renumbers_and_meets_the_budget(bench):
    weights = bench.tensors(TOY)
    config = bench.read_config(TOY)
    layout = bench.Layout(TOY, {k: config[k] for k in bench.TARGET_KEYS})
    layers = config["num_hidden_layers"]
    influence = {i: float(w) for i, w in enumerate([3.0, 1.0, 2.0, 4.0][:layers])}
    total = sum(t.numel() for t in weights.values())
    out, updates, removed = bench.remove_layers(layout, weights, influence, total - 1)
    assert removed == [1] and updates == {"num_hidden_layers": layers - 1}
    indices = {int(m.group(1)) for name in out for m in [re.search(r"\.layers\.(\d+)\.", name)] if m}
    assert indices == set(range(layers - 1))
    assert sum(t.numel() for t in out.values()) <= total - 1
    # layer 2 became layer 1: same tensors
    assert all(
        out[name.replace(".layers.2.", ".layers.1.")] is weights[name] for name in weights if ".layers.2." in name
    )


# ------------------------------------------------------------------ SliceGPT and FLAP baselines (tiny Llama)


def _ids(seed, shape):
    import torch

    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def _full_layout(bench, folder):
    config = bench.read_config(folder)
    return bench.Layout(folder, {k: config[k] for k in bench.TARGET_KEYS})


@pytest.mark.parametrize("tied", [False, True])
def test_slicegpt_rotation_at_full_size_gives_the_original_logits(bench, tmp_path, tied):
    """The global rotation with every norm gain folded into its readers is exact at d = D (untied head, or a
    tied head written as its own tensor); keeping the tie, the fitted final-norm gain is exact only when the
    gain is uniform, and measurably not otherwise (random gains 1 ± 0.3)."""
    import torch
    from fixtures import build_checkpoint, relative_logit_error

    source = build_checkpoint(tmp_path / "source", "llama", tie_word_embeddings=tied)
    weights = bench.tensors(source)
    layout = _full_layout(bench, source)
    calib = bench.slicegpt.calibrate(layout, bench.load_checked(source), _ids(3, (512,)))
    q, _ = bench.slicegpt.principal_rotation(calib.second_moment)
    assert torch.allclose(q.T @ q, torch.eye(q.shape[0], dtype=q.dtype), atol=1e-10)
    assert (calib.head_norm == "model.norm.weight") == tied
    size = q.shape[0]
    rotated, updates, _ = bench.slicegpt.rotate(layout, weights, calib, q, size, untie=tied)
    exact = bench.save_like(source, str(tmp_path / "rotated"), rotated, updates)
    assert relative_logit_error(source, exact) < 1e-5
    if tied:
        assert bench.read_config(exact)["tie_word_embeddings"] is False and "lm_head.weight" in rotated
        kept, _, _ = bench.slicegpt.rotate(layout, weights, calib, q, size)
        fitted = bench.save_like(source, str(tmp_path / "fitted"), kept, {})
        assert relative_logit_error(source, fitted) > 1e-3  # random final-norm gains: not exact with the tie
        weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], 0.7)
        uniform = bench.save_like(source, str(tmp_path / "uniform"), weights, {})
        calib = bench.slicegpt.calibrate(layout, bench.load_checked(uniform), _ids(3, (512,)))
        kept, _, _ = bench.slicegpt.rotate(layout, weights, calib, q, size)
        fitted = bench.save_like(source, str(tmp_path / "fitted-uniform"), kept, {})
        assert relative_logit_error(uniform, fitted) < 1e-5


def test_slicegpt_norm_gain_keeps_stock_rmsnorm_scale(bench):
    """A stream vector inside the kept d directions: stock RMSNorm over its d coordinates with the gain
    sqrt(D/d) (and eps·D/d) gives the D-dimensional RMSNorm's output, coordinate for coordinate."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    D, d, eps = 32, 20, 1e-5
    q, _ = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    y = torch.randn(5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    x = y @ q[:, :d].T  # a D-dim stream whose energy is all in the first d principal directions
    big, small = LlamaRMSNorm(D, eps=eps).double(), LlamaRMSNorm(d, eps=eps * D / d).double()
    with torch.no_grad():
        small.weight.fill_((D / d) ** 0.5)
        assert torch.allclose(small(x @ q[:, :d]), big(x) @ q[:, :d], atol=1e-6)  # its float32 inside
        small.weight.fill_(1.0)
        assert not torch.allclose(small(x @ q[:, :d]), big(x) @ q[:, :d], atol=1e-3)


def test_flap_compensation_loads_in_stock_transformers_and_beats_no_compensation(bench, tmp_path):
    import torch
    from fixtures import build_checkpoint, load

    source = build_checkpoint(tmp_path / "source", "llama")
    weights, config = bench.tensors(source), bench.read_config(source)
    targets = dict(zip(bench.TARGET_KEYS, (32, 32, 2, 2)))  # FFN 48 -> 32, heads 4 -> 2 (kv 2)
    layout = bench.Layout(source, targets)
    assert bench.flap.skip_reason(layout, weights, config) is None
    model = bench.load_checked(source)
    calibration, test = _ids(3, (1024,)), _ids(4, (4, 64))
    with torch.no_grad():
        reference = torch.log_softmax(model(test).logits, -1)
    kl = {}
    for compensate in (False, True):
        small, extra = bench.flap_weights(layout, weights, model, calibration, {**config, **targets}, compensate)
        updates = extra.pop("config_updates")
        out = bench.save_like(source, str(tmp_path / f"flap-{compensate}"), small, {**targets, **updates})
        loaded, info = load(out)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        with torch.no_grad():
            logq = torch.log_softmax(loaded(test).logits, -1)
        kl[compensate] = float((reference.exp() * (reference - logq)).sum(-1).mean())
        if compensate:
            assert updates == {"attention_bias": True, "mlp_bias": True}
            # per layer: gate, up (32 each), down (hidden 32), q (2 heads of 8), k, v (2 kv heads of 8), o (32)
            assert extra["added_bias_parameters"] == 2 * (32 + 32 + 32 + 16 + 16 + 16 + 32)
            assert small["model.layers.0.mlp.down_proj.bias"].abs().max() > 0
            assert small["model.layers.0.mlp.up_proj.bias"].abs().max() == 0
    assert kl[True] < kl[False]


def test_slicegpt_tied_head_is_exact_when_q_mixes_only_equal_gains(bench, tmp_path):
    """Keeping the tie, the rotation groups dimensions by final-norm gain: with gains in a few exact levels
    (one negative), the grouped Q commutes with diag(g) and the fitted gain gives the original logits."""
    import torch
    from fixtures import build_checkpoint, relative_logit_error

    source = build_checkpoint(tmp_path / "source", "llama", tie_word_embeddings=True)
    weights = bench.tensors(source)
    values = torch.tensor([1.0, 1.01, 1.03, -1.0, -1.015, 2.0], dtype=torch.float64)
    found = bench.slicegpt.gain_groups(values, 0.02)
    assert sorted(sorted(float(values[i]) for i in g) for g in found) == [[-1.015, -1.0], [1.0, 1.01], [1.03], [2.0]]
    permutation = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    gain = torch.tensor([0.7, 1.3, 1.3, -0.5]).repeat_interleave(8)[permutation]
    weights["model.norm.weight"] = gain
    source = bench.save_like(source, str(tmp_path / "levels"), weights, {})
    layout = _full_layout(bench, source)
    groups = bench.slicegpt.gain_groups(gain.double(), 0.02)
    assert sorted(len(g) for g in groups) == [8, 8, 16]
    calib = bench.slicegpt.calibrate(layout, bench.load_checked(source), _ids(3, (512,)))
    q, _ = bench.slicegpt.principal_rotation(calib.second_moment, groups)
    assert torch.allclose(q.T @ q, torch.eye(32, dtype=q.dtype), atol=1e-10)
    rotated, _, _ = bench.slicegpt.rotate(layout, weights, calib, q, 32)
    out = bench.save_like(source, str(tmp_path / "rotated"), rotated, {})
    assert relative_logit_error(source, out) < 1e-5
    plain, _ = bench.slicegpt.principal_rotation(calib.second_moment)
    rotated, _, _ = bench.slicegpt.rotate(layout, weights, calib, plain, 32)
    out = bench.save_like(source, str(tmp_path / "plain"), rotated, {})
    assert relative_logit_error(source, out) > 1e-2


def test_flap_skips_with_a_reason_where_no_config_switch_adds_the_bias(bench, tmp_path):
    from fixtures import build_checkpoint

    source = build_checkpoint(tmp_path / "source", "mistral")  # no mlp_bias in Mistral's config
    config = bench.read_config(source)
    layout = bench.Layout(source, {**{k: config[k] for k in bench.TARGET_KEYS}, "intermediate_size": 32})
    reason = bench.flap.skip_reason(layout, bench.tensors(source), config)
    assert "down_proj.bias" in reason and "no config switch" in reason
