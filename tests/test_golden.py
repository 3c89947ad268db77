"""Golden test: the engine's Llama output equals, tensor for tensor, a HyperCloned Llama built here by an
independent plain-torch reference (no rules, no engine code)."""

from __future__ import annotations

import torch
from fixtures import build_checkpoint
from safetensors.torch import load_file

from tensorscale.convert import run_up
from tensorscale.planning.plan import UpOptions


def tile_rows(w, n):
    return torch.cat([w] * n, dim=0)


def tile_cols_divided(w, n):
    return torch.cat([w / n] * n, dim=1)


def reference_hypercloning(state: dict, n: int, m: int) -> dict:
    """HyperCloning written out by hand for a Llama state dict (untied)."""
    out = {}
    for name, w in state.items():
        if name == "model.embed_tokens.weight":
            out[name] = torch.cat([w] * n, dim=1)
        elif name == "lm_head.weight":
            out[name] = tile_cols_divided(w, n)
        elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
            out[name] = tile_cols_divided(tile_rows(w, n), n)
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            out[name] = tile_cols_divided(tile_rows(w, m), n)
        elif name.endswith("down_proj.weight"):
            out[name] = tile_cols_divided(tile_rows(w, n), m)
        elif name.endswith("norm.weight"):
            out[name] = torch.cat([w] * n)
        else:
            raise AssertionError(f"reference does not know {name}")
    return out


def test_engine_matches_reference(tmp_path):
    source = build_checkpoint(tmp_path / "src", "llama", tie_word_embeddings=False)
    run_up(source, str(tmp_path / "out"), UpOptions(2, 3), show_progress=False)
    expected = reference_hypercloning(load_file(f"{source}/model.safetensors"), 2, 3)
    actual = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
        # ÷3 is not exact in float32: the engine's blocks sum back to W, the reference's are each W/3.
        torch.testing.assert_close(actual[name], expected[name], rtol=2e-6, atol=1e-7, msg=name)
