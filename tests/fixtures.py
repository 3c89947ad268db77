"""Tiny checkpoints for tests, built with transformers `from_config` and re-randomised at large scale.

Default initialisation gives near-uniform attention, under which a wrong head order changes the logits by
only ~0.01: a weak test. We redraw every weight at a scale where attention is peaked (std 2/sqrt(fan_in),
norm weights 1±0.3 — gains 1±0.3 for (1+w) norms —, biases nonzero), so ordering bugs show errors of 20-50
while correct rewrites stay at float32 rounding.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager

import torch

# One tiny config per model type. Multi-layer, GQA where the architecture has it.
_BASE_MHA = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
_BASE = dict(_BASE_MHA, num_key_value_heads=2)

TINY = {
    "llama": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),
    "qwen2": dict(_BASE),
    # Qwen3's head_dim defaults to 128, not hidden/heads: give it explicitly (test_up_variants covers 16).
    "qwen3": dict(_BASE, head_dim=8),
    # SmolLM3's default token ids (128000...) are outside a 96-token vocabulary.
    "smollm3": dict(_BASE, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "olmo2": dict(_BASE, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "phi": dict(_BASE),
    # No GQA in GPT-NeoX; parallel residual is its default.
    "gpt_neox": dict(_BASE_MHA, bos_token_id=0, eos_token_id=1),
    "stablelm": dict(_BASE),
    "mistral": dict(_BASE),
    # Gemma's head_dim defaults to 256: give it. Tied by default, (1+w) norms, embedding × sqrt(hidden).
    "gemma": dict(_BASE, head_dim=8),
    # Gemma 2 softcaps attention scores (50) and logits (30) by default; layer 0 sliding, layer 1 full.
    "gemma2": dict(_BASE, head_dim=8),
    "gemma3_text": dict(_BASE, head_dim=8),
    "phi3": dict(_BASE, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # GPT-2 and OPT: no GQA. GPT-2's n_inner stays null (4·n_embd = 128); its default token ids (50256)
    # are outside a 96-token vocabulary.
    "gpt2": dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1),
    "opt": dict(
        vocab_size=96,
        hidden_size=32,
        ffn_dim=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
    ),
}

# Architectures whose RMSNorm computes x̂·(1 + w): their norm weights are drawn around 0, not 1.
ONE_PLUS_W_NORMS = {"gemma", "gemma2", "gemma3_text"}


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    from transformers.pytorch_utils import Conv1D

    generator = torch.Generator().manual_seed(seed)
    # GPT-2's Conv1D stores [in, out]: its fan-in is the first axis.
    transposed = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Conv1D)}
    # (1+w) norms (Gemma): gains 1±0.3 means weights 0±0.3.
    norm_centre = 0.0 if model.config.model_type in ONE_PLUS_W_NORMS else 1.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                fan_in = param.shape[0] if name in transposed else param.shape[-1]
                std = 1.0 if "embed" in name or "wte" in name or "wpe" in name else 2.0 / fan_in**0.5
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            else:  # norm weights
                param.copy_(norm_centre + (torch.rand(param.shape, generator=generator) - 0.5) * 0.6)


def tiny_model(model_type: str, *, seed=0, sizes=None, **overrides):
    """A re-randomised tiny `model_type` model (sizes: TINY's, or the given table's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict((sizes or TINY)[model_type])
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    randomise(model, seed)
    return model


def build_checkpoint(folder, model_type: str, *, dtype=torch.float32, max_shard_size=None, seed=0, **overrides):
    """Save a re-randomised tiny `model_type` model into `folder`; returns the folder path."""
    model = tiny_model(model_type, seed=seed, **overrides).to(dtype)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **save_kwargs)
    return str(folder)


PYDOC_LLAMA = os.path.join(os.path.dirname(__file__), "..", "examples", "pydoc-llama")


def pydoc_copy(folder, **files: str) -> str:
    """A copy of the shipped pydoc-llama (a real trained model with its tokenizer) at `folder`, with extra
    files written into it: pydoc_copy(path, **{"chat_template.jinja": TEMPLATE})."""
    import shutil

    shutil.copytree(PYDOC_LLAMA, folder)
    for name, text in files.items():
        with open(os.path.join(str(folder), name), "w", encoding="utf-8") as handle:
            handle.write(text)
    return str(folder)


def load(folder, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, output_loading_info=True, attn_implementation="eager"
    )
    model.eval()
    return model, info


def logits(model, seed=1, batch=2, length=12):
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.float()


def relative_logit_error(source_folder, output_folder, dtype=torch.float32):
    """max|Δlogit| / max|logit| between two checkpoints; asserts the output loads with no key problems."""
    src, _ = load(source_folder, dtype)
    out, info = load(output_folder, dtype)
    assert not info["missing_keys"], f"missing keys: {sorted(info['missing_keys'])}"
    assert not info["unexpected_keys"], f"unexpected keys: {sorted(info['unexpected_keys'])}"
    assert not info["mismatched_keys"], f"mismatched keys: {info['mismatched_keys']}"
    a, b = logits(src), logits(out)
    return ((a - b).abs().max() / a.abs().max()).item()


def read_config(folder):
    with open(os.path.join(str(folder), "config.json")) as handle:
        return json.load(handle)


def run_cli_in_fresh_process(args: list[str], forbidden: tuple[str, ...]) -> subprocess.CompletedProcess:
    """Run `tensorscale ARGS` in a new interpreter, which fails (nonzero exit, the reason on stderr) if any
    of the `forbidden` modules was imported by then: what a command imports shows only in a fresh process."""
    code = (
        "import sys\nfrom tensorscale.cli.main import cli\n"
        f"try:\n    cli.main({args!r}, standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        f"loaded = [name for name in {list(forbidden)!r} if name in sys.modules]\n"
        f"assert not loaded, f'{args[0]} imported {{loaded}}'\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@contextmanager
def bounded_time(seconds: int):
    """Fail a case that runs longer than `seconds` (a hang), via SIGALRM; Python-level loops only."""

    def hang(signum, frame):
        raise AssertionError(f"a case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
