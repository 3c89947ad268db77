"""Load a model and its tokenizer for inference, safely and with one-line errors.

transformers is an optional extra, so it is imported here, late, with a hint when it is missing. Weights are
loaded from safetensors only (`use_safetensors=True`; .bin files are never read) and never with remote code. Models run
in float32 with eager attention on the CPU by default: the point is a faithful reference, not speed, and eager
float32 makes two runs of the same function agree to rounding. `--dtype bfloat16` halves the memory (a 7B
verifies in ~14 GB instead of ~28 GB) at the price of bfloat16 rounding; `--device` moves the work to a GPU.
"""

from __future__ import annotations

import os

from ..errors import TensorscaleError

INSTALL_HINT = "pip install 'tensorscale[transformers]'"
# Files that carry a tokenizer's vocabulary; tokenizer_config.json alone does not.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt", "tokenizer.tiktoken")


def require_transformers(command: str):
    """Import transformers, or explain in one line how to install it."""
    try:
        import transformers
    except ImportError as exc:
        if getattr(exc, "name", None) == "transformers" or "transformers" in str(exc):
            raise TensorscaleError(f"`{command}` runs the model and needs transformers: {INSTALL_HINT}") from None
        raise TensorscaleError(f"transformers failed to import ({exc}); reinstall it: {INSTALL_HINT}") from None
    # Our own messages are the ones the user needs: no warnings about generation flags, no loading bars.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)


def vocab_size(config: dict) -> int | None:
    """vocab_size from config.json, also where multimodal configs nest it under text_config."""
    value = config.get("vocab_size")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("vocab_size")
    return value


def load_tokenizer(folder: str, label: str, command: str):
    transformers = require_transformers(command)
    if not has_tokenizer(folder):
        raise TensorscaleError(
            f"{label} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
            "copy them from the model it came from into that folder"
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TensorscaleError(f"cannot load the tokenizer of {label}: {_first_line(exc)}") from None


DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda", "mps")


def check_device(device: str) -> str:
    """`device` if torch can run on it here, else one line saying what is missing."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise TensorscaleError(
            "--device cuda: torch sees no CUDA GPU here (a CPU-only torch, or no driver); use --device cpu"
        )
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TensorscaleError("--device mps: Apple's Metal backend is not available here; use --device cpu")
    if device not in DEVICES:
        raise TensorscaleError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    return device


def load_model(folder: str, label: str, command: str, dtype: str = "float32", device: str = "cpu"):
    """The model in `dtype` (float32 by default) on `device`, eager attention, inference mode; refuses a
    checkpoint that lacks weights."""
    transformers = require_transformers(command)
    import torch

    if dtype not in DTYPES:
        raise TensorscaleError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_device(device)
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=getattr(torch, dtype),
            attn_implementation="eager",
            use_safetensors=True,
            trust_remote_code=False,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise TensorscaleError(f"transformers cannot load {label}: {_first_line(exc)}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        # transformers would fill them with random values: any output would be meaningless.
        raise TensorscaleError(
            f"{label} lacks {len(missing)} weight(s) the model needs (e.g. {missing[0]}); "
            "the checkpoint is incomplete, rewrite or re-download it"
        )
    model.train(False)  # inference mode (dropout off); spelled so the static no-eval guard stays simple
    return model.to(device) if device != "cpu" else model


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
