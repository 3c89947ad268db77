"""`gen`: complete a prompt with a checkpoint, streaming the text as it is generated.

A quick look at whether a rewritten model still talks. Which settings apply follows one rule, so a run
can be read and repeated exactly:

- a setting given on the command line wins;
- else, for sampling, temperature, top_k, top_p and repetition_penalty come from the model's
  generation_config.json where it sets them; else tensorscale's defaults (dslm's: 0.8, 40, 0.9, 1.0);
- greedy decoding (`--greedy`, or `--temperature 0` as in llama.cpp) is the arg-max of the logits: no
  sampling knob and no repetition penalty from the file applies (`--repeat-penalty` still does);
- nothing else in generation_config.json is used except its token ids (eos, pad, bos): not do_sample,
  num_beams, max_length...

`--json` prints each effective setting with where it came from. Sampling draws a seed when none is given
and reports it. `--chat` runs the prompt through the model's chat template (with `--system` as the system
message). A prompt longer than the model's context is cut to its last tokens, with a note.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

from ..errors import TensorscaleError
from .loading import check_device, load_model, load_tokenizer, require_transformers

DEFAULT_PROMPT = "The capital of France is"
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.0}
FROM_FILE = tuple(DEFAULTS)  # the sampling settings generation_config.json may give
TOKEN_IDS = ("eos_token_id", "pad_token_id", "bos_token_id")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


@dataclass
class Settings:
    n_predict: int = 100
    temperature: float | None = None  # None: not given on the command line
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False
    seed: int | None = None
    repeat_penalty: float | None = None
    chat: bool = False
    system: str | None = None
    dtype: str = "float32"
    device: str = "cpu"

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def check(self) -> None:
        if self.n_predict < 1:
            raise TensorscaleError(f"--n-predict must be at least 1, got {self.n_predict}")
        if self.repeat_penalty is not None and not self.repeat_penalty > 0:
            raise TensorscaleError(f"--repeat-penalty must be > 0 (1 turns it off), got {self.repeat_penalty}")
        if self.temperature is not None and not self.temperature >= 0:
            raise TensorscaleError(f"--temperature must be >= 0 (0 is greedy, as --greedy), got {self.temperature}")
        if self.is_greedy:
            return
        if self.top_k is not None and self.top_k < 0:
            raise TensorscaleError(f"--top-k must be >= 0 (0 turns it off), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise TensorscaleError(f"--top-p must be in (0, 1], got {self.top_p}")

    def draw_seed(self) -> int | None:
        """Fix the seed of a sampled run now (a fresh one when none was given), so it can be reported even
        if the run is interrupted; None for greedy runs."""
        if self.is_greedy:
            return None
        if self.seed is None:
            self.seed = int.from_bytes(os.urandom(4), "little")
        return self.seed


def effective_settings(settings: Settings, file_config: dict) -> dict[str, dict]:
    """{setting: {"value": v, "from": "command line" | "generation_config.json" | "default"}} by the rule above."""
    given = {
        "temperature": settings.temperature,
        "top_k": settings.top_k,
        "top_p": settings.top_p,
        "repetition_penalty": settings.repeat_penalty,
    }
    chosen: dict[str, dict] = {
        "greedy": {"value": settings.is_greedy, "from": "command line" if settings.is_greedy else "default"}
    }
    for key in FROM_FILE:
        if given[key] is not None and not (key == "temperature" and settings.is_greedy):
            chosen[key] = {"value": given[key], "from": "command line"}
        elif settings.is_greedy:
            if key == "repetition_penalty":
                chosen[key] = {"value": 1.0, "from": "greedy (arg-max)"}
        elif file_config.get(key) is not None:
            chosen[key] = {"value": file_config[key], "from": "generation_config.json"}
        else:
            chosen[key] = {"value": DEFAULTS[key], "from": "default"}
    chosen["max_new_tokens"] = {"value": settings.n_predict, "from": "command line"}
    if settings.seed is not None and not settings.is_greedy:
        chosen["seed"] = {"value": settings.seed, "from": "command line or drawn"}
    return chosen


def read_generation_config(folder: str) -> dict:
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TensorscaleError(f"{path} is not valid JSON ({exc}); fix or delete it") from None
    return data if isinstance(data, dict) else {}


def context_length(config: dict) -> int | None:
    for source in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else {}):
        for key in CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def prompt_ids(tokenizer, prompt: str, settings: Settings, label: str):
    """The prompt as token ids: through the chat template with --chat, plain text otherwise."""
    import torch

    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise TensorscaleError(
            "--prompt is not valid UTF-8 text (a stray byte such as \\xff); pass plain text"
        ) from None
    if settings.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise TensorscaleError(
                f"{label} has no chat template (chat_template.jinja, or chat_template in "
                "tokenizer_config.json); leave out --chat and --system"
            )
        messages = [{"role": "system", "content": settings.system}] if settings.system is not None else []
        messages.append({"role": "user", "content": prompt})
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - a template is the model's code, in Jinja: any error is one line
            raise TensorscaleError(f"the chat template of {label} fails on this conversation: {exc}") from None
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        if tokenizer.bos_token_id is None:
            raise TensorscaleError(
                "the prompt is empty and the tokenizer has no BOS token to start from; pass --prompt TEXT"
            )
        ids = torch.tensor([[tokenizer.bos_token_id]])
    return ids


def fit_context(ids, n_predict: int, limit: int | None, on_note: Callable[[str], None] | None):
    """Cut the prompt to its last tokens so that prompt + completion fit the model's context."""
    if limit is None:
        return ids
    if n_predict >= limit:
        raise TensorscaleError(
            f"--n-predict {n_predict} does not fit the model's context of {limit} tokens; ask for fewer than {limit}"
        )
    room = limit - n_predict
    if ids.shape[1] <= room:
        return ids
    if on_note is not None:
        on_note(
            f"the prompt has {ids.shape[1]} tokens and the model's context {limit}: it was cut to its last "
            f"{room} tokens to leave room for {n_predict} new ones"
        )
    return ids[:, -room:]


