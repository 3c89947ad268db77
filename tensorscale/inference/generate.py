"""`gen`: complete a prompt with a checkpoint, streaming the text as it is generated.

A quick look at whether a rewritten model still talks: the defaults are the seed tool dslm's, so results
compare with what its users know. Greedy decoding is deterministic; sampling draws a seed when none is
given and reports it, so any run can be repeated exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from ..errors import TensorscaleError
from .loading import load_model, load_tokenizer, require_transformers, resolve

DEFAULT_PROMPT = "The capital of France is"


@dataclass
class Settings:
    n_predict: int = 100
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    greedy: bool = False
    seed: int | None = None

    def check(self) -> None:
        if self.n_predict < 1:
            raise TensorscaleError(f"--n-predict must be at least 1, got {self.n_predict}")
        if self.greedy:
            return
        if not self.temperature > 0:
            raise TensorscaleError(f"--temperature must be > 0, got {self.temperature}; use --greedy for argmax decoding")
        if self.top_k < 0:
            raise TensorscaleError(f"--top-k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise TensorscaleError(f"--top-p must be in (0, 1], got {self.top_p}")


def generate(label: str, prompt: str, settings: Settings, on_text: Callable[[str], None] | None = None) -> dict:
    """Complete `prompt`; `on_text` receives each new piece of text as soon as it decodes to whole characters."""
    settings.check()
    require_transformers("gen")
    import torch

    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise TensorscaleError("--prompt is not valid UTF-8 text (a stray byte such as \\xff); pass plain text") from None
    source = resolve(label)
    tokenizer = load_tokenizer(source.folder, label, "gen")  # before the model: fail fast on a missing tokenizer
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        if tokenizer.bos_token_id is None:
            raise TensorscaleError("the prompt is empty and the tokenizer has no BOS token to start from; pass --prompt TEXT")
        ids = torch.tensor([[tokenizer.bos_token_id]])
    model = load_model(source.folder, label, "gen")

    kwargs = dict(max_new_tokens=settings.n_predict, do_sample=not settings.greedy,
                  attention_mask=torch.ones_like(ids))
    seed = None
    if not settings.greedy:
        seed = settings.seed if settings.seed is not None else int.from_bytes(os.urandom(4), "little")
        kwargs.update(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
        torch.manual_seed(seed)
    else:
        # The model's generation_config.json may ask for sampling; --greedy wins, and its knobs are unset.
        kwargs.update(temperature=None, top_k=None, top_p=None)
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is None:
        kwargs["pad_token_id"] = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    with torch.no_grad():  # a broken model would sample from NaN (a traceback) or emit junk greedily
        if not bool(torch.isfinite(model(ids).logits).all()):
            raise TensorscaleError(f"{label} computes NaN or Inf logits on the prompt: its weights are broken "
                                   "(`tensorscale verify` names where); nothing to generate")
    stream = _Continuation(tokenizer, ids[0].tolist(), on_text)
    kwargs["streamer"] = stream
    with torch.no_grad():
        model.generate(ids, **kwargs)
    stream.end()
    return {
        "prompt": prompt,
        "completion": stream.text(),
        "tokens": len(stream.ids) - stream.prompt_length,
        "greedy": settings.greedy,
        "seed": seed,
    }


class _Continuation:
    """A generate() streamer that hands out the completion token by token, as text that reads on from the prompt.

    Decoding the new tokens alone loses the space before the first word (SentencePiece drops a leading "▁",
    WordLevel joins words with spaces), so the prompt and completion are decoded together and the prompt's
    text cut off. Text ending in U+FFFD, half of a multi-byte character, is held back until it completes.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], on_text: Callable[[str], None] | None):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids = list(prompt_ids)
        self.prompt_length = len(prompt_ids)
        self.prefix = self._decode(self.ids)
        self.seen_prompt = False
        self.sent = ""

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text(self) -> str:
        full = self._decode(self.ids)
        if full.startswith(self.prefix):
            return full[len(self.prefix):]
        return self._decode(self.ids[self.prompt_length:])  # the prompt's text changed on merging: rare

    def put(self, value) -> None:
        if not self.seen_prompt:  # generate() first hands over the prompt itself
            self.seen_prompt = True
            return
        self.ids.extend(int(token) for token in value.reshape(-1).tolist())
        self._send(self.text(), final=False)

    def end(self) -> None:
        self._send(self.text(), final=True)

    def _send(self, text: str, final: bool) -> None:
        if not final and text.endswith("\ufffd"):
            return
        if text.startswith(self.sent) and len(text) > len(self.sent):
            if self.on_text is not None:
                self.on_text(text[len(self.sent):])
            self.sent = text
