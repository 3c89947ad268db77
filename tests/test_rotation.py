"""The residual-stream rotation of `down --method refit` (folding.rotation): the projection's math, and on
whole models that a stream living in a rotated subspace is cut exactly, which keeping dimensions cannot do."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import build_checkpoint, read_config, relative_logit_error
from safetensors.torch import load_file, save_file

from tensorscale.folding.rotation import gain_groups, project_axis, project_gain, residual_projection


def _moment(seed=0, size=12, tokens=400):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, size, generator=g, dtype=torch.float64) @ torch.randn(
        size, size, generator=g, dtype=torch.float64
    )
    return x.T @ x


def test_the_projection_is_orthonormal_and_keeps_the_most_energy():
    moment = _moment()
    projection, kept = residual_projection(moment, 5)
    assert projection.shape == (12, 5)
    assert torch.allclose(projection.T @ projection, torch.eye(5, dtype=torch.float64), atol=1e-10)
    # no 5 coordinate dimensions keep as much: PCA is optimal among all 5-dimensional subspaces
    best_coordinates = float(moment.diagonal().sort(descending=True).values[:5].sum() / moment.diagonal().sum())
    assert kept > best_coordinates
    assert kept == pytest.approx(float(torch.linalg.eigvalsh(moment)[-5:].sum() / moment.diagonal().sum()))


def test_massive_dimensions_are_kept_as_they_are():
    moment = _moment()
    projection, _ = residual_projection(moment, 4, always=[3, 7])
    assert torch.equal(projection[:, 0], torch.eye(12, dtype=torch.float64)[3])
    assert torch.equal(projection[:, 1], torch.eye(12, dtype=torch.float64)[7])
    assert projection[[3, 7], 2:].abs().max() == 0  # the other directions leave them alone


def test_a_tied_gain_is_only_mixed_within_its_groups():
    gain = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.01, -1.0, 3.0, 3.0, 3.0, 3.0], dtype=torch.float64)
    groups = gain_groups(gain)
    assert sorted(map(sorted, groups)) == [[0, 1, 2], [3, 4, 5, 6], [7], [8, 9, 10, 11]]
    projection, _ = residual_projection(_moment(), 12, tied_gain=gain)
    # a full-size rotation within the groups commutes with diag(gain) exactly
    rotated = projection.T @ torch.diag(gain) @ projection
    assert torch.allclose(rotated, torch.diag(rotated.diagonal()), atol=0.02)
    assert torch.allclose(project_gain(gain, projection).sort().values, gain.sort().values, atol=0.02)


def test_projecting_an_axis_is_x_times_p_on_that_axis():
    projection, _ = residual_projection(_moment(), 5)
    weight = torch.randn(7, 12, dtype=torch.float64)
    assert torch.allclose(project_axis(weight, 1, projection), weight @ projection)
    assert torch.allclose(project_axis(weight.T, 0, projection), projection.T @ weight.T)
    gain = torch.rand(12, dtype=torch.float64)
    expected = (projection.T @ torch.diag(gain) @ projection).diagonal()
    assert torch.allclose(project_gain(gain, projection), expected)
    assert torch.allclose(project_gain(gain - 1, projection, one_plus=True), expected - 1)


# ---- whole models ---------------------------------------------------------------------------------------

READERS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight", "lm_head.weight")
WRITERS = ("o_proj.weight", "down_proj.weight")


def _rotated_low_rank(folder, dead=4, seed=1):
    """A Llama whose residual stream lives in a subspace of `dead` fewer dimensions that no coordinate axis
    lines up with: `dead` dimensions carry nothing, the norm gains are 1 (so a rotation commutes with every
    RMSNorm), and then the whole residual basis is turned by a random rotation R (e -> e R, readers W R,
    writers Rᵀ W). The model computes what it did before; only a rotated cut can drop the dead subspace."""
    path = f"{folder}/model.safetensors"
    weights = load_file(path)
    hidden = read_config(folder)["hidden_size"]
    off = list(range(hidden - dead, hidden))
    rotation, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(seed)))
    for name, tensor in weights.items():
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        elif name.endswith(READERS):
            tensor[:, off] = 0
            weights[name] = tensor @ rotation
        elif name.endswith(WRITERS):
            tensor[off, :] = 0
            weights[name] = rotation.T @ tensor
        elif name.endswith("embed_tokens.weight"):
            tensor[:, off] = 0
            weights[name] = tensor @ rotation
    save_file({k: v.contiguous() for k, v in weights.items()}, path, metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("tied", [False, True])
def test_a_stream_in_a_rotated_subspace_is_cut_exactly(tmp_path, tied):
    from test_inference import save_tokenizer
    from test_refit import _calibration_file, _down

    source = _rotated_low_rank(build_checkpoint(tmp_path / "src", "llama", tie_word_embeddings=tied))
    save_tokenizer(source)
    args = ["-i", source, "-o", tmp_path / "out", "--method", "refit", "--hidden-size", 28, "--json"]
    result = _down([*args, "--calibration", _calibration_file(tmp_path), "--calibration-tokens", 1024])
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["calibration"]["hidden_cut"] == "rotate"
    assert summary["calibration"]["hidden_energy_kept"] == pytest.approx(1.0, abs=1e-6)
    assert summary["calibration"]["kl"] < 1e-6
    assert read_config(tmp_path / "out")["hidden_size"] == 28
    assert read_config(tmp_path / "out")["tie_word_embeddings"] is tied
    assert relative_logit_error(source, tmp_path / "out") < 1e-3


def test_keeping_dimensions_cannot_cut_a_rotated_stream(tmp_path):
    """The same model cut by keeping 28 of its 32 dimensions loses what the 4 dropped ones carried: the
    reason the rotation exists (and proof that the test above can fail)."""
    from test_inference import save_tokenizer
    from test_refit import _calibration_file

    from tensorscale.folding import layerwise

    source = _rotated_low_rank(build_checkpoint(tmp_path / "src", "llama", tie_word_embeddings=False))
    save_tokenizer(source)
    from click.testing import CliRunner

    from tensorscale.cli.main import cli

    original = layerwise.LayerwiseDown.__init__

    def selecting(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "hidden_cut": "select"})

    layerwise.LayerwiseDown.__init__ = selecting
    try:
        args = ["down", "-i", source, "-o", str(tmp_path / "out"), "--method", "refit", "--hidden-size", "28"]
        args += ["--calibration", str(_calibration_file(tmp_path)), "--calibration-tokens", "1024", "--json"]
        result = CliRunner().invoke(cli, args)
    finally:
        layerwise.LayerwiseDown.__init__ = original
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["calibration"]["hidden_cut"] == "select"
    assert summary["calibration"]["kl"] > 1e-4


def test_a_stream_with_post_norms_keeps_dimensions(tmp_path):
    """OLMo-2 normalises each sublayer's output before it joins the stream: a per-dimension gain written
    straight into the stream cannot be rotated, so the cut keeps dimensions there, and says why."""
    from test_inference import save_tokenizer
    from test_refit import _calibration_file, _down

    source = build_checkpoint(tmp_path / "src", "olmo2")
    save_tokenizer(source)
    args = ["-i", source, "-o", tmp_path / "out", "--method", "refit", "--hidden-size", 28, "--json"]
    result = _down([*args, "--calibration", _calibration_file(tmp_path), "--calibration-tokens", 512])
    assert result.returncode == 0, result.stderr
    calibration = json.loads(result.stdout)["calibration"]
    assert calibration["hidden_cut"] == "select"
    assert "post_attention_layernorm" in calibration["hidden_cut_reason"]
    assert relative_logit_error(source, tmp_path / "out") < 1.0  # it loads, with every key
