"""The later architectures' special cases that the per-architecture suites (test_up_exactness, test_down) do
not reach: Gemma stored in bf16 (÷sqrt(n) is exact only for n a power of 4), OPT post-LN and with
word_embed_proj_dim ≠ hidden_size, GPT-2's `n_inner: null`, Phi-3's fused projections under `down`, and Gemma 2
with softcaps that bind (refit on these layouts: test_refit_architectures)."""

from __future__ import annotations

import pytest
import torch
from fixtures import build_checkpoint, load, logits, read_config, relative_logit_error

from tensorscale.convert import execute_plan, plan_down, run_up
from tensorscale.ops.library import Fused, Merge
from tensorscale.planning.plan import DownOptions, UpOptions

TOLERANCE = 1e-5


def up(source, output, n, m, **options):
    run_up(str(source), str(output), UpOptions(n, m, **options), show_progress=False)
    return str(output)


def down(source, output, n, m, **kwargs):
    plan = plan_down(str(source), DownOptions(embed_dim_divisor=n, up_proj_divisor=m), **kwargs)
    execute_plan(plan, str(output), show_progress=False)
    return plan


def same_config(a, b):
    ignored = {"transformers_version"}
    return {k: v for k, v in read_config(a).items() if k not in ignored} == {
        k: v for k, v in read_config(b).items() if k not in ignored
    }


# ---- Gemma in bf16 -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_bf16(tmp_path_factory):
    return build_checkpoint(
        tmp_path_factory.mktemp("gemma-bf16"), "gemma", dtype=torch.bfloat16, tie_word_embeddings=True
    )


# (n, options, lowest, highest): measured relative logit error on this checkpoint in the comment.
GEMMA_BF16 = {
    # ÷sqrt(4) = ÷2 is exact, and untied the head's ÷4 blocks are too: float32 compute rounding only
    # (8e-7; 3e-7 to 2e-6 on gemma, gemma2, gemma3_text, two seeds each).
    "n4 untie": (4, dict(untie_embeddings=True), 0.0, TOLERANCE),
    # ÷sqrt(2) is rounded in every embedding entry: 5.8e-3 (1.1e-3 to 1.3e-2 over the three Gemmas).
    "n2 untie": (2, dict(untie_embeddings=True), 1e-4, 3e-2),
    # Keeping the tie stores (1+w)/2 − 1 for the final norm: the −1 moves w to a coarser binade, so even n=4
    # rounds: 9.0e-4 (9e-4 to 1.5e-3 over the three Gemmas).
    "n4 keep tie": (4, dict(), 1e-4, 5e-3),
    # float32 output of the bf16 source: exact at any n.
    "n2 float32": (2, dict(dtype="float32"), 0.0, TOLERANCE),
}


@pytest.mark.parametrize("case", sorted(GEMMA_BF16))
def test_gemma_bf16(gemma_bf16, tmp_path, case):
    n, options, lowest, highest = GEMMA_BF16[case]
    out = up(gemma_bf16, tmp_path / "up", n, 1, **options)
    error = relative_logit_error(gemma_bf16, out)
    assert lowest <= error <= highest, f"{case}: relative logit error {error:.3g} outside [{lowest}, {highest}]"
    if highest == TOLERANCE and "dtype" not in options:
        # The exact case also comes back: down(up(M)) = M bit for bit in bf16.
        down(out, tmp_path / "down", n, 1)
        assert relative_logit_error(gemma_bf16, tmp_path / "down") == 0.0


# ---- OPT: post-LN, and an embedding narrower than the hidden size ----------------------------------

OPT_CASES = {
    # opt-350m is post-LN: no decoder.final_layer_norm; a tied head reads the last layer's final_layer_norm.
    "post-LN tied": dict(do_layer_norm_before=False, tie_word_embeddings=True),
    "post-LN untied": dict(do_layer_norm_before=False, tie_word_embeddings=False),
    # word_embed_proj_dim ≠ hidden_size: project_in / project_out exist; a tied head reads project_out.
    "projected tied": dict(word_embed_proj_dim=16, tie_word_embeddings=True),
    "post-LN projected tied": dict(do_layer_norm_before=False, word_embed_proj_dim=16, tie_word_embeddings=True),
}


