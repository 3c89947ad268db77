"""`down` exactly inverts `up` on every architecture, takes any target the architecture allows, and the
tests can tell it from a naive "keep the first d dimensions" slice."""

from __future__ import annotations

import json
import os

import pytest
import torch
from fixtures import TINY, build_checkpoint, load, logits, read_config, relative_logit_error
from safetensors.torch import load_file, save_file

from tensorscale.convert import execute_plan, plan_down, run_up
from tensorscale.errors import TensorscaleError
from tensorscale.planning.plan import DownOptions, UpOptions, evaluate_env
from tensorscale.reading.source import open_source
from tensorscale.rulebook.evaluate import match_rule
from tensorscale.rulebook.registry import resolve_rules
from tensorscale.rulebook.schema import split_role

TOLERANCE = 1e-5
IGNORED_CONFIG = {"transformers_version"}


TARGET_KEYS = {"hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"}


def down(source, output, **options):
    targets = {key: options.pop(key) for key in list(options) if key in TARGET_KEYS}
    plan = plan_down(str(source), DownOptions(targets=targets, **options))
    execute_plan(plan, str(output), show_progress=False)
    return plan


def tensors(folder):
    out = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def assert_same_model(original, folded):
    a, b = read_config(original), read_config(folded)
    assert {k: v for k, v in a.items() if k not in IGNORED_CONFIG} == {
        k: v for k, v in b.items() if k not in IGNORED_CONFIG
    }
    wa, wb = tensors(original), tensors(folded)
    assert sorted(wa) == sorted(wb)
    for name in wa:
        scale = float(wa[name].abs().max()) or 1.0
        assert float((wa[name] - wb[name]).abs().max()) <= 1e-5 * scale, name
    assert relative_logit_error(original, folded) <= TOLERANCE


CASES = {
    "untied n2 m3 noise": dict(tie=False, n=2, m=3, snr=20.0, untie=False),
    "tied n3 m2": dict(tie=True, n=3, m=2, snr=None, untie=False),
    "tied, up untied, noise": dict(tie=True, n=2, m=2, snr=15.0, untie=True),
}


@pytest.fixture(scope="module", params=sorted(TINY))
def model_type(request):
    return request.param


