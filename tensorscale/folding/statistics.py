"""Activation statistics for select-and-refit (folding.selection), from a forward pass over some text.

The text is the user's (`down --calibration FILE`) or, data-free, text the model writes itself: sampled
from its own distribution, it needs no user data and shows the activations the model really produces.

What is collected, by forward pre-hooks on the modules the rules name (no architecture in this code):
* for a per-layer space (FFN neurons, heads): the second moment G = Σ xxᵀ of its reader's input (the
  input of down_proj, o_proj), the one matrix the refit and the OBS selection need;
* for the residual stream: per dimension, Σ over every reader of ‖W[:, i]‖²·E[h_i²] (Wanda-sp), and the
  mean share of the residual's energy, E[x_i² / ‖x‖²], at the input of every norm (massive activations
  show as a share far above 1/D).
"""

from __future__ import annotations

import math

import torch

from ..errors import TensorscaleError
from ..rulebook.compile import Space
from .analysis import Match

SEQUENCE = 256
BATCH = 8


class Statistics:
    def __init__(self):
        self.grams: dict = {}  # (space, instance) -> [size, size] float64
        self.readers: dict = {}  # (space, instance) -> list of reader weights [out, size]
        self.residual_score: dict = {}  # space -> [size]
        self.residual_share: dict = {}  # space -> [size]
        self.share_count: dict = {}
        self.tokens = 0
        self.reader_grams: dict = {}  # residual reader tensor name -> Σ hhᵀ of its input (shared by readers of one norm)
        self.reader_alias: dict = {}  # tensor name -> the name whose Gram it shares (same input tensor)
        self._seen: dict = {}  # input data pointer -> name, within one forward
        self.influence: torch.Tensor | None = None  # per layer: 1 - cos(input, output), ShortGPT's block influence


def windows(ids: torch.Tensor, sequence: int = SEQUENCE) -> list[torch.Tensor]:
    return [ids[b:b + sequence] for b in range(0, ids.numel(), sequence) if ids[b:b + sequence].numel() > 1]


@torch.no_grad()
def self_generated(model, config: dict, tokens: int, seed: int = 0, sequence: int = SEQUENCE, progress=None) -> torch.Tensor:
    """`tokens` tokens the model samples itself (temperature 1, each sequence from the config's BOS token,
    else its EOS token, else token 0): no tokenizer and no user text needed."""
    start = next((v for v in (config.get("bos_token_id"), config.get("eos_token_id")) if isinstance(v, int)), 0)
    generator = torch.Generator().manual_seed(seed)
    rows = max(1, math.ceil(tokens / sequence))
    out = []
    for begin in range(0, rows, BATCH):
        count = min(BATCH, rows - begin)
        ids = torch.full((count, 1), start, dtype=torch.long)
        past = None
        step_input = ids
        for _ in range(sequence - 1):
            result = model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = result.past_key_values
            probs = torch.softmax(result.logits[:, -1].float(), dim=-1)
            step_input = torch.multinomial(probs, 1, generator=generator)
            ids = torch.cat([ids, step_input], dim=1)
        out.append(ids.reshape(-1))
        if progress:
            progress(count)
    return torch.cat(out)[:max(tokens, 2)]


