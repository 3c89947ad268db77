"""Activation statistics for `down --calibration FILE`: how much each unit of each space is used.

Every tensor whose input axis reads a space (role `space.in` on axis 1, i.e. an nn.Linear consuming it, or
on axis 0 for a Conv1D stored [in, out]) sees that space's activations. A forward pre-hook on its module
accumulates the mean square of each input feature over the calibration tokens: per residual dimension (the
normalised residual, at every reader), per FFN neuron (the down projection's input), per head (the output
projection's input, summed over the head's dimensions). Merges then average producers weighted by that
importance instead of uniformly, so a merged unit looks most like the unit that carries the signal. Copies
of one unit have equal importance, so an exact inverse of `up` stays exact.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..errors import TensorscaleError
from ..rulebook.compile import Space
from .analysis import Match

DEFAULT_TOKENS = 8192
SEQUENCE = 256


MAX_CALIBRATION_BYTES = 256 * 2**20  # far more text than any --calibration-tokens needs


def read_calibration_text(path: str) -> str:
    from ..strict_yaml import read_text_file

    text = read_text_file(path, "calibration text", MAX_CALIBRATION_BYTES)  # /dev/zero: one line, not a hang
    if not text.strip():
        raise TensorscaleError(f"calibration text {path} is empty; give a file of ordinary text in the model's language")
    return text


def importance(folder: str, label: str, text: str, tokens: int, matches: list[Match],
               spaces: dict[str, Space]) -> dict[tuple[str, object], torch.Tensor]:
    """(space, instance) -> mean square activation per unit, from a forward pass over `tokens` tokens."""
    from ..inference.loading import load_model, load_tokenizer

    if tokens < 1:
        raise TensorscaleError("--calibration-tokens must be at least 1")
    tokenizer = load_tokenizer(folder, label, "down --calibration")
    model = load_model(folder, label, "down --calibration")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:tokens]
    if ids.numel() < 2:
        raise TensorscaleError("the calibration text is too short: it gives fewer than 2 tokens")
    sums: dict[tuple[str, object], torch.Tensor] = {}
    counts: dict[tuple[str, object], int] = defaultdict(int)
    handles = []
    for match in matches:
        roles = match.roles()
        # A 2-D weight reads its space on axis 1 (nn.Linear, [out, in]) or on axis 0 (GPT-2's Conv1D,
        # [in, out]); either way the module's input has that space as its last dimension, which the hook
        # checks. Fused input axes are not hooked (their parts are not separate inputs).
        reads = [(axis, name) for axis, name, role in roles if role == "in" and axis in (0, 1)]
        if not reads or not match.name.endswith(".weight") or len(match.info.shape) != 2:
            continue
        space = spaces[reads[0][1]]
        if space.target == space.size:
            continue
        try:
            module = model.get_submodule(match.name[: -len(".weight")])
        except AttributeError:
            continue  # a tensor whose module has another name in transformers (e.g. a renamed head)
        key = (space.clusters_of or space.name, match.env.get(space.per) if space.per else None)
        handles.append(module.register_forward_pre_hook(_accumulate(key, space, sums, counts)))
    if not handles:
        raise TensorscaleError("found no layer to collect activation statistics from; run down without --calibration")
    with torch.no_grad():
        # Learned position tables (GPT-2, OPT) have no row past max_position_embeddings.
        positions = getattr(model.config, "max_position_embeddings", None)
        sequence = min(SEQUENCE, positions) if isinstance(positions, int) and positions > 0 else SEQUENCE
        for begin in range(0, ids.numel(), sequence):
            chunk = ids[begin:begin + sequence]
            if chunk.numel():
                model(chunk.unsqueeze(0))
    for handle in handles:
        handle.remove()
    return {key: sums[key] / max(1, counts[key]) for key in sums}


def _accumulate(key, space: Space, sums, counts):
    def hook(module, inputs):
        x = inputs[0].detach().float()
        if x.shape[-1] != space.size:
            return
        energy = x.pow(2).reshape(-1, space.units, space.unit).sum(dim=(0, 2))
        sums[key] = sums[key] + energy if key in sums else energy
        counts[key] += x.reshape(-1, x.shape[-1]).shape[0]

    return hook