@pytest.mark.parametrize("case", sorted(OPT_CASES))
def test_opt_layouts_up_and_down(tmp_path, case):
    source = build_checkpoint(tmp_path / "src", "opt", **OPT_CASES[case])
    out = up(source, tmp_path / "up", 2, 3, snr_db=20.0)
    assert relative_logit_error(source, out) <= TOLERANCE
    config = read_config(out)
    assert config["word_embed_proj_dim"] == 2 * read_config(source)["word_embed_proj_dim"]
    plan = down(out, tmp_path / "down", 2, 3)
    assert all(fold.exact for fold in plan.down.folds.by_key.values())
    assert same_config(source, tmp_path / "down")
    assert relative_logit_error(source, tmp_path / "down") <= TOLERANCE


# ---- GPT-2: n_inner null means 4·n_embd -------------------------------------------------------------


@pytest.mark.parametrize(
    "n_inner,n,m,expected",
    [
        (None, 2, 1, 128),  # FFN kept at 128 while n_embd doubles: null would now mean 256, so it is written
        (None, 2, 2, None),  # 4·64 = 256 is the default again: stays null
        (64, 2, 3, 192),  # explicit: multiplied
    ],
)
def test_gpt2_n_inner(tmp_path, n_inner, n, m, expected):
    source = build_checkpoint(tmp_path / "src", "gpt2", n_inner=n_inner, tie_word_embeddings=False)
    out = up(source, tmp_path / "up", n, m)
    assert read_config(out)["n_inner"] == expected
    assert relative_logit_error(source, out) <= TOLERANCE
    down(out, tmp_path / "down", n, m)
    assert read_config(tmp_path / "down")["n_inner"] == n_inner
    assert relative_logit_error(source, tmp_path / "down") <= TOLERANCE


# ---- Phi-3: fused parts of one space fold with one clustering ---------------------------------------


def _fused_merges(tensor):
    """The Merge of each part of the tensor's fused axis (None for a part left alone)."""
    (fused,) = [op for op in tensor.ops if isinstance(op, Fused)]
    return [next((o for o in chain if isinstance(o, Merge)), None) for chain in fused.parts]


def test_phi3_fused_parts_share_clusters(tmp_path):
    """On an ordinary model (no copies: k-means), gate and up rows, and k and v rows, must still be merged
    with the same clusters as the columns of down_proj / o_proj that read them."""
    # 4 kv heads (as many as q heads) so that k and v really fold 4 -> 2.
    source = build_checkpoint(tmp_path / "src", "phi3", tie_word_embeddings=False, num_key_value_heads=4)
    plan = down(source, tmp_path / "down", 2, 2)
    assert not all(fold.exact for fold in plan.down.folds.by_key.values())
    by_name = {t.name: t for t in plan.tensors}
    for layer in range(2):
        prefix = f"model.layers.{layer}."
        gate, up_ = _fused_merges(by_name[prefix + "mlp.gate_up_proj.weight"])
        (ffn_in,) = [
            op for op in by_name[prefix + "mlp.down_proj.weight"].ops if isinstance(op, Merge) and op.axis == 1
        ]
        assert gate.cluster == up_.cluster == ffn_in.cluster
        q, k, v = _fused_merges(by_name[prefix + "self_attn.qkv_proj.weight"])
        (heads_in,) = [
            op for op in by_name[prefix + "self_attn.o_proj.weight"].ops if isinstance(op, Merge) and op.axis == 1
        ]
        assert k.cluster == v.cluster and q.cluster == heads_in.cluster
        assert sorted(set(k.cluster)) == [0, 1]
        # One q head per kv head, before and after: q head j folds exactly like kv head j.
        assert q.cluster == k.cluster
    model, info = load(tmp_path / "down")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.isfinite(logits(model)).all()
    assert read_config(tmp_path / "down")["intermediate_size"] == 24


# ---- Gemma 2 with softcaps that bind ----------------------------------------------------------------


