"""The tokens `down` calibrates on: the user's text (`--calibration FILE`), or, data-free, text the model
samples itself.

Calibration runs the model layer by layer (folding.layerwise) on these tokens, in windows of SEQUENCE
tokens. Learned position tables (GPT-2, OPT) have no row past max_position_embeddings, so the window is
never longer than that.
"""

from __future__ import annotations

import inspect

import torch

from ..errors import TensorscaleError

DEFAULT_TOKENS = 8192
SEQUENCE = 256
# Data-free sampling holds the whole model. In float32 it samples about 3x faster on CPU than in bfloat16
# (SmolLM2-135M, batch 32: 52 against 17 tokens/s on one busy core; bf16 does not gain from larger batches),
# so a model that fits this in float32 samples in float32, a larger one in bfloat16.
FLOAT32_SAMPLING_BYTES = 2**30
SAMPLING_BATCH = 32


MAX_CALIBRATION_BYTES = 256 * 2**20  # far more text than any --calibration-tokens needs


def window_length(config: dict) -> int:
    """SEQUENCE tokens, or as many as the model has positions for (transformers' max_position_embeddings,
    whatever the checkpoint's config calls it: GPT-2's n_positions)."""
    from ..inference.layer_slot import LayerSlot

    limit = getattr(LayerSlot.build_config(config, "down (refit)"), "max_position_embeddings", None)
    return min(SEQUENCE, limit) if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else SEQUENCE


def read_calibration_text(path: str) -> str:
    from ..strict_yaml import read_text_file

    text = read_text_file(path, "calibration text", MAX_CALIBRATION_BYTES)  # /dev/zero: one line, not a hang
    if not text.strip():
        raise TensorscaleError(
            f"calibration text {path} is empty; give a file of ordinary text in the model's language"
        )
    return text


def calibration_ids(folder: str, label: str, text, tokens: int, sequence: int = SEQUENCE) -> "torch.Tensor":
    """`tokens` tokens of calibration text in whole windows of `sequence` tokens: [windows, sequence].

    `text` is one text (its first tokens) or a list of texts, one per --calibration file: each then gives an
    equal share of the windows (a short one gives what it has, the others the rest), and their windows are
    interleaved, so that every domain is in the refit and in the windows held back for the damage estimate.
    Only the first `tokens` tokens are read, so one file made by concatenating two would calibrate on the
    first alone."""
    from ..inference.loading import load_tokenizer

    if tokens < sequence:
        raise TensorscaleError(f"--calibration-tokens must be at least {sequence} (one window)")
    texts = [text] if isinstance(text, str) else list(text)
    tokenizer = load_tokenizer(folder, label, "down --calibration")
    wanted = tokens // sequence
    per_text: list[list[list[int]]] = []
    total = 0
    for index, one in enumerate(texts):
        share = -(-(wanted - total) // (len(texts) - index))
        ids = tokenizer(one[: share * sequence * 16], add_special_tokens=False)["input_ids"]
        windows = [ids[w * sequence : (w + 1) * sequence] for w in range(min(share, len(ids) // sequence))]
        per_text.append(windows)
        total += len(windows)
    if total < 1:
        counted = sum(len(tokenizer(one[: sequence * 16], add_special_tokens=False)["input_ids"]) for one in texts)
        raise TensorscaleError(
            f"the calibration text gives {counted} tokens, fewer than one window of {sequence}; give a longer text"
        )
    rows = [windows[i] for i in range(max(map(len, per_text))) for windows in per_text if i < len(windows)]
    return torch.tensor(rows).reshape(len(rows), sequence)


@torch.no_grad()
def self_generated_ids(
    folder: str,
    label: str,
    config: dict,
    tokens: int,
    seed: int = 0,
    sequence: int = SEQUENCE,
    batch: int = SAMPLING_BATCH,
    progress=None,
    top_p: float = 1.0,
) -> "torch.Tensor":
    """Data-free calibration: `tokens` tokens the model samples itself (temperature 1, each window started
    from the config's BOS token, else EOS, else token 0). No tokenizer and no user text; the model's own
    distribution covers the domains it knows, where any one text covers one. The model is loaded whole
    for this (sampling runs every layer for every token): in float32 up to FLOAT32_SAMPLING_BYTES, else
    in bfloat16."""
    from ..inference.loading import load_model
    from ..reading.source import open_source

    parameters = sum(info.numel for info in open_source(folder, headers_only=True).tensors.values())
    dtype = "float32" if 4 * parameters <= FLOAT32_SAMPLING_BYTES else "bfloat16"
    model = load_model(folder, label, "down (data-free calibration)", dtype=dtype)
    start = next((v for v in (config.get("bos_token_id"), config.get("eos_token_id")) if isinstance(v, int)), 0)
    # transformers 5.2x renamed past_key_values to cache (the old name still works, with a warning on stderr)
    cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    generator = torch.Generator().manual_seed(seed)
    rows = max(1, -(-tokens // sequence))
    out = []
    for begin in range(0, rows, batch):
        count = min(batch, rows - begin)
        ids = torch.full((count, 1), start, dtype=torch.long)
        past, step = None, ids
        for _ in range(sequence - 1):
            result = model(input_ids=step, use_cache=True, **{cache_argument: past})
            past = getattr(result, cache_argument)
            probs = torch.softmax(result.logits[:, -1].float(), dim=-1)
            if not bool(torch.isfinite(probs).all()):
                raise TensorscaleError(
                    f"{label} computes NaN or Inf (its weights hold NaN or Inf?): refit cannot "
                    "calibrate on it; repair the checkpoint, or fold it: --method fold --allow-nonfinite"
                )
            if top_p < 1.0:
                probs = _nucleus(probs, top_p)
            step = torch.multinomial(probs, 1, generator=generator)
            ids = torch.cat([ids, step], dim=1)
        out.append(ids)
        if progress:
            progress(count * sequence)
    del model
    return torch.cat(out)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus (top-p) sampling's distribution: per row the most likely tokens whose probabilities first add up
    to `top_p`, renormalised (the tail a small model's temperature-1 samples wander off into is cut)."""
    ordered, order = probs.sort(dim=-1, descending=True)
    outside = ordered.cumsum(-1) - ordered > top_p  # the most likely token always stays
    ordered = ordered.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, ordered / ordered.sum(-1, keepdim=True))
