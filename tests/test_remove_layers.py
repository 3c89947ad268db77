"""`down --remove-layers K [--at LAYERS]`: depth cut through the rules' depth section.

Exactness is checked where it must hold: a layer whose residual writers are zero adds nothing, so its block
influence is zero, refit removes exactly it, and the shorter model computes the same logits. The layers
after it are renumbered, the config counts the new depth (per-layer lists and thresholds follow), and stock
transformers loads the result with no missing or unexpected keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from fixtures import build_checkpoint, read_config, relative_logit_error
from safetensors.torch import load_file, save_file

WRITERS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def _down(args):
    return subprocess.run(
        [sys.executable, "-m", "tensorscale.cli.main", "down", *map(str, args)], capture_output=True, text=True
    )


def _with_silent_layer(folder, layer):
    """Zero the residual writers of `layer`: it then adds nothing to the residual stream."""
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    for suffix in WRITERS:
        tensors[f"model.layers.{layer}.{suffix}"].zero_()
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


@pytest.fixture
def silent_middle(tmp_path):
    from test_inference import save_tokenizer

    source = build_checkpoint(tmp_path / "src", "llama", num_hidden_layers=3, tie_word_embeddings=False)
    save_tokenizer(source)
    return _with_silent_layer(source, 1)


def _calibration(tmp_path):
    from test_inference import SENTENCES

    path = tmp_path / "calibration.txt"
    path.write_text(" ".join(SENTENCES * 200))
    return path


def test_refit_removes_the_layer_of_least_influence_exactly(silent_middle, tmp_path):
    out = tmp_path / "out"
    result = _down(
        ["-i", silent_middle, "-o", out, "--remove-layers", 1, "--calibration", _calibration(tmp_path)]
        + ["--calibration-tokens", 512, "--json", "-q"]
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["removed_layers"] == [1]
    assert read_config(out)["num_hidden_layers"] == 2
    names = set(load_file(out / "model.safetensors"))
    assert "model.layers.1.mlp.down_proj.weight" in names and not any("layers.2." in n for n in names)
    assert relative_logit_error(silent_middle, out) < 1e-5  # loads, no missing/unexpected keys, same logits


def test_fold_removes_the_named_layers_and_renumbers_the_rest(tmp_path):
    source = _with_silent_layer(build_checkpoint(tmp_path / "src", "llama", num_hidden_layers=4), 2)
    out = tmp_path / "out"
    result = _down(["-i", source, "-o", out, "--method", "fold", "--remove-layers", 1, "--at", 2, "-q"])
    assert result.returncode == 0, result.stderr
    assert read_config(out)["num_hidden_layers"] == 3
    before, after = load_file(os.path.join(source, "model.safetensors")), load_file(out / "model.safetensors")
    for name, tensor in before.items():
        if ".layers.3." in name:  # source layer 3 is output layer 2, byte for byte
            assert torch.equal(after[name.replace(".layers.3.", ".layers.2.")], tensor)
    assert relative_logit_error(source, out) < 1e-6


def test_per_layer_lists_and_thresholds_follow_the_removal():
    from tensorscale.planning import depth
    from tensorscale.rulebook.registry import resolve_rules

    config = {
        "model_type": "qwen2",
        "num_hidden_layers": 6,
        "layer_types": ["full_attention"] * 3 + ["sliding_attention"] * 3,
        "max_window_layers": 3,
    }
    rules = resolve_rules(config, None)
    layers = depth.removal_layers(rules, config, (0, 4))
    new = dict(config)
    depth.rewrite_config(rules, config, new, layers)
    assert new["num_hidden_layers"] == 4
    assert new["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert new["max_window_layers"] == 2  # source layer 3, the first sliding one, is now layer 2
    assert layers.removed == [0, 4] and not layers.function_preserving


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--at", "1", "--intermediate-size", "32"], "give --remove-layers K too"),
        (["--remove-layers", "3"], "would remove all 3 layers"),
        (["--remove-layers", "1", "--at", "5", "--method", "fold"], "out of range"),
        (["--remove-layers", "2", "--at", "1"], "--at names 1 layer(s) but --remove-layers asks for 2"),
        (["--remove-layers", "2", "--at", "1,1"], "names a layer twice"),
        (["--remove-layers", "1", "--method", "fold"], "name them with --at"),
        (["--remove-layers", "-1"], "must be a whole number >= 0"),
    ],
)
def test_bad_removals_are_one_line_and_write_nothing(silent_middle, tmp_path, args, fragment):
    out = tmp_path / "out"
    result = _down(["-i", silent_middle, "-o", out, *args, "-q"])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not out.exists()


def test_a_budget_counts_the_removed_layers(silent_middle):
    from tensorscale.folding.allocation import Counter, allocate_budget

    counter = Counter(silent_middle, None)
    total = counter.count(dict(counter.current))
    alone = allocate_budget(silent_middle, None, {}, "20%", None)
    with_depth = allocate_budget(silent_middle, None, {}, "20%", None, remove_layers=1)
    assert alone  # the width alone must be cut
    assert with_depth == {}  # a third of the layers is more than 20% of this model: no width cut is needed
    assert Counter(silent_middle, None, remove_layers=1).count(dict(counter.current)) < 0.8 * total


# ---- sizes transformers refuses: refit runs all query heads of the kept kv groups while it re-solves ----


@pytest.fixture(scope="module")
def nine_heads(tmp_path_factory):
    from test_inference import save_tokenizer

    folder = build_checkpoint(
        tmp_path_factory.mktemp("nine") / "m",
        "llama",
        hidden_size=144,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=96,
        num_hidden_layers=2,
        vocab_size=32,
    )
    save_tokenizer(folder)
    return folder


def test_a_hidden_size_the_working_heads_do_not_divide_is_one_line_before_any_work(nine_heads, tmp_path):
    # 120 is a multiple of the 6 heads asked for, not of the 9 that refit runs while it re-solves a layer
    out = tmp_path / "out"
    result = _down(["-i", nine_heads, "-o", out, "--hidden-size", 120, "--num-attention-heads", 6, "-q"])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    # the rules' own check says it (before, transformers' config did: "not a multiple of ... heads (9)")
    assert len(lines) == 1 and "hidden_size must be a multiple of num_attention_heads" in lines[0], result.stderr
    assert "9 query heads" in lines[0]
    assert "choose sizes every head count divides" in lines[0]
    assert not out.exists()


def test_a_budget_picks_hidden_sizes_every_head_count_divides(nine_heads):
    from tensorscale.folding.allocation import allocate_budget

    # heads given (the budget itself cuts them last, after a rotated stream): the hidden size it picks must
    # suit the 6 heads written and the 9 that refit runs while it re-solves a layer
    targets = allocate_budget(nine_heads, None, {"num_attention_heads": 6}, "45%", None)
    assert targets["num_attention_heads"] == 6 and "hidden_size" in targets
    assert targets["hidden_size"] % 6 == 0 and targets["hidden_size"] % 9 == 0, targets