def test_gemma2_softcapping(tmp_path):
    caps = dict(attn_logit_softcapping=1.0, final_logit_softcapping=2.0)
    source = build_checkpoint(tmp_path / "src", "gemma2", **caps)
    model, _ = load(source)
    capped = logits(model)
    assert capped.abs().max() <= 2.0
    model.config.final_logit_softcapping = None
    assert logits(model).abs().max() > 4.0, "the final softcap does not bind on this model"
    out = up(source, tmp_path / "up", 2, 2, snr_db=20.0)
    config = read_config(out)
    assert (config["attn_logit_softcapping"], config["final_logit_softcapping"]) == (1.0, 2.0)
    assert relative_logit_error(source, out) <= TOLERANCE
    down(out, tmp_path / "down", 2, 2)
    assert same_config(source, tmp_path / "down")
    assert relative_logit_error(source, tmp_path / "down") <= TOLERANCE


# ---- StableLM's per-head q/k norms (one tensor per head index) ------------------------------------


@pytest.mark.parametrize("n, m, tie, snr", [(2, 2, False, 20.0), (3, 2, True, None)])
def test_stablelm_per_head_norms_fold_back_exactly(tmp_path, n, m, tie, snr):
    """Before: down of a HyperCloned StableLM with qk_layernorm failed with "replicate.count must be a whole
    number >= 0, got 0.5". Each output head now takes the norm of its cluster's first head (copies), so
    down(up(M)) is M again: the same tensor names (norms.0..A-1), values, config and logits."""
    from safetensors.torch import load_file

    source = build_checkpoint(
        tmp_path / "src",
        "stablelm",
        tie_word_embeddings=tie,
        qk_layernorm=True,
        use_parallel_residual=True,
        use_qkv_bias=True,
    )
    up(source, tmp_path / "up", n, m, snr_db=snr)
    assert read_config(tmp_path / "up")["num_attention_heads"] == 4 * n
    plan = down(tmp_path / "up", tmp_path / "down", n, m)
    assert all(fold.exact for fold in plan.down.folds.by_key.values())
    assert same_config(source, tmp_path / "down")
    original, folded = load_file(f"{source}/model.safetensors"), load_file(f"{tmp_path}/down/model.safetensors")
    assert sorted(original) == sorted(folded)
    norms = [name for name in original if "layernorm.norms." in name]
    assert len(norms) == 2 * (4 + 2)  # layers × (q heads + kv heads), weights only (no bias)
    for name in norms:
        assert torch.equal(original[name], folded[name]), name
    assert relative_logit_error(source, tmp_path / "down") <= TOLERANCE


def test_stablelm_per_head_norms_follow_a_real_head_fold(tmp_path):
    """Not a HyperCloned model: 4/2 heads down to 2/1. Every output head has one norm, taken from a source
    head of its cluster, and the model loads with no missing or unexpected keys."""
    from safetensors.torch import load_file

    source = build_checkpoint(tmp_path / "src", "stablelm", qk_layernorm=True)
    plan = plan_down(source, DownOptions(targets=dict(num_attention_heads=2, num_key_value_heads=1, hidden_size=16)))
    execute_plan(plan, str(tmp_path / "down"), show_progress=False)
    original, folded = load_file(f"{source}/model.safetensors"), load_file(f"{tmp_path}/down/model.safetensors")
    for layer in range(2):
        fold = plan.down.folds.by_key[("heads", layer)]
        for j, head in enumerate(fold.representatives()):
            assert fold.cluster[head] == j
            name = f"model.layers.{layer}.self_attn.q_layernorm.norms.{{}}.weight"
            assert torch.equal(folded[name.format(j)], original[name.format(head)])
    assert not [name for name in folded if ".norms.2." in name or "k_layernorm.norms.1." in name]
    model, info = load(tmp_path / "down")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize(
    "unit_of, match, words",
    [
        ("nope", r"norms\.(?P<h>\d+)\.weight", "must name a space"),
        ("heads", r"norms\.(\d+)\.weight", r"group \(\?P<h>"),
    ],
)
def test_replicate_unit_of_is_checked_when_the_rules_load(unit_of, match, words):
    from tensorscale.rulebook.schema import RulesError, load_rules_text

    text = (
        "name: t\nspaces:\n  heads: {size: hidden_size, grow: n}\ntensors:\n"
        f"  - match: '{match}'\n    replicate: {{count: n, name: 'norms.{{h}}.weight', unit_of: {unit_of}}}\n"
    )
    with pytest.raises(RulesError, match=words):
        load_rules_text(text)