@pytest.fixture(scope="module")
def sources(model_type, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"down-{model_type}")
    return {tie: build_checkpoint(folder / f"tie-{tie}", model_type, tie_word_embeddings=tie) for tie in (False, True)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_down_inverts_up(sources, tmp_path, case):
    spec = CASES[case]
    source = sources[spec["tie"]]
    run_up(
        source,
        str(tmp_path / "up"),
        UpOptions(spec["n"], spec["m"], snr_db=spec["snr"], untie_embeddings=spec["untie"]),
        show_progress=False,
    )
    plan = down(tmp_path / "up", tmp_path / "down", embed_dim_divisor=spec["n"], up_proj_divisor=spec["m"])
    assert all(fold.exact for fold in plan.down.folds.by_key.values())
    if spec["untie"]:
        assert plan.down.retied, "an untied up of a tied model comes back tied"
    assert_same_model(source, tmp_path / "down")


# ---- permuted and noisy inputs: the tests tell cluster-fold from a naive slice -----------------------


def _roles(folder):
    """For each tensor: its axis roles, from the shipped rules (so the test needs no per-name knowledge)."""
    source = open_source(str(folder))
    rules = resolve_rules(source.config, None)
    env = evaluate_env(rules, source.config, UpOptions())
    roles = {}
    for name in source.tensors:
        rule, _ = match_rule(rules, name, env)
        roles[name] = [split_role(label) if label != "-" else (None, None) for label in rule.transform.axes]
    return roles


def permute_hidden(folder, output, seed=0):
    """A function-preserving permutation of the residual stream: every hidden axis reindexed the same way."""
    weights = tensors(folder)
    roles = _roles(folder)
    size = read_config(folder)["hidden_size"]
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    out = {}
    for name, tensor in weights.items():
        for axis, (space, _) in enumerate(roles[name]):
            if space == "hidden":
                tensor = tensor.index_select(axis, perm)
        out[name] = tensor.contiguous()
    os.makedirs(output, exist_ok=True)
    save_file(out, os.path.join(output, "model.safetensors"), metadata={"format": "pt"})
    for side in os.listdir(folder):
        if side.endswith(".json"):
            with open(os.path.join(folder, side)) as src, open(os.path.join(output, side), "w") as dst:
                dst.write(src.read())
    return output


def naive_slice(folder, output, n, m, rescale):
    """'Keep the first d dimensions' of every grown axis; with `rescale`, readers ×n (undoes ÷n of tiling)."""
    weights, roles, config = tensors(folder), _roles(folder), read_config(folder)
    factor = {"hidden": n, "heads": n, "kv_heads": n, "ffn": m}
    out = {}
    for name, tensor in weights.items():
        for axis, (space, role) in enumerate(roles[name]):
            if space in factor:
                tensor = tensor.narrow(axis, 0, tensor.shape[axis] // factor[space])
                if rescale and role == "in":
                    tensor = tensor * factor[space]
        out[name] = tensor.contiguous()
    os.makedirs(output, exist_ok=True)
    save_file(out, os.path.join(output, "model.safetensors"), metadata={"format": "pt"})
    config.update(
        hidden_size=config["hidden_size"] // n,
        intermediate_size=config["intermediate_size"] // m,
        num_attention_heads=config["num_attention_heads"] // n,
        num_key_value_heads=config["num_key_value_heads"] // n,
    )
    with open(os.path.join(output, "config.json"), "w") as handle:
        json.dump(config, handle)
    return output


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("slice") / "src", "llama", tie_word_embeddings=False)


def test_slice_inverts_plain_tiling_only(llama, tmp_path):
    """On plain tiling a rescaled slice also looks exact: that is why the tests permute and add noise."""
    run_up(llama, str(tmp_path / "up"), UpOptions(2, 2), show_progress=False)
    assert (
        relative_logit_error(llama, naive_slice(tmp_path / "up", tmp_path / "slice", 2, 2, rescale=True)) <= TOLERANCE
    )


@pytest.mark.parametrize("variant", ["permuted", "noisy", "permuted and noisy"])
def test_down_passes_where_a_slice_fails(llama, tmp_path, variant):
    run_up(
        llama, str(tmp_path / "up"), UpOptions(2, 2, snr_db=20.0 if "noisy" in variant else None), show_progress=False
    )
    grown = tmp_path / "up"
    if "permuted" in variant:
        grown = permute_hidden(tmp_path / "up", tmp_path / "permuted")
        assert relative_logit_error(llama, grown) <= TOLERANCE  # the permutation keeps the function
    for rescale in (False, True):
        sliced = naive_slice(grown, tmp_path / f"slice-{rescale}", 2, 2, rescale=rescale)
        assert relative_logit_error(llama, sliced) > 1e-2, f"a slice (rescale={rescale}) passed on a {variant} model"
    down(grown, tmp_path / "down", embed_dim_divisor=2, up_proj_divisor=2)
    assert relative_logit_error(llama, tmp_path / "down") <= TOLERANCE


# ---- any target the architecture allows ------------------------------------------------------------


def test_non_divisor_targets(llama, tmp_path):
    """RMSNorm models take any sizes: 32 -> 24 hidden (clusters of 1 and 2, with the S factor)."""
    plan = down(
        llama, tmp_path / "out", hidden_size=24, intermediate_size=40, num_attention_heads=3, num_key_value_heads=1
    )
    config = read_config(tmp_path / "out")
    assert (
        config["hidden_size"],
        config["intermediate_size"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
    ) == (24, 40, 3, 1)
    model, info = load(tmp_path / "out")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.isfinite(logits(model)).all()
    assert not all(fold.exact for fold in plan.down.folds.by_key.values())


def test_down_is_deterministic(llama, tmp_path):
    for name in ("a", "b"):
        down(llama, tmp_path / name, embed_dim_divisor=2, up_proj_divisor=2)
    assert tensors(tmp_path / "a").keys() == tensors(tmp_path / "b").keys()
    assert all(torch.equal(x, tensors(tmp_path / "b")[k]) for k, x in tensors(tmp_path / "a").items())


@pytest.mark.parametrize(
    "model_type,options,message",
    [
        ("llama", dict(num_attention_heads=3), "not a multiple of 2 kv heads"),
        ("llama", dict(hidden_size=64), "larger than the model's"),
        ("llama", dict(embed_dim_divisor=3), "not divisible by 3"),
        ("qwen2", dict(hidden_size=24), "not possible for qwen2"),
        ("phi", dict(hidden_size=24, num_attention_heads=3, num_key_value_heads=1), "equal clusters"),
    ],
)
def test_impossible_targets(tmp_path, model_type, options, message):
    source = build_checkpoint(tmp_path / "src", model_type, tie_word_embeddings=False)
    with pytest.raises(TensorscaleError, match=message):
        down(source, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


# ---- calibration ---------------------------------------------------------------------------------


def test_calibration_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    source = build_checkpoint(tmp_path / "src", "llama", tie_word_embeddings=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("  ")
    for text, message in ((str(empty), "is empty"), (str(tmp_path / "missing.txt"), "cannot read calibration text")):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "tensorscale.cli.main",
                "down",
                "-i",
                source,
                "-o",
                str(tmp_path / "out"),
                "-edd",
                "2",
                "--calibration",
                text,
            ],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    no_tokenizer = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorscale.cli.main",
            "down",
            "-i",
            source,
            "-o",
            str(tmp_path / "out"),
            "-edd",
            "2",
            "--calibration",
            __file__,
        ],
        capture_output=True,
        text=True,
    )
    assert no_tokenizer.returncode == 2 and "no tokenizer" in no_tokenizer.stderr
    assert not (tmp_path / "out").exists()


# ---- merged tensors are written a slice of clusters at a time ---------------------------------------


@pytest.mark.parametrize(
    "model_type,dtype,targets",
    [
        (
            "llama",
            torch.bfloat16,
            dict(hidden_size=24, intermediate_size=40, num_attention_heads=3, num_key_value_heads=1),
        ),
        ("phi", torch.float32, dict(embed_dim_divisor=2, up_proj_divisor=2)),
        ("phi3", torch.bfloat16, dict(embed_dim_divisor=2, up_proj_divisor=2)),
        ("gpt2", torch.float32, dict(embed_dim_divisor=2, up_proj_divisor=2)),
    ],
)
def test_merged_tensors_written_in_slices_match_whole_tensors(tmp_path, monkeypatch, model_type, dtype, targets):
    """One cluster per slice (uneven clusters, multi-row head units, bf16 and float32) gives the bytes of
    merging each tensor whole, and --verify-files re-reads them."""
    from tensorscale.writing import execute, merged_rows

    source = build_checkpoint(tmp_path / "src", model_type, dtype=dtype, tie_word_embeddings=False)
    plan = plan_down(
        str(source),
        DownOptions(
            targets={k: v for k, v in targets.items() if k in TARGET_KEYS},
            **{k: v for k, v in targets.items() if k not in TARGET_KEYS},
        ),
    )
    sliced = []
    monkeypatch.setattr(
        execute,
        "write_merged_rows",
        lambda tensor, *rest: sliced.append(tensor.name) or merged_rows.write_merged_rows(tensor, *rest),
    )
    monkeypatch.setattr(merged_rows, "SLICE_BYTES", 1)
    execute_plan(plan, str(tmp_path / "sliced"), show_progress=False, verify_files=True)
    mixing = {
        t.name
        for shard in plan.shards
        for t in shard.tensors
        if t.row_map is None
        and len(t.out_shape) == 2
        and any(op.axis == 0 and op.name in ("merge", "fused") for op in t.ops)
    }
    assert set(sliced) == mixing  # every merged matrix, fused ones included
    assert any("attn" in name for name in sliced) and any("mlp" in name for name in sliced)
    monkeypatch.setattr(execute, "row_merge", lambda tensor: None)
    execute_plan(plan, str(tmp_path / "whole"), show_progress=False)
    a, b = tensors(tmp_path / "sliced"), tensors(tmp_path / "whole")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[name], b[name]) for name in a)
    model, info = load(tmp_path / "sliced")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.isfinite(logits(model)).all()


def test_retie_stops_at_the_first_chunk_that_differs(tmp_path, monkeypatch):
    """An ordinary untied model is not compared to the end; an untied `up` of a tied one still comes back tied."""
    from tensorscale.folding import retie

    monkeypatch.setattr(retie, "CHUNK_ELEMENTS", 64)  # a few rows per chunk
    compared = []
    original = retie._apply
    monkeypatch.setattr(retie, "_apply", lambda tensor, x: compared.append(tensor.name) or original(tensor, x))
    untied = build_checkpoint(tmp_path / "untied", "llama", tie_word_embeddings=False)
    plan = down(untied, tmp_path / "out", embed_dim_divisor=2, up_proj_divisor=2)
    assert not plan.down.retied
    assert compared.count("lm_head.weight") == 1  # the first chunk decided it
    tied = build_checkpoint(tmp_path / "tied", "llama", tie_word_embeddings=True)
    run_up(tied, str(tmp_path / "up"), UpOptions(2, 2, snr_db=15.0, untie_embeddings=True), show_progress=False)
    compared.clear()
    plan = down(tmp_path / "up", tmp_path / "back", embed_dim_divisor=2, up_proj_divisor=2)
    assert plan.down.retied and compared.count("lm_head.weight") > 2
