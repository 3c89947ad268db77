"""`up` beyond whole multiples: the top-left (zero-pad) strategy and any target width.

Every architecture with RMSNorm must keep its logits under both; LayerNorm architectures must refuse what
cannot be exact (zeros or uneven copies in the hidden space) and still take any FFN size (Net2Net)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from click.testing import CliRunner
from fixtures import build_checkpoint, read_config, relative_logit_error

from tensorscale.cli.main import cli
from tensorscale.convert import run_up
from tensorscale.errors import TensorscaleError
from tensorscale.ops.library import Gather, OpContext
from tensorscale.planning.plan import UpOptions
from tensorscale.rulebook.compile import Space
from tensorscale.rulebook.layout import plan_layouts

TOLERANCE = 1e-5
RMS_ARCHITECTURES = ["llama", "qwen2", "qwen3", "smollm3", "olmo2", "mistral", "phi3", "gemma", "gemma2", "gemma3_text"]
LAYERNORM_ARCHITECTURES = ["phi", "gpt_neox", "stablelm", "gpt2", "opt"]

# (strategy, targets): the tiny models have hidden 32, FFN 48 (GPT-2: 128), 4 heads over 2 kv heads.
RMS_CASES = {
    "pad-x2": ("pad", dict(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=4)),
    "clone-any": ("clone", dict(hidden_size=48, intermediate_size=70, num_attention_heads=6, num_key_value_heads=3)),
    "pad-any": ("pad", dict(hidden_size=48, intermediate_size=50, num_attention_heads=6, num_key_value_heads=3)),
}


def up(source, output, strategy="clone", n=1, m=1, **targets):
    return run_up(str(source), str(output), UpOptions(n, m, strategy=strategy, targets=targets), show_progress=False)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("width-sources")
    return {arch: build_checkpoint(folder / arch, arch, seed=3) for arch in RMS_ARCHITECTURES + LAYERNORM_ARCHITECTURES}


@pytest.mark.parametrize("case", sorted(RMS_CASES))
@pytest.mark.parametrize("arch", RMS_ARCHITECTURES)
def test_rmsnorm_models_keep_their_logits(sources, tmp_path, arch, case):
    strategy, targets = RMS_CASES[case]
    up(sources[arch], tmp_path / "out", strategy, **targets)
    config = read_config(tmp_path / "out")
    assert config["hidden_size"] == targets["hidden_size"]
    assert config["intermediate_size"] == targets["intermediate_size"]
    assert config["num_attention_heads"] == targets["num_attention_heads"]
    assert config["num_key_value_heads"] == targets["num_key_value_heads"]
    error = relative_logit_error(sources[arch], tmp_path / "out")
    assert error <= TOLERANCE, f"{arch} {case}: relative logit error {error:.3g}"


def test_multipliers_with_pad_match_targets(sources, tmp_path):
    """-edm 2 -upm 2 --strategy pad is the same rewrite as the explicit doubled targets."""
    up(sources["llama"], tmp_path / "a", "pad", 2, 2)
    up(
        sources["llama"],
        tmp_path / "b",
        "pad",
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_pad_places_the_source_top_left(sources, tmp_path):
    from safetensors.torch import load_file

    up(sources["llama"], tmp_path / "out", "pad", 2, 2)
    before = load_file(os.path.join(sources["llama"], "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name in (
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.embed_tokens.weight",
    ):
        rows, cols = before[name].shape
        assert torch.equal(after[name][:rows, :cols], before[name]), name
        assert after[name][rows:].abs().sum() == 0 and after[name][:, cols:].abs().sum() == 0, name
    gain = after["model.layers.0.input_layernorm.weight"]
    assert torch.allclose(gain[:32], before["model.layers.0.input_layernorm.weight"] * math.sqrt(32 / 64))
    assert gain[32:].abs().sum() == 0
    assert read_config(tmp_path / "out")["rms_norm_eps"] == pytest.approx(
        read_config(sources["llama"])["rms_norm_eps"] / 2
    )


@pytest.mark.parametrize("arch", LAYERNORM_ARCHITECTURES)
def test_layernorm_models_take_any_ffn_and_whole_hidden_multiples(sources, tmp_path, arch):
    ffn = 170 if arch == "gpt2" else 70
    up(sources[arch], tmp_path / "ffn", intermediate_size=ffn)
    assert relative_logit_error(sources[arch], tmp_path / "ffn") <= TOLERANCE
    up(sources[arch], tmp_path / "both", hidden_size=64, intermediate_size=ffn * 2 + 10)
    assert relative_logit_error(sources[arch], tmp_path / "both") <= TOLERANCE


@pytest.mark.parametrize("arch", LAYERNORM_ARCHITECTURES)
@pytest.mark.parametrize("args", [["--strategy", "pad", "-edm", "2"], ["--hidden-size", "48"]])
def test_layernorm_models_refuse_zeros_in_the_hidden_state(sources, tmp_path, arch, args):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["up", "-i", sources[arch], "-o", str(out), "-q", *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "LayerNorm" in lines[0] and "whole multiples" in lines[0]
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, words",
    [
        (["--hidden-size", "16"], "use `down`"),
        (
            ["--num-attention-heads", "6", "--num-key-value-heads", "3"],
            "hidden_size must be a multiple of num_attention_heads",
        ),
        (
            ["--strategy", "pad", "--num-attention-heads", "8", "--num-key-value-heads", "8", "--hidden-size", "64"],
            "no copy next to its own kv_heads unit",
        ),
    ],
)
def test_impossible_targets_get_one_line(sources, tmp_path, args, words):
    result = CliRunner().invoke(cli, ["up", "-i", sources["llama"], "-o", str(tmp_path / "out"), "-q", *args])
    assert result.exit_code == 2, result.output
    assert words in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_plan_says_what_each_space_does(sources):
    result = CliRunner().invoke(
        cli, ["plan", "-i", sources["llama"], "--json", "--hidden-size", "48", "--intermediate-size", "70"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["mode"] == "up" and data["targets"] == {"hidden_size": 48, "intermediate_size": 70}
    assert data["spaces"]["hidden"] == "32 -> 48 units: top-left copy, 16 zero units, norm gains x0.8165"
    assert data["spaces"]["ffn"].startswith("48 -> 70 units: clone 22 of 48 units once more (Net2Net")
    text = CliRunner().invoke(cli, ["plan", "-i", sources["llama"], "--strategy", "pad", "-edm", "2"]).output
    assert "spaces (zero-pad):" in text and "hidden: 32 -> 64 units: top-left copy, 32 zero units" in text
    # targets below the model's sizes preview down, said so
    down = CliRunner().invoke(
        cli,
        [
            "plan",
            "down",
            "-i",
            sources["llama"],
            "--json",
            "--hidden-size",
            "16",
            "--num-attention-heads",
            "2",
            "--num-key-value-heads",
            "1",
        ],
    )
    assert down.exit_code == 0, down.output
    assert json.loads(down.output)["mode"] == "down"


def test_bfloat16_rounding_is_reported_and_measured(tmp_path):
    source = build_checkpoint(tmp_path / "src", "llama", dtype=torch.bfloat16, seed=5)
    inexact = CliRunner().invoke(cli, ["up", "-i", source, "-o", str(tmp_path / "a"), "--hidden-size", "48"])
    assert inexact.exit_code == 0, inexact.output
    assert "note: not exact in bfloat16" in inexact.output and "--dtype float32" in inexact.output
    assert relative_logit_error(source, tmp_path / "a") > 1e-4  # the gains ×sqrt(2/3) round in bf16
    # pad ×4: the gain factor is 1/2, exact in any binary float; no note, and the logits are kept
    exact = CliRunner().invoke(cli, ["up", "-i", source, "-o", str(tmp_path / "b"), "--strategy", "pad", "-edm", "4"])
    assert exact.exit_code == 0 and "note:" not in exact.output
    assert relative_logit_error(source, tmp_path / "b") <= TOLERANCE
    # any FFN width in bf16: copies divided by uneven counts (2 and 3) still sum back
    uneven = CliRunner().invoke(cli, ["up", "-i", source, "-o", str(tmp_path / "c"), "--intermediate-size", "110"])
    assert uneven.exit_code == 0 and "note:" not in uneven.output
    assert relative_logit_error(source, tmp_path / "c") <= 1e-5


def _space(name, size, target, unit=1, within=None, norm=None):
    return Space(name, size, target, unit, "tile", within=within, norm=norm)


def test_query_heads_stay_with_their_kv_heads():
    spaces = {"kv": _space("kv", 2, 3), "q": _space("q", 4, 12, within="kv")}
    layouts = plan_layouts(spaces, "clone")
    kv, q = layouts["kv"].sources, layouts["q"].sources
    assert kv == (0, 1, 0)
    per_group = 4
    for j, source in enumerate(q):
        assert source // 2 == kv[j // per_group]  # source q head's kv head is the new group's kv head
    assert set(q) == {0, 1, 2, 3}
    pad = plan_layouts({"kv": _space("kv", 2, 4), "q": _space("q", 4, 8, within="kv")}, "pad")
    assert pad["q"].sources == (0, 1, 2, 3, None, None, None, None) and pad["kv"].sources == (0, 1, None, None)


def test_layout_gains_and_copies():
    hidden = plan_layouts({"h": _space("h", 4, 10, norm="rms")}, "clone")["h"]
    assert hidden.sources == (0, 1, 2, 3, 0, 1, 2, 3, None, None)
    assert hidden.norm_gain == pytest.approx(math.sqrt(2 * 4 / 10))
    ffn = plan_layouts({"f": _space("f", 4, 6)}, "clone")["f"]
    assert ffn.sources == (0, 1, 2, 3, 0, 1) and ffn.counts == [2, 2, 1, 1]
    with pytest.raises(TensorscaleError, match="LayerNorm"):
        plan_layouts({"h": _space("h", 4, 6, norm="layer")}, "clone")
    assert plan_layouts({"h": _space("h", 4, 8, norm="layer")}, "clone")["h"].tiles == 2


@pytest.mark.parametrize("snr_db", [None, 10.0])
def test_gather_divide_sums_back(snr_db):
    torch.manual_seed(0)
    weight = torch.randn(5, 12).to(torch.bfloat16)
    op = Gather(axis=1, unit=3, sources=(0, 1, 2, 3, 0, 0, 1, None), divide=True, snr_db=snr_db)
    out = op.apply(weight, OpContext(torch.bfloat16, seed=1, tensor_name="w"), 0)
    assert out.shape == op.out_shape(tuple(weight.shape)) == (5, 24)
    blocks = out.float().unflatten(1, (8, 3))
    assert blocks[:, 7].abs().sum() == 0  # the zero unit
    source = weight.float().unflatten(1, (4, 3))
    for unit, copies in {0: [0, 4, 5], 1: [1, 6], 2: [2], 3: [3]}.items():
        total = blocks[:, copies].sum(dim=1)
        assert torch.allclose(total, source[:, unit], rtol=0, atol=1e-2 * source.abs().max().item())
        if snr_db is not None and len(copies) > 1:
            assert not torch.equal(blocks[:, copies[0]], blocks[:, copies[1]])  # noise broke the symmetry
    copy = Gather(axis=0, unit=2, sources=(1, None, 0))
    rows = torch.arange(8.0).reshape(4, 2)
    assert torch.equal(
        copy.apply(rows, OpContext(torch.float32), 0), torch.tensor([[4.0, 5], [6, 7], [0, 0], [0, 0], [0, 1], [2, 3]])
    )
