"""Incomplete checkpoints are refused before anything is written: every tensor the rules expect for the config
must be present (per-layer tensors for layers 0..L-1, the embedding, the final norm, an untied head), and an
index must cover its shards and tensors. Before issue 14 each of these was written with exit 0, and the
tool's own gen/verify then rejected the output."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner
from fixtures import build_checkpoint
from safetensors.torch import load_file, save_file

from tensorscale.cli.main import cli


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    root = tmp_path_factory.mktemp("incomplete")
    return {
        "untied": build_checkpoint(root / "untied", "llama", tie_word_embeddings=False),
        "sharded": build_checkpoint(root / "sharded", "llama", tie_word_embeddings=False, max_shard_size="20KB"),
        "gpt2": build_checkpoint(root / "gpt2", "gpt2"),
    }


def without(source, folder, drop=lambda name: False, config=None):
    shutil.copytree(source, folder)
    path = os.path.join(folder, "model.safetensors")
    tensors = {name: t for name, t in load_file(path).items() if not drop(name)}
    save_file(tensors, path, metadata={"format": "pt"})
    if config:
        data = json.load(open(os.path.join(folder, "config.json")))
        data.update(config)
        json.dump(data, open(os.path.join(folder, "config.json"), "w"))
    return str(folder)


def refused(folder, tmp_path, *needles):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["up", "-i", str(folder), "-o", str(out), "-edm", "2", "-q"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    for needle in needles:
        assert needle in result.output, result.output
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if ".tensorscale-" in n]
    plan = CliRunner().invoke(cli, ["plan", "-i", str(folder), "-edm", "2"])
    assert plan.exit_code == 2, plan.output  # the dry run says so too
    return result.output


def test_missing_final_norm(whole, tmp_path):
    refused(without(whole["untied"], tmp_path / "m", lambda n: n == "model.norm.weight"), tmp_path, "model.norm.weight")


def test_missing_embedding(whole, tmp_path):
    refused(
        without(whole["untied"], tmp_path / "m", lambda n: n == "model.embed_tokens.weight"),
        tmp_path,
        "model.embed_tokens.weight",
    )


def test_missing_gpt2_final_layer_norm(whole, tmp_path):
    refused(without(whole["gpt2"], tmp_path / "m", lambda n: "ln_f" in n), tmp_path, "ln_f")


def test_missing_layer(whole, tmp_path):
    refused(
        without(whole["untied"], tmp_path / "m", lambda n: n.startswith("model.layers.1.")), tmp_path, "layer 1", "2"
    )


def test_a_layer_missing_one_tensor(whole, tmp_path):
    refused(
        without(whole["untied"], tmp_path / "m", lambda n: n == "model.layers.0.mlp.down_proj.weight"),
        tmp_path,
        "layer 0 lacks model.layers.0.mlp.down_proj.weight",
    )


@pytest.mark.parametrize("layers", [1, 3])
def test_config_layer_count_disagrees_with_the_tensors(whole, tmp_path, layers):
    refused(
        without(whole["untied"], tmp_path / "m", config={"num_hidden_layers": layers}), tmp_path, "num_hidden_layers"
    )


def test_untied_without_a_head(whole, tmp_path):
    refused(
        without(whole["untied"], tmp_path / "m", lambda n: n == "lm_head.weight"),
        tmp_path,
        "lm_head.weight",
        "not tied",
    )


def _index(folder):
    return os.path.join(folder, "model.safetensors.index.json")


def test_index_with_an_empty_weight_map(whole, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(whole["sharded"], folder)
    index = json.load(open(_index(folder)))
    index["weight_map"] = {}
    json.dump(index, open(_index(folder), "w"))
    refused(folder, tmp_path, "weight_map is empty")


def test_index_that_leaves_out_a_shard(whole, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(whole["sharded"], folder)
    index = json.load(open(_index(folder)))
    last = sorted(set(index["weight_map"].values()))[-1]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != last}
    json.dump(index, open(_index(folder), "w"))
    refused(folder, tmp_path, "leaves out shard", last)


def test_index_that_leaves_out_a_tensor(whole, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(whole["sharded"], folder)
    index = json.load(open(_index(folder)))
    index["weight_map"].pop("model.layers.0.input_layernorm.weight")
    json.dump(index, open(_index(folder), "w"))
    refused(folder, tmp_path, "leaves out tensor", "model.layers.0.input_layernorm.weight")


def test_a_whole_checkpoint_still_passes(whole, tmp_path):
    for name, folder in whole.items():
        result = CliRunner().invoke(cli, ["up", "-i", folder, "-o", str(tmp_path / name), "-edm", "2", "-q"])
        assert result.exit_code == 0, (name, result.output)
