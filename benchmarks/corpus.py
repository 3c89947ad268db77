"""Shared corpus, tokenizer and training loop for train_reference.py and growth.py.

Why this exists: the growth experiment is only fair if every recipe sees the same tokens in the same
order under the same optimizer, and only meaningful if it starts from a model trained on real text.
Both scripts therefore take their data, batching, schedule and evaluation from here.

The corpus is English that every Python installation carries, so it works offline: the docstrings of
the standard library's .py files (parsed with `ast`, so no stdlib module is imported or executed) and
the language-reference topics that `pydoc` shows (`pydoc_data.topics`). Both are part of the Python
documentation, under the PSF License Agreement.
"""

from __future__ import annotations

import ast
import hashlib
import math
import os
import sys
import sysconfig
import time
from dataclasses import dataclass, field

import torch

BOS = "<|endoftext|>"  # also the document separator and EOS: one token, as in GPT-2
PAD = "<|pad|>"
# Folders of the stdlib that are tests, vendored code or bundled third-party packages, not documentation.
SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3", "ensurepip", "turtledemo"}
MIN_DOC_CHARS = 40  # shorter docstrings ("Return self.") are mostly boilerplate


# ------------------------------------------------------------------------------------------------ corpus


def stdlib_documents(root: str | None = None) -> list[str]:
    """Every docstring (module, class, function) of at least MIN_DOC_CHARS in the stdlib's .py files,
    plus the pydoc language-reference topics; exact duplicates removed; deterministic order."""
    root = root or sysconfig.get_paths()["stdlib"]
    docs: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("test"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= MIN_DOC_CHARS:
                        docs.append(doc.strip())
    try:
        from pydoc_data.topics import topics

        docs.extend(topics[key].strip() for key in sorted(topics))
    except ImportError:  # some distributions strip pydoc_data; the docstrings alone still work
        pass
    seen: set[str] = set()
    unique = []
    for doc in docs:
        if doc not in seen:
            seen.add(doc)
            unique.append(doc)
    return unique


def split_documents(docs: list[str], val_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Held-out split by a hash of each document's text: stable whatever the order or the stdlib
    version adds, and no document can be on both sides (duplicates were removed)."""
    train, val = [], []
    for doc in docs:
        bucket = int.from_bytes(hashlib.sha1(doc.encode()).digest()[:4], "little") / 2**32
        (val if bucket < val_fraction else train).append(doc)
    return train, val


# --------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE (no unknown tokens, any text round-trips), wrapped as a transformers fast tokenizer.

    The post-processor prepends BOS, so `tokenizer("Return the")` starts like a training document
    does, and generation from a bare prompt is conditioned the way training was."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, PAD],
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=BOS,
        pad_token=PAD,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def encode_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents as one int32 token stream, each starting with BOS (which also ends the previous
    one), so the model learns where documents begin and end."""
    ids: list[int] = []
    # The backend tokenizer directly: same ids (post-processor included), without the wrapper's
    # warning that a whole document is longer than model_max_length.
    for enc in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=True):
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.int32)


@dataclass
class Data:
    """What both scripts need: tokenizer, train/val token streams, and how they were made."""

    tokenizer: object
    train: torch.Tensor
    val: torch.Tensor
    n_train_docs: int
    n_val_docs: int
    train_chars: int
    val_chars: int
    seconds: float


def build_data(vocab_size: int = 4096, val_fraction: float = 0.05, tokenizer=None) -> Data:
    """Corpus -> split -> (train a tokenizer on the train split only, unless one is given) -> streams."""
    t0 = time.time()
    train_docs, val_docs = split_documents(stdlib_documents(), val_fraction)
    if tokenizer is None:
        tokenizer = train_tokenizer(train_docs, vocab_size)
    return Data(
        tokenizer,
        encode_stream(tokenizer, train_docs),
        encode_stream(tokenizer, val_docs),
        len(train_docs),
        len(val_docs),
        sum(map(len, train_docs)),
        sum(map(len, val_docs)),
        time.time() - t0,
    )


# -------------------------------------------------------------------------------------------- batches


def batch_starts(n_tokens: int, seq_len: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """Window offsets for every step, drawn up front from one seeded generator: the data order is a
    pure function of (seed, steps, batch, seq_len, stream length), identical for every recipe."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seq_len - 1, (steps, batch_size), generator=g)


def gather(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    idx = starts[:, None] + torch.arange(seq_len)[None, :]
    return stream[idx].long()


def val_windows(stream: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows over the held-out stream (the first max_windows of them, if given)."""
    n = (len(stream) - 1) // seq_len
    if max_windows:
        n = min(n, max_windows)
    return stream[: n * seq_len].view(n, seq_len).long()


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats/token) over the windows; exp() of it is the perplexity."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        x = windows[start : start + batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += x[:, 1:].numel()
    model.train()
    return total / count


# ------------------------------------------------------------------------------------------- training


@dataclass
class Schedule:
    """AdamW with linear warmup and cosine decay to min_ratio * lr: one object so every recipe shares it."""

    lr: float = 1e-3
    warmup: int = 20
    min_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    clip: float = 1.0

    def at(self, step: int, steps: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, steps - self.warmup)
        return self.lr * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, schedule: Schedule):
    """Decay matrices only (not norms), the usual choice for transformers."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": schedule.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=schedule.lr,
        betas=schedule.betas,
    )


@dataclass
class History:
    steps: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)  # mean train loss since the previous evaluation
    extra: dict = field(default_factory=dict)  # name -> list, one value per evaluation
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process, all threads: ~threads x seconds if alone


def train(
    model,
    stream: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    schedule: Schedule,
    seed: int,
    eval_windows: torch.Tensor,
    eval_every: int,
    probes: dict | None = None,
    log=print,
    label: str = "",
) -> History:
    """Train in place; evaluate at step 0, every eval_every steps and at the end.

    probes: name -> function(model) -> float, recorded at each evaluation (e.g. clone divergence)."""
    starts = batch_starts(len(stream), seq_len, batch_size, steps, seed)
    opt = make_optimizer(model, schedule)
    hist = History()
    probes = probes or {}
    running, running_n = 0.0, 0

    def record(step: int):
        nonlocal running, running_n
        hist.steps.append(step)
        hist.tokens.append(step * batch_size * seq_len)
        hist.val_loss.append(evaluate(model, eval_windows))
        hist.train_loss.append(running / running_n if running_n else float("nan"))
        for name, fn in probes.items():
            hist.extra.setdefault(name, []).append(fn(model))
        running, running_n = 0.0, 0
        extra = "".join(f"  {k} {v[-1]:.3g}" for k, v in hist.extra.items())
        log(
            f"{label}step {step:5d}/{steps}  tokens {hist.tokens[-1]:>9,}  train {hist.train_loss[-1]:.3f}  "
            f"val {hist.val_loss[-1]:.3f}{extra}  ({time.time() - t0:.0f} s)"
        )

    t0, c0 = time.time(), time.process_time()
    model.train()
    record(0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = schedule.at(step, steps)
        x = gather(stream, starts[step], seq_len)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if schedule.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.clip)
        opt.step()
        running += loss.item()
        running_n += 1
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            record(step + 1)
    hist.seconds = time.time() - t0
    hist.cpu_seconds = time.process_time() - c0
    return hist


def count_params(model) -> int:
    """Unique parameters (a tied embedding counted once), as `tensorscale desc` counts them."""
    return sum(p.numel() for p in model.parameters())


def machine() -> str:
    import platform

    return (
        f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}, {sys.platform}"
    )
