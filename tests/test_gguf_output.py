"""GGUF as output: `up`/`down --format gguf` write a file that gguf-py reads back and transformers' GGUF loader
loads, in llama.cpp's names and layout, with the metadata rewritten for the new sizes and the rest carried over."""

from __future__ import annotations

import os

import gguf
import pytest
from click.testing import CliRunner
from gguf_fixtures import build_gguf, folder_model, relative_logit_error, transformers_gguf_model

from tensorscale.cli.main import cli
from tensorscale.gguf_import import import_gguf

TOLERANCE = 1e-5


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def fields(path):
    reader = gguf.GGUFReader(path)
    return reader, {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def source(request, tmp_path_factory):
    return build_gguf(tmp_path_factory.mktemp("gguf-out"), request.param, "Q4_1", tokenizer=True)


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
def test_up_to_gguf_keeps_the_function(source, tmp_path, outtype):
    """The wide GGUF computes what the source computes with its weights stored in the same type (HyperCloning's
    copies and halvings are exact in f16/bf16), under transformers' own GGUF loading."""
    out = tmp_path / f"wide-{outtype}.gguf"
    run("up", "-i", source, "-o", out, "-edm", "2", "-upm", "2", "-q", "--format", "gguf", "--outtype", outtype)
    reader, meta = fields(str(out))
    arch = meta["general.architecture"]
    assert (
        meta[f"{arch}.embedding_length"],
        meta[f"{arch}.feed_forward_length"],
        meta[f"{arch}.attention.head_count"],
        meta[f"{arch}.attention.head_count_kv"],
        meta[f"{arch}.block_count"],
    ) == (512, 1024, 8, 4, 2)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == outtype.upper() and kinds["blk.0.attn_norm.weight"] == "F32"
    assert list(reader.tensors[[t.name for t in reader.tensors].index("blk.0.attn_q.weight")].shape) == [512, 512]
    # everything that is not a size is carried over: tokenizer, chat template, name
    _, original = fields(source)
    for key, value in original.items():
        if key.startswith(("tokenizer.", "general.name")):
            assert meta[key] == value, key
    # the reference: the source itself written as GGUF of the same type (an identity rewrite)
    rounded = tmp_path / "rounded.gguf"
    run("up", "-i", source, "-o", rounded, "-q", "--format", "gguf", "--outtype", outtype)
    wide = transformers_gguf_model(str(out))
    assert relative_logit_error(transformers_gguf_model(str(rounded)), wide, 96) <= TOLERANCE
    if outtype == "f32":  # and in f32, the source's own function
        assert relative_logit_error(transformers_gguf_model(source), wide, 96) <= TOLERANCE


def test_q8_0_output_loads(source, tmp_path):
    out = tmp_path / "wide-q8.gguf"
    run("up", "-i", source, "-o", out, "-edm", "2", "-q", "--format", "gguf", "--outtype", "q8_0")
    reader, _ = fields(str(out))
    assert {t.tensor_type.name for t in reader.tensors} == {"Q8_0", "F32"}
    wide = transformers_gguf_model(str(out))
    # 8-bit rounding of every weight: close, not equal
    assert relative_logit_error(transformers_gguf_model(source), wide, 96) < 0.1


def test_down_of_up_through_gguf(source, tmp_path):
    """GGUF in, GGUF out, both ways: down(up(M)) written as GGUF is M again."""
    wide, back = tmp_path / "wide.gguf", tmp_path / "back.gguf"
    run("up", "-i", source, "-o", wide, "-edm", "2", "-upm", "2", "-q", "--format", "gguf", "--outtype", "f32")
    run("down", "-i", wide, "-o", back, "-edd", "2", "-upd", "2", "-q", "--format", "gguf", "--outtype", "f32")
    original, again = transformers_gguf_model(source), transformers_gguf_model(str(back))
    assert again.config.hidden_size == original.config.hidden_size
    assert relative_logit_error(original, again, 96) <= TOLERANCE


def test_safetensors_source_to_gguf(tmp_path):
    """A Hugging Face folder written as GGUF: the metadata comes from config.json."""
    folder = import_gguf(build_gguf(tmp_path, "qwen2", "F32"), str(tmp_path / "hf"))
    out = tmp_path / "from-hf.gguf"
    run("up", "-i", folder, "-o", out, "-upm", "2", "-q", "--format", "gguf", "--outtype", "f32")
    _, meta = fields(str(out))
    assert meta["qwen2.feed_forward_length"] == 1024 and meta["qwen2.embedding_length"] == 256
    assert meta["general.name"] == "from-hf"  # the file's name, not the temporary folder's it was built in
    assert relative_logit_error(folder_model(folder), transformers_gguf_model(str(out)), 96) <= TOLERANCE


def test_gguf_output_refusals(source, tmp_path):
    existing = tmp_path / "there.gguf"
    existing.write_bytes(b"mine")
    for args, fragment in (
        (["-o", existing], "exists; pass --force"),
        (["-o", tmp_path / "folder-out"], "name ending in .gguf"),
        (["-o", tmp_path / "x.gguf", "--verify-files"], "does not combine"),
    ):
        result = CliRunner().invoke(cli, ["up", "-i", source, "-edm", "2", "-q", "--format", "gguf", *map(str, args)])
        assert result.exit_code == 2 and fragment in result.output, result.output
    assert existing.read_bytes() == b"mine"
    result = CliRunner().invoke(cli, ["up", "-i", source, "-o", tmp_path / "y", "--outtype", "q8_0"])
    assert result.exit_code == 2 and "--format gguf" in result.output
    assert not [name for name in os.listdir(tmp_path) if "tensorscale-tmp" in name]


def test_force_never_replaces_a_gguf_input(tmp_path):
    """A GGUF input is a file, not a folder: `-o` onto the folder that holds it, or onto the file itself, with
    --force must be refused before any work, and the input must survive (issue 14's --force rule for GGUF)."""
    project = tmp_path / "proj"
    project.mkdir()
    model = build_gguf(project, "llama", "Q8_0")
    before = open(model, "rb").read()
    for args, fragment in (
        (["-o", project, "--force"], "the input"),
        (["-o", model, "--force", "--format", "gguf"], "is the input"),
    ):
        result = CliRunner().invoke(cli, ["up", "-i", model, "-edm", "2", "-q", *map(str, args)])
        assert result.exit_code == 2 and fragment in result.output, result.output
        assert open(model, "rb").read() == before
    assert sorted(os.listdir(project)) == [os.path.basename(model)]


def test_gguf_output_never_takes_over_a_temp_folder_of_the_same_pid(tmp_path):
    """Two runs with the same PID (PID 1 in two containers) writing one OUT.gguf: the temporary folder that
    another run is filling must survive (issue 14 item 8, for GGUF output)."""
    model = build_gguf(tmp_path, "llama", "Q8_0")
    out = tmp_path / "wide.gguf"
    other_run = tmp_path / f".wide.gguf.tensorscale-tmp-{os.getpid()}"
    other_run.mkdir()
    (other_run / "model.safetensors").write_bytes(b"another run's half-written shard")
    run("up", "-i", model, "-o", out, "-edm", "2", "-q", "--format", "gguf")
    assert out.is_file()
    assert (other_run / "model.safetensors").read_bytes() == b"another run's half-written shard"
