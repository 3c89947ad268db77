#!/usr/bin/env python
"""Train a small Llama on the Python standard library's documentation, on CPU, in minutes.

    python benchmarks/train_reference.py                          # ~6 min on 2 CPUs -> examples/pydoc-llama
    python benchmarks/train_reference.py --steps 50 --out /tmp/x  # a quick smoke run

Why: tensorscale's claim is that `up` keeps what a model has learned. A random checkpoint cannot show
that (its "same logits" are noise either way), and downloading a pretrained model is not possible
offline. A model trained here on real English gives `up`, the growth experiment (growth.py) and anyone
trying the tool a checkpoint whose output can be read: prompt "Return the" and it writes docstring English.

What it does: corpus.py extracts the stdlib docstrings (with `ast`; nothing is imported) and the pydoc
topics, holds out ~5% of documents (by hash), trains a byte-level BPE tokenizer on the rest, trains a
LlamaForCausalLM from config with AdamW (warmup + cosine), then saves it in bf16 safetensors with its
config, generation config and tokenizer, reloads the saved files and reports the held-out perplexity
of exactly what was saved, and writes a README.md into the output folder. Seeds make it repeatable on
the same machine and library versions (float summation order can still differ across CPUs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import corpus  # noqa: E402
import torch  # noqa: E402

PROMPTS = ["Return the", "This module provides", "Raise ValueError if", "The default value is"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "examples", "pydoc-llama"))
    p.add_argument("--steps", type=int, default=360)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=None, help="FFN size; default 8/3 * hidden rounded to 64")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="storage dtype of the saved weights (training is float32)",
    )
    p.add_argument(
        "--results", default=os.path.join(HERE, "results"), help="where train_reference.json/.png go ('' to skip)"
    )
    return p.parse_args(argv)


def build_model(args, vocab_size: int, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    intermediate = args.intermediate or max(64, round(args.hidden * 8 / 3 / 64) * 64)
    head_dim = args.hidden // args.heads
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max(256, args.seq_len),
        rms_norm_eps=1e-5,
        # Tied, as in most small LMs (SmolLM2, Qwen-0.5B): it halves the embedding cost, and it
        # exercises tensorscale's tied path (final norm / n).
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def generate_samples(model, tokenizer, prompts, max_new_tokens=40, seed=0) -> list[dict]:
    """Greedy (repetition-penalised, so tiny models don't loop at once) and one seeded sample per prompt."""
    out = []
    model.eval()
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        row = {"prompt": prompt}
        with torch.no_grad():
            g = model.generate(
                **ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                repetition_penalty=1.3,
                pad_token_id=tokenizer.pad_token_id,
            )
            row["greedy"] = tokenizer.decode(g[0], skip_special_tokens=True)
            torch.manual_seed(seed)
            s = model.generate(
                **ids,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=0.8,
                top_k=40,
                top_p=0.9,
                pad_token_id=tokenizer.pad_token_id,
            )
            row["sampled"] = tokenizer.decode(s[0], skip_special_tokens=True)
        out.append(row)
    return out


def plot(hist, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot written")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(hist.tokens[1:], hist.train_loss[1:], label="train (mean since last eval)")
    ax.plot(hist.tokens, hist.val_loss, marker="o", label="held-out")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("pydoc-llama: reference training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_model_readme(out, info, samples):
    cfg = info["config"]
    sample = samples[0]
    text = f"""# pydoc-llama

A {info["parameters"] / 1e6:.2f}M-parameter Llama (`LlamaForCausalLM`) trained from scratch on CPU in
{info["train_seconds"] / 60:.1f} minutes on the docstrings and documentation of the Python standard library.
It exists so that tensorscale has a small real model whose output can be read: `tensorscale up` on it
must keep what it learned, and the growth experiment (`benchmarks/growth.py`) continues training from it.
It writes plausible docstring English, nothing more.

| | |
|---|---|
| architecture | Llama: {cfg["num_hidden_layers"]} layers, hidden {cfg["hidden_size"]}, {cfg["num_attention_heads"]} heads / {cfg["num_key_value_heads"]} kv heads (head_dim {cfg["head_dim"]}), FFN {cfg["intermediate_size"]}, tied embeddings, RoPE, max {cfg["max_position_embeddings"]} positions |
| parameters | {info["parameters"]:,} ({info["dtype"]} safetensors, {info["weights_bytes"] / 1e6:.1f} MB) |
| tokenizer | byte-level BPE, vocab {cfg["vocab_size"]}, trained on the training split; `{corpus.BOS}` is BOS, EOS and the document separator, and is prepended to every input |
| corpus | {info["train_docs"]:,} training documents ({info["train_chars"] / 1e6:.2f} M characters, {info["train_tokens"]:,} tokens), {info["val_docs"]} held out ({info["val_tokens"]:,} tokens) |
| training | {info["steps"]} steps x {info["batch"]} x {info["seq_len"]} tokens = {info["tokens_seen"]:,} tokens ({info["tokens_seen"] / info["train_tokens"]:.2f} epochs), AdamW lr {info["lr"]} (warmup {info["warmup"]}, cosine to 10%), wd 0.1, seed {info["seed"]}, float32 |
| held-out loss | {info["val_loss_saved"]:.3f} nats/token, **perplexity {info["val_ppl_saved"]:.1f}** (of the saved {info["dtype"]} weights; {info["val_ppl_fp32"]:.1f} in float32 before saving) |
| machine | {info["machine"]} |
| date | {info["date"]} |

Corpus: every docstring of at least {corpus.MIN_DOC_CHARS} characters in the `.py` files of the CPython
{info["python"]} standard library (parsed with `ast`; tests, idlelib, lib2to3, ensurepip and site-packages skipped), plus the
language-reference topics of `pydoc_data.topics`; exact duplicates removed; ~5% of documents held out
by a hash of their text.

## Licence

The training text is Python's documentation, Copyright (c) 2001 Python Software Foundation, distributed
under the PSF License Agreement (https://docs.python.org/3/license.html). These weights are a derivative
of that text and are distributed under the same terms; the code that made them is tensorscale's (Apache-2.0).

## Reproduce

```sh
{info["command"]}
```

## Use

```python
from transformers import AutoTokenizer, AutoModelForCausalLM
tok = AutoTokenizer.from_pretrained("examples/pydoc-llama")
model = AutoModelForCausalLM.from_pretrained("examples/pydoc-llama")
ids = tok("{sample["prompt"]}", return_tensors="pt")          # BOS is prepended by the tokenizer
print(tok.decode(model.generate(**ids, max_new_tokens=40, do_sample=False, repetition_penalty=1.3)[0], skip_special_tokens=True))
```

Greedy (repetition penalty 1.3), 40 new tokens:

"""
    for row in samples:
        text += f"- `{row['prompt']}` -> {json.dumps(row['greedy'])}\n"
    text += "\nSampled (temperature 0.8, top-k 40, top-p 0.9, torch seed 0):\n\n"
    for row in samples:
        text += f"- `{row['prompt']}` -> {json.dumps(row['sampled'])}\n"
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)


def portable_tokenizer_config(out):
    """transformers 5 names the class `TokenizersBackend`, which 4.x does not know; both load
    `PreTrainedTokenizerFast` (5.x maps it to the same backend), so write that."""
    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    data = corpus.build_data(args.vocab)
    tok = data.tokenizer
    print(
        f"corpus: {data.n_train_docs} train docs ({len(data.train):,} tokens), {data.n_val_docs} held out "
        f"({len(data.val):,} tokens); tokenizer vocab {len(tok)}; {data.seconds:.1f} s"
    )

    model = build_model(args, len(tok), tok)
    n_params = corpus.count_params(model)
    print(f"model: {n_params:,} parameters; {corpus.machine()}")

    schedule = corpus.Schedule(lr=args.lr, warmup=args.warmup)
    full_val = corpus.val_windows(data.val, args.seq_len)
    curve_val = corpus.val_windows(data.val, args.seq_len, max_windows=64)
    hist = corpus.train(
        model,
        data.train,
        steps=args.steps,
        batch_size=args.batch,
        seq_len=args.seq_len,
        schedule=schedule,
        seed=args.seed,
        eval_windows=curve_val,
        eval_every=args.eval_every,
    )
    val_fp32 = corpus.evaluate(model, full_val)

    # Save in the storage dtype, then judge what was saved, not the in-memory float32 model.
    os.makedirs(args.out, exist_ok=True)
    for stale in ("model.safetensors.index.json",):
        if os.path.exists(os.path.join(args.out, stale)):
            os.remove(os.path.join(args.out, stale))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=True,
        temperature=0.8,
        top_k=40,
        top_p=0.9,
        repetition_penalty=1.3,
        max_new_tokens=64,
    )
    model.to(getattr(torch, args.dtype)).save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    portable_tokenizer_config(args.out)

    reloaded_tok = AutoTokenizer.from_pretrained(args.out)
    reloaded = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    val_saved = corpus.evaluate(reloaded, full_val)
    samples = generate_samples(reloaded, reloaded_tok, PROMPTS)

    weights = sum(
        os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out) if f.endswith(".safetensors")
    )
    cmd = "python benchmarks/train_reference.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    info = {
        "config": reloaded.config.to_dict(),
        "parameters": n_params,
        "dtype": args.dtype,
        "weights_bytes": weights,
        "train_docs": data.n_train_docs,
        "val_docs": data.n_val_docs,
        "train_chars": data.train_chars,
        "train_tokens": len(data.train),
        "val_tokens": len(data.val),
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "tokens_seen": args.steps * args.batch * args.seq_len,
        "lr": args.lr,
        "warmup": args.warmup,
        "seed": args.seed,
        "train_seconds": hist.seconds,
        "train_cpu_seconds": hist.cpu_seconds,
        "val_loss_fp32": val_fp32,
        "val_ppl_fp32": float(torch.tensor(val_fp32).exp()),
        "val_loss_saved": val_saved,
        "val_ppl_saved": float(torch.tensor(val_saved).exp()),
        "val_windows": len(full_val),
        "machine": corpus.machine(),
        "python": sys.version.split()[0],
        "date": datetime.date.today().isoformat(),
        "command": cmd.strip(),
        "curve": {"tokens": hist.tokens, "val_loss": hist.val_loss, "train_loss": hist.train_loss},
        "samples": samples,
    }
    write_model_readme(args.out, info, samples)

    print()
    print("| parameters | weights | steps | tokens | train time | held-out loss | held-out ppl (saved) | ppl (fp32) |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {n_params:,} | {weights / 1e6:.1f} MB {args.dtype} | {args.steps} | {info['tokens_seen']:,} | "
        f"{hist.seconds / 60:.1f} min | {val_saved:.3f} | {info['val_ppl_saved']:.1f} | {info['val_ppl_fp32']:.1f} |"
    )
    print()
    for row in samples:
        print(f"{row['prompt']!r}\n  greedy : {row['greedy']!r}\n  sampled: {row['sampled']!r}")
    print(f"\nsaved to {args.out}")
    if args.results:
        os.makedirs(args.results, exist_ok=True)
        with open(os.path.join(args.results, "train_reference.json"), "w") as f:
            json.dump(info, f, indent=1)
        png = plot(hist, os.path.join(args.results, "train_reference.png"))
        print(f"results: {os.path.join(args.results, 'train_reference.json')}" + (f", {png}" if png else ""))


if __name__ == "__main__":
    main()