def collect(model, ids: torch.Tensor, matches: list[Match], spaces: dict[str, Space], progress=None) -> Statistics:
    stats = Statistics()
    handles = []
    for match in matches:
        if not match.name.endswith(".weight") or len(match.info.shape) != 2:
            continue
        module_name = match.name[: -len(".weight")]
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue  # named otherwise in transformers (e.g. a renamed head)
        for axis, name, role in match.roles():
            space = spaces[name]
            if space.target == space.size or role not in ("in", "norm"):
                continue
            if role == "norm":
                handles.append(module.register_forward_pre_hook(_share_hook(stats, space)))
                continue
            if axis not in (0, 1):
                continue
            weight = module.weight.detach().float()
            weight = weight if axis == 1 else weight.T  # [out, in]: nn.Linear, or GPT-2's Conv1D transposed
            if weight.shape[1] != space.size:
                continue
            key = (space.clusters_of or space.name, match.env.get(space.per) if space.per else None)
            if space.per is None:
                handles.append(module.register_forward_pre_hook(
                    _reader_score_hook(stats, space, weight.pow(2).sum(0), match.name)))
            else:
                stats.readers.setdefault(key, []).append(weight)
                handles.append(module.register_forward_pre_hook(_gram_hook(stats, key, space)))
    if not handles:
        raise TensorscaleError("found no layer to collect activation statistics from; the rules name no readers")
    try:
        with torch.no_grad():
            pieces = windows(ids)
            for begin in range(0, len(pieces), BATCH):
                batch = pieces[begin:begin + BATCH]
                inputs = [p.unsqueeze(0) for p in batch] if len({p.numel() for p in batch}) > 1 else [torch.stack(batch)]
                for x in inputs:
                    stats._seen.clear()
                    states = model(input_ids=x, use_cache=False, output_hidden_states=True).hidden_states
                    _add_influence(stats, states)
                stats.tokens += sum(p.numel() for p in batch)
                if progress:
                    progress(sum(p.numel() for p in batch))
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _add_influence(stats: Statistics, states) -> None:
    """Block influence of every layer but the last (transformers gives the last layer's output after the
    final norm, so the last layer is never a candidate for removal: its influence is set to infinity)."""
    if states is None or len(states) < 2:
        return
    values = []
    for before, after in zip(states[:-2], states[1:-1]):
        cos = torch.nn.functional.cosine_similarity(before.double(), after.double(), dim=-1)
        values.append(float((1 - cos).sum()))
    values.append(math.inf)
    found = torch.tensor(values, dtype=torch.float64)
    stats.influence = found if stats.influence is None else stats.influence + found


def _gram_hook(stats: Statistics, key, space: Space):
    def hook(module, inputs):
        x = inputs[0].detach()
        if x.shape[-1] != space.size:
            return
        x = x.reshape(-1, space.size).float()
        gram = x.T @ x  # float32: a 7B FFN's 11008² doubles would be ~1 GB a layer
        stats.grams[key] = stats.grams[key] + gram if key in stats.grams else gram

    return hook


def _reader_score_hook(stats: Statistics, space: Space, column_energy: torch.Tensor, name: str):
    def hook(module, inputs):
        x = inputs[0].detach()
        if x.shape[-1] != space.size:
            return
        flat = x.reshape(-1, space.size)
        energy = flat.double().pow(2).sum(0) * column_energy.double()
        key = space.name
        stats.residual_score[key] = stats.residual_score[key] + energy if key in stats.residual_score else energy
        # The reader's own input second moment, for its least-squares refit; readers of one norm (q, k, v)
        # get the very same input tensor and share one Gram.
        # Keyed by content as well as address: a freed input's memory may hold the next norm's output.
        fingerprint = (x.data_ptr(), tuple(x.shape), float(flat[:, :8].double().sum()), float(flat.double().sum()))
        owner = stats._seen.setdefault(fingerprint, name)
        stats.reader_alias[name] = owner
        if owner == name:
            flat = flat.float()
            gram = flat.T @ flat
            stats.reader_grams[name] = stats.reader_grams[name] + gram if name in stats.reader_grams else gram

    return hook


def _share_hook(stats: Statistics, space: Space):
    def hook(module, inputs):
        x = inputs[0].detach()
        if x.shape[-1] != space.size:
            return
        x = x.reshape(-1, space.size).double().pow(2)
        share = (x / x.sum(-1, keepdim=True).clamp_min(1e-30)).sum(0)
        key = space.name
        stats.residual_share[key] = stats.residual_share[key] + share if key in stats.residual_share else share
        stats.share_count[key] = stats.share_count.get(key, 0) + x.shape[0]

    return hook


def ppl_ratio(original: str, small: str, label: str, ids: torch.Tensor, show_progress: bool = False) -> float:
    """exp(loss_small − loss_original) on `ids` in 256-token windows: the damage the user is told about."""
    from ..inference.loading import load_model
    from .progress import bar

    losses = []
    pieces = windows(ids)
    with bar(2 * len(pieces), "measuring the damage", "window") as step:
        for folder in (original, small):
            model = load_model(folder, label if folder == original else small, "down")
            total = count = 0.0
            with torch.no_grad():
                for piece in pieces:
                    logits = model(input_ids=piece.unsqueeze(0), use_cache=False).logits[0, :-1].float()
                    total += float(torch.nn.functional.cross_entropy(logits, piece[1:], reduction="sum"))
                    count += piece.numel() - 1
                    step(1)
            losses.append(total / max(count, 1))
            del model
    return math.exp(losses[1] - losses[0])
