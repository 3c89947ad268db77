"""`verify`: run two checkpoints on the same tokens and measure how far apart their predictions are.

`up` claims the wider model computes the same function; this is the check anyone can run on the result.
Both models run in float32 (or `--dtype`) with eager attention on the CPU (or `--device`), one at a time (the
source's logits are kept, the source freed, then the output loaded), so memory holds one model plus the logits
of a few short texts.

The pass mark is the relative logit error max|Δlogit| / max|logit|: it does not depend on the logits'
scale, and float32 rounding through a small network stays around 1e-7..1e-6, so the default tolerance of
1e-4 passes any exact rewrite with room to spare while a single wrong weight, head order or scale shows
errors of 1e-2 or more. KL, top-1 agreement and perplexities say what a difference means in practice.
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import asdict, dataclass

from ..errors import TensorscaleError
from .loading import check_device, has_tokenizer, load_model, load_tokenizer, require_transformers, vocab_size

DEFAULT_TOLERANCE = 1e-4
# Pass marks by the dtype both models run in. float32: rounding through a network stays near 1e-7..1e-6.
# bfloat16 and float16 round every activation (8 and 11 significant bits), so one function computed two
# ways (a HyperCloned model sums duplicated halves) drifts much further: see benchmarks/README.md.
COMPUTE_TOLERANCE = {"float32": DEFAULT_TOLERANCE, "bfloat16": 5e-2, "float16": 1e-2}
# Pass marks for a float32 run of a model whose 16-bit storage rounds scaled weights (planning.storage_notes):
# the rounding of every entry, 2^-9 in bfloat16, shows in the logits at ~1e-3 relative.
STORAGE_TOLERANCE = {"bfloat16": 1e-2, "float16": 1e-2}
# Short, varied English: prose, a list, numbers, code-like text. Models see them with their own tokenizer.
DEFAULT_TEXTS = (
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his wife.",
    "To make a cup of tea, boil the water, warm the pot, add the leaves and wait four minutes.",
    "The sum of 17 and 25 is 42. The square root of 144 is 12.",
    "def add(a, b):\n    return a + b\n",
)
RANDOM_SEQUENCES = 4
RANDOM_LENGTH = 32


@dataclass
class Report:
    source: str
    output: str
    inputs: str  # where the token ids came from, in words
    sequences: int
    positions: int
    max_abs_logit_diff: float
    max_abs_logit: float
    relative_logit_error: float
    kl_mean: float  # KL(source ‖ output), nats, mean over positions
    top1_agreement: float
    perplexity_source: float | None  # None when no sequence has two tokens
    perplexity_output: float | None
    tolerance: float
    passed: bool
    dtype: str = "float32"  # what both models ran in
    device: str = "cpu"
    nonfinite: str | None = None  # the first NaN/Inf in either model's logits, in words: always a failure

    def to_dict(self) -> dict:
        return asdict(self)


def default_tolerance(dtype: str = "float32") -> float:
    """The pass mark for models run in `dtype`: rounding, not a wrong weight, sets how far apart two runs of
    one function drift (see COMPUTE_TOLERANCE)."""
    return COMPUTE_TOLERANCE.get(dtype, DEFAULT_TOLERANCE)


def verify(
    src,
    dst,
    source_label: str,
    output_label: str,
    *,
    texts: list[str] | None = None,
    tolerance: float | None = None,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
) -> Report:
    """Compare SRC and DST (ModelSources that transformers loads: gguf_import.runnable_source) on the same
    token ids; `passed` is relative_logit_error <= tolerance (by default
    the mark for `dtype`, default_tolerance)."""
    if tolerance is None:
        tolerance = default_tolerance(dtype)
    if not tolerance >= 0:
        raise TensorscaleError(f"--tolerance must be a number >= 0, got {tolerance}")
    require_transformers("verify")
    import torch

    check_device(device)
    vocab = _common_vocab(src, dst, source_label, output_label)
    sequences, inputs = _token_ids(src, dst, source_label, output_label, vocab, texts, seed)

    reference = _logits(src.folder, source_label, sequences, dtype, device)
    model_positions = sum(len(ids) for ids in sequences)
    max_diff = max_logit = kl_sum = 0.0
    agree = 0
    nll = {"source": 0.0, "output": 0.0}
    targets = 0
    nonfinite = None
    model = load_model(dst.folder, output_label, "verify", dtype, device)
    with torch.no_grad():
        for number, (ids, a) in enumerate(zip(sequences, reference), start=1):
            b = model(ids.unsqueeze(0).to(device)).logits[0].float().cpu()
            if b.shape != a.shape:
                raise TensorscaleError(
                    f"{output_label} produces logits of shape {tuple(b.shape)}, "
                    f"{source_label} {tuple(a.shape)}; they do not share a vocabulary"
                )
            nonfinite = (
                nonfinite or first_nonfinite(a, source_label, number) or first_nonfinite(b, output_label, number)
            )
            max_diff = max(max_diff, (a - b).abs().max().item())
            max_logit = max(max_logit, a.abs().max().item())
            log_p, log_q = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
            kl_sum += (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).sum().item()
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            if len(ids) > 1:
                nxt = ids[1:].unsqueeze(-1)
                nll["source"] -= log_p[:-1].gather(-1, nxt).sum().item()
                nll["output"] -= log_q[:-1].gather(-1, nxt).sum().item()
                targets += len(ids) - 1
    del model
    gc.collect()

    relative = max_diff / max_logit if max_logit > 0 else (0.0 if max_diff == 0 else math.inf)
    if math.isnan(max_diff) or math.isnan(max_logit):
        relative = math.nan
    return Report(
        source=source_label,
        output=output_label,
        inputs=inputs,
        sequences=len(sequences),
        positions=model_positions,
        max_abs_logit_diff=max_diff,
        max_abs_logit=max_logit,
        relative_logit_error=relative,
        kl_mean=kl_sum / model_positions,
        top1_agreement=agree / model_positions,
        perplexity_source=math.exp(nll["source"] / targets) if targets else None,
        perplexity_output=math.exp(nll["output"] / targets) if targets else None,
        tolerance=tolerance,
        passed=nonfinite is None and relative <= tolerance,  # NaN compares False too
        dtype=dtype,
        device=device,
        nonfinite=nonfinite,
    )


def first_nonfinite(logits, label: str, sequence: int) -> str | None:
    """Where `logits` first hold NaN or Inf, in words; None when all are finite. Python's max() skips a NaN
    (max(0.0, nan) is 0.0), so a NaN must be looked for, never left to the error measures."""
    import torch

    bad = ~torch.isfinite(logits)
    if not bool(bad.any()):
        return None
    position, token = (int(i) for i in bad.nonzero()[0])
    value = logits[position, token].item()
    kind = "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    count = int(bad.sum())
    return (
        f"{label}'s logits hold {kind} ({count} non-finite value(s); first at sequence {sequence}, "
        f"position {position}, token {token})"
    )


def read_texts(path: str) -> list[str]:
    """A text file for --text: one sequence per paragraph (paragraphs separated by blank lines)."""
    try:
        with open(path, encoding="utf-8") as handle:
            content = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise TensorscaleError(f"cannot read --text {path}: {exc}") from None
    texts = [part.strip() for part in content.replace("\r\n", "\n").split("\n\n") if part.strip()]
    if not texts:
        raise TensorscaleError(f"--text {path} is empty; give it some text (paragraphs separated by blank lines)")
    return texts


def _common_vocab(src, dst, source_label: str, output_label: str) -> int:
    """Logits are compared token by token, so both models must index the same vocabulary."""
    a, b = vocab_size(src.config), vocab_size(dst.config)
    if a is None or b is None:
        missing = source_label if a is None else output_label
        raise TensorscaleError(f"{missing}/config.json has no vocab_size; verify needs it to compare vocabularies")
    if a != b:
        raise TensorscaleError(
            f"the vocabularies differ ({source_label}: vocab_size {a}, {output_label}: {b}); "
            "verify compares logits token by token, so both must share one vocabulary"
        )
    if has_tokenizer(src.folder) and has_tokenizer(dst.folder):
        if (
            load_tokenizer(src.folder, source_label, "verify").get_vocab()
            != load_tokenizer(dst.folder, output_label, "verify").get_vocab()
        ):
            raise TensorscaleError(
                f"the tokenizers of {source_label} and {output_label} differ; "
                "verify needs both models to share one tokenizer"
            )
    return a


def _token_ids(src, dst, source_label, output_label, vocab, texts, seed):
    """Token id sequences for both models: the texts tokenized, or seeded random ids without a tokenizer."""
    import torch

    limit = src.config.get("max_position_embeddings") or None
    owner = next(
        (
            (source.folder, label)
            for source, label in ((src, source_label), (dst, output_label))
            if has_tokenizer(source.folder)
        ),
        None,
    )
    if owner is None:
        if texts is not None:
            raise TensorscaleError(
                "--text needs a tokenizer, and neither model folder has tokenizer files; "
                "copy them in, or leave out --text to compare on random token ids"
            )
        length = min(RANDOM_LENGTH, limit) if limit else RANDOM_LENGTH
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (RANDOM_SEQUENCES, length), generator=generator)
        return list(ids), f"no tokenizer: {RANDOM_SEQUENCES} sequences of {length} random token ids (seed {seed})"
    tokenizer = load_tokenizer(owner[0], owner[1], "verify")
    sequences = []
    for text in texts if texts is not None else DEFAULT_TEXTS:
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        if limit:
            ids = ids[:limit]
        if len(ids):
            sequences.append(ids)
    if not sequences:
        raise TensorscaleError("the texts tokenize to nothing; give --text a file with some words in it")
    top = max(int(ids.max()) for ids in sequences)
    if top >= vocab:
        raise TensorscaleError(
            f"the tokenizer produces id {top}, beyond vocab_size {vocab}; the tokenizer does not belong to this model"
        )
    where = "built-in texts" if texts is None else "--text"
    return (
        sequences,
        f"{len(sequences)} {where}, tokenized by the tokenizer of "
        f"{os.path.basename(os.path.normpath(owner[1])) or owner[1]}",
    )


def _logits(folder: str, label: str, sequences, dtype: str, device: str) -> list:
    """SRC's logits for every sequence, the model freed before returning (only one model in memory at a time)."""
    import torch

    model = load_model(folder, label, "verify", dtype, device)
    with torch.no_grad():
        out = [model(ids.unsqueeze(0).to(device)).logits[0].float().cpu() for ids in sequences]
    del model
    gc.collect()
    return out
