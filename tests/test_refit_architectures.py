"""`down --method refit` on every architecture's layout, not only Llama's: fused projections (Phi-3's
qkv_proj [q; k; v] and gate_up_proj [gate; up]), weights stored [in, out] (GPT-2's Conv1D), multi-head
attention whose hidden size is heads × head_dim (GPT-2, GPT-NeoX, OPT: the heads move with the hidden size,
and are chosen before the layer runs), checkpoint names transformers renames on loading (GPT-NeoX's
embed_out is lm_head), and attention with no sdpa kernel (Gemma-2, eager).

Exactness where it must hold: units that carry nothing are dropped with no change to the logits. Elsewhere:
the output loads in stock transformers with no missing, unexpected or mismatched keys, at the sizes asked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fixtures import build_checkpoint, read_config, relative_logit_error
from safetensors.torch import load_file, save_file


def _down(args):
    return subprocess.run(
        [sys.executable, "-m", "tensorscale.cli.main", "down", *map(str, args)], capture_output=True, text=True
    )


def _refit(source, tmp_path, calibration, *sizes):
    return _down(["-i", source, "-o", tmp_path / "out", "--method", "refit", *sizes, "--calibration", calibration])


def _prepared(tmp_path, model_type, kill=None, **overrides):
    from test_inference import SENTENCES, save_tokenizer

    source = build_checkpoint(tmp_path / "src", model_type, **overrides)
    if kill is not None:
        path = f"{source}/model.safetensors"
        weights = load_file(path)
        kill(weights, read_config(source))
        save_file(weights, path, metadata={"format": "pt"})
    save_tokenizer(source)
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(" ".join(SENTENCES * 200))
    return source, calibration


DEAD_FFN = [5, 17, 30, 41]
DEAD_HIDDEN = [2, 9, 20, 27]


def _kill_phi3(weights, config):
    """Dead FFN neurons (down_proj columns), query head 1 of each kv group (o_proj columns), and residual
    dimensions nothing writes or reads, in Phi-3's fused layout."""
    width = config["hidden_size"] // config["num_attention_heads"]
    group = config["num_attention_heads"] // config["num_key_value_heads"]
    for name, tensor in weights.items():
        if name.endswith("down_proj.weight"):
            tensor[:, DEAD_FFN] = 0
        if name.endswith("o_proj.weight"):
            for g in range(config["num_key_value_heads"]):
                head = g * group + 1
                tensor[:, head * width : (head + 1) * width] = 0
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensor[DEAD_HIDDEN, :] = 0
        if name.endswith(("qkv_proj.weight", "gate_up_proj.weight", "lm_head.weight", "embed_tokens.weight")):
            tensor[:, DEAD_HIDDEN] = 0


def test_phi3_fused_projections_drop_dead_units_exactly(tmp_path):
    """Before: "down --calibration does not cut fused tensors yet". Each part of a fused axis is cut on its
    own (q rows by the kept heads, k and v by the kept kv groups, gate and up by the same neurons), and the
    rotated residual stream drops the dimensions that carry nothing."""
    source, calibration = _prepared(tmp_path, "phi3", _kill_phi3, tie_word_embeddings=False)
    sizes = ["--hidden-size", 28, "--intermediate-size", 44, "--num-attention-heads", 2, "--num-key-value-heads", 2]
    result = _refit(source, tmp_path, calibration, *sizes)
    assert result.returncode == 0, result.stderr
    config = read_config(tmp_path / "out")
    assert (config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]) == (28, 44, 2)
    weights = load_file(f"{tmp_path}/out/model.safetensors")
    assert weights["model.layers.0.self_attn.qkv_proj.weight"].shape == ((2 + 2 + 2) * 8, 28)
    assert weights["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 44, 28)
    # measured 7e-6; cutting a live unit instead gives > 1e-2
    assert relative_logit_error(source, tmp_path / "out") < 1e-4


def _kill_gpt2(weights, config):
    """Dead FFN neurons: rows of the stored [in, out] mlp.c_proj."""
    for name, tensor in weights.items():
        if name.endswith("mlp.c_proj.weight"):
            tensor[DEAD_FFN, :] = 0


@pytest.mark.parametrize("tie", [False, True])
def test_gpt2_conv1d_weights_are_refitted_in_their_stored_layout(tmp_path, tie):
    """Before: refused in one line. Conv1D stores [in, out]: refit works on the transpose and writes the
    stored layout back, so dropping dead neurons changes nothing and every key loads."""
    source, calibration = _prepared(tmp_path, "gpt2", _kill_gpt2, tie_word_embeddings=tie)
    result = _refit(source, tmp_path, calibration, "--intermediate-size", 124)
    assert result.returncode == 0, result.stderr
    weights = load_file(f"{tmp_path}/out/model.safetensors")
    assert weights["transformer.h.0.mlp.c_fc.weight"].shape == (32, 124)
    assert weights["transformer.h.0.mlp.c_proj.weight"].shape == (124, 32)
    assert relative_logit_error(source, tmp_path / "out") < 1e-5


@pytest.mark.parametrize(
    "model_type, heads_key, hidden_key",
    [
        ("gpt2", "n_head", "n_embd"),
        ("gpt_neox", "num_attention_heads", "hidden_size"),
        pytest.param("opt", "num_attention_heads", "hidden_size", marks=pytest.mark.slow),
    ],
)
def test_a_budget_cuts_heads_with_the_hidden_size_where_it_is_heads_times_head_dim(
    tmp_path, model_type, heads_key, hidden_key
):
    """Before: --reduction 30% chose a hidden size alone, which these architectures cannot have ("space heads
    would be 32 in the tensors but 16 by the new config"). Now whole heads go with it, the small stream runs
    the heads kept (chosen by what they write through the output projection), and the result loads."""
    source, calibration = _prepared(tmp_path, model_type)
    result = _down(["-i", source, "-o", tmp_path / "out", "--reduction", "30%", "--calibration", calibration, "--json"])
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["method"] == "refit"
    config = read_config(tmp_path / "out")
    assert config[hidden_key] < 32 and config[hidden_key] == config[heads_key] * 8
    assert "num_key_value_heads" not in config or config["num_key_value_heads"] == config[heads_key]
    error = relative_logit_error(source, tmp_path / "out")  # asserts no missing/unexpected/mismatched keys
    assert error == error and summary["calibration"]["kl"] > 0  # finite logits; a real cut is not exact


def test_heads_alone_on_gpt2_is_refused_in_one_line_before_any_work(tmp_path):
    """GPT-2's head width is n_embd // n_head: fewer heads at the same hidden size is not a GPT-2."""
    source, calibration = _prepared(tmp_path, "gpt2")
    result = _refit(source, tmp_path, calibration, "--num-attention-heads", 3)
    assert result.returncode == 2
    assert "not possible for gpt2" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", ["gemma2", pytest.param("gpt_neox", marks=pytest.mark.slow)])
def test_refit_runs_where_the_stock_layer_needs_eager_attention_or_renamed_keys(tmp_path, model_type):
    """Gemma-2 has no sdpa attention (the slot falls back to eager); GPT-NeoX's checkpoints store embed_out,
    which transformers loads as lm_head (the slot follows transformers' renaming)."""
    source, calibration = _prepared(tmp_path, model_type, tie_word_embeddings=False)
    result = _refit(source, tmp_path, calibration, "--intermediate-size", 32)
    assert result.returncode == 0, result.stderr
    assert read_config(tmp_path / "out")["intermediate_size"] == 32
    assert relative_logit_error(source, tmp_path / "out") < 1.0
