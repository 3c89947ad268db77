"""GGUF as input: tiny GGUF files written as llama.cpp writes them import exactly as transformers loads them.

Every supported type on Llama (whose q/k rows llama.cpp permutes), a spread of types on Qwen2 (tied) and
Qwen3 (own head_dim, q/k norms). The reference is transformers' own GGUF loading of the same file; the
F32 import is also compared with the model the file was written from, which checks the name map and the
un-permutation independently of transformers.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from gguf_fixtures import build_gguf, folder_model, relative_logit_error, transformers_gguf_model
from safetensors.torch import load_file

from tensorscale.cli.main import cli
from tensorscale.gguf_import import import_gguf
from tensorscale.reading.source import open_source

TOLERANCE = 1e-5
ALL_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
# Every type on Llama (q/k permuted); the other families a spread of them (each type's decoding is the same code).
CASES = (
    [("llama", t) for t in ALL_TYPES]
    + [("qwen2", t) for t in ("F16", "Q8_0", "Q4_1", "Q4_K")]
    + [("qwen3", t) for t in ("BF16", "Q4_0", "Q5_K", "Q6_K")]
)


@pytest.mark.parametrize("model_type,qtype", CASES)
def test_import_matches_transformers_gguf_loading(tmp_path, model_type, qtype):
    path = build_gguf(tmp_path, model_type, qtype)
    folder = import_gguf(path, str(tmp_path / "imported"))
    ours, reference = folder_model(folder), transformers_gguf_model(path)
    assert relative_logit_error(reference, ours, ours.config.vocab_size) <= TOLERANCE
    theirs = reference.state_dict()
    for name, value in ours.state_dict().items():
        assert torch.equal(value, theirs[name]), name


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_f32_import_is_the_written_model(tmp_path, model_type):
    """An F32 GGUF holds the model's own values: the import gives back every tensor bit for bit, so the
    names and llama.cpp's q/k row order are undone right (not merely as transformers undoes them)."""
    import numpy as np
    from fixtures import tiny_model
    from gguf_fixtures import GGUF_TINY

    path = build_gguf(tmp_path, model_type, "F32", seed=3)
    original = tiny_model(model_type, seed=3, sizes=GGUF_TINY)
    config = original.config
    imported = load_file(os.path.join(import_gguf(path, str(tmp_path / "imported")), "model.safetensors"))
    expected = {
        k: v for k, v in original.state_dict().items() if not (config.tie_word_embeddings and k == "lm_head.weight")
    }
    assert sorted(imported) == sorted(expected)
    for name, value in expected.items():
        assert np.array_equal(imported[name].numpy(), value.numpy()), name


def test_row_spans_and_row_lists_decode_like_the_whole(tmp_path):
    """The engine reads row spans and scattered rows: any span of a permuted, quantized tensor equals the
    same rows of the whole decoded tensor."""
    from tensorscale.reading.tensor_reader import ShardReader

    source = open_source(build_gguf(tmp_path, "llama", "Q4_K"), headers_only=True)
    info = source.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert info.encoding is not None and info.encoding.head_rows == 64
    with ShardReader() as reader:
        whole = reader.read(info)
        for begin, end in ((0, 1), (31, 97), (100, 256), (255, 256)):
            assert torch.equal(reader.read_rows(info, begin, end), whole[begin:end])
            buffer = bytearray((end - begin) * whole.shape[1] * 4)
            assert torch.equal(reader.read_rows(info, begin, end, into=buffer), whole[begin:end])
        rows = [0, 5, 6, 63, 64, 200, 255]
        assert torch.equal(reader.read_row_list(info, rows), whole[rows])