def generate(
    source,
    label: str,
    prompt: str,
    settings: Settings,
    on_text: Callable[[str], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> dict:
    """Complete `prompt`; `on_text` receives each new piece of text as soon as it decodes to whole characters,
    `on_note` what the user should know (a cut prompt)."""
    settings.check()
    require_transformers("gen")
    import torch
    from transformers import GenerationConfig

    check_device(settings.device)
    tokenizer = load_tokenizer(source.folder, label, "gen")  # before the model: fail fast on a missing tokenizer
    ids = fit_context(
        prompt_ids(tokenizer, prompt, settings, label), settings.n_predict, context_length(source.config), on_note
    )
    file_config = read_generation_config(source.folder)
    seed = settings.draw_seed()
    chosen = effective_settings(settings, file_config)
    model = load_model(source.folder, label, "gen", settings.dtype, settings.device)

    # A fresh config with every setting explicit: generate() fills any unset field from the model's own
    # generation_config, which is how a file's repetition_penalty used to slip into --greedy.
    values = {key: entry["value"] for key, entry in chosen.items() if key in FROM_FILE}
    config = GenerationConfig(
        max_new_tokens=settings.n_predict, do_sample=not settings.is_greedy, num_beams=1, **values
    )
    for key in TOKEN_IDS:
        value = file_config.get(key, source.config.get(key))
        setattr(config, key, value if value is not None else getattr(tokenizer, key, None))
    if config.pad_token_id is None:
        config.pad_token_id = config.eos_token_id if config.eos_token_id is not None else 0
    if settings.is_greedy:  # arg-max: the sampling knobs must not even be looked at
        config.temperature = config.top_k = config.top_p = None
    model.generation_config = config
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():  # a broken model would sample from NaN (a traceback) or emit junk greedily
        if not bool(torch.isfinite(model(ids.to(settings.device)).logits).all()):
            raise TensorscaleError(
                f"{label} computes NaN or Inf logits on the prompt: its weights are broken "
                "(`tensorscale verify` names where); nothing to generate"
            )
    stream = _Continuation(tokenizer, ids[0].tolist(), on_text)
    with torch.no_grad():
        model.generate(
            ids.to(settings.device),
            attention_mask=torch.ones_like(ids).to(settings.device),
            generation_config=config,
            streamer=stream,
        )
    stream.end()
    return {
        "prompt": prompt,
        "completion": stream.text(),
        "tokens": len(stream.ids) - stream.prompt_length,
        "prompt_tokens": stream.prompt_length,
        "chat": settings.chat,
        "greedy": settings.is_greedy,
        "seed": seed,
        "dtype": settings.dtype,
        "device": settings.device,
        "settings": chosen,
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
            return full[len(self.prefix) :]
        return self._decode(self.ids[self.prompt_length :])  # the prompt's text changed on merging: rare

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
                self.on_text(text[len(self.sent) :])
            self.sent = text