def test_config_from_metadata(tmp_path):
    config = open_source(build_gguf(tmp_path, "qwen3", "Q8_0"), headers_only=True).config
    assert (
        config["model_type"],
        config["hidden_size"],
        config["intermediate_size"],
        config["num_hidden_layers"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
        config["vocab_size"],
        config["max_position_embeddings"],
        config["tie_word_embeddings"],
        config["dtype"],
    ) == ("qwen3", 256, 512, 2, 4, 2, 128, 96, 64, False, "float32")
    from gguf_fixtures import GGUF_TINY
    from transformers import AutoConfig

    written = AutoConfig.for_model("qwen3", **GGUF_TINY["qwen3"])
    assert config["rms_norm_eps"] == written.rms_norm_eps  # stored as float32, read back as the decimal written
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": written.rope_parameters["rope_theta"]}


def test_commands_take_a_gguf(tmp_path):
    """desc, plan and up take a .gguf like a folder; up's output is a standard checkpoint with the same function."""
    path = build_gguf(tmp_path, "llama", "Q4_1")
    runner = CliRunner()
    desc = runner.invoke(cli, ["desc", "-i", path, "--json"], catch_exceptions=False)
    assert desc.exit_code == 0 and json.loads(desc.output)["config"]["hidden_size"] == 256
    plan = runner.invoke(cli, ["plan", "-i", path, "-edm", "2", "--json"], catch_exceptions=False)
    assert plan.exit_code == 0, plan.output
    out = tmp_path / "wide"
    up = runner.invoke(
        cli,
        ["up", "-i", path, "-o", str(out), "-edm", "2", "-upm", "2", "-q", "--verify", "--manifest"],
        catch_exceptions=False,
    )
    assert up.exit_code == 0, up.output
    assert "PASS" in up.output
    with open(out / "tensorscale-manifest.json") as handle:
        assert json.load(handle)["source"]["path"] == os.path.abspath(path)
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(os.listdir(out))
    wide = folder_model(str(out))
    assert wide.config.hidden_size == 512 and wide.config.intermediate_size == 1024
    assert relative_logit_error(transformers_gguf_model(path), wide, 96) <= TOLERANCE


def test_batch_job_takes_a_gguf(tmp_path):
    import yaml

    path = build_gguf(tmp_path, "qwen2", "Q8_0")
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        yaml.safe_dump(
            {"jobs": [{"command": "up", "input": os.path.basename(path), "output": "wide", "embed_dim_multiplier": 2}]}
        )
    )
    result = CliRunner().invoke(cli, ["batch", str(jobs), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert relative_logit_error(transformers_gguf_model(path), folder_model(str(tmp_path / "wide")), 96) <= TOLERANCE


def test_desc_of_a_gguf_loads_neither_torch_nor_transformers(tmp_path):
    from fixtures import run_cli_in_fresh_process

    result = run_cli_in_fresh_process(
        ["desc", "-i", build_gguf(tmp_path, "llama", "Q4_K")], forbidden=("transformers", "torch")
    )
    assert result.returncode == 0, result.stderr


def test_verify_takes_a_gguf(tmp_path):
    """verify SRC.gguf DST: the GGUF is compared through its (cached) import."""
    path = build_gguf(tmp_path, "qwen3", "Q6_K")
    runner = CliRunner()
    up = runner.invoke(cli, ["up", "-i", path, "-o", str(tmp_path / "wide"), "-upm", "3", "-q"], catch_exceptions=False)
    assert up.exit_code == 0, up.output
    check = runner.invoke(cli, ["verify", path, str(tmp_path / "wide")], catch_exceptions=False)
    assert check.exit_code == 0 and "PASS" in check.output, check.output


def test_without_transformers_the_tokenizer_is_missing_and_said_so(tmp_path, monkeypatch, capsys):
    import tensorscale.reading.gguf_source as gguf_source

    path = build_gguf(tmp_path, "llama", "Q8_0", tokenizer=True)
    monkeypatch.setattr(gguf_source, "_has_transformers", lambda: False)
    folder = open_source(path).folder
    assert os.path.isfile(os.path.join(folder, "config.json"))
    assert not os.path.exists(os.path.join(folder, "tokenizer.json"))
    assert "transformers is not installed" in capsys.readouterr().err
    monkeypatch.undo()  # transformers "installed" again: the side folder is redone, the tokenizer converted
    assert open_source(path).folder == folder
    assert os.path.isfile(os.path.join(folder, "tokenizer.json"))


def test_split_gguf_is_refused_by_its_metadata_too(tmp_path):
    """The first part of a split keeps its name only by convention; split.count in the header says it too."""
    import gguf

    from tensorscale.errors import TensorscaleError

    path = str(tmp_path / "renamed.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint16("split.no", 0)
    writer.add_uint16("split.count", 2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with pytest.raises(TensorscaleError, match="split into 2 files.*llama-gguf-split --merge"):
        open_source(path, headers_only=True)
