#!/usr/bin/env python
"""Generate a synthetic Llama-shaped safetensors checkpoint of a requested size, without building a model.

    python benchmarks/make_checkpoint.py --params 1.0e9 --out DIR [--dtype bf16] [--shard-size 2GB] [--seed 0]

The shape comes from a ladder of common Llama sizes: the rung whose natural size is closest to --params
is taken, then the layer count is adjusted to land near it. Tensor names and shapes are exactly those of a
LlamaForCausalLM (untied embeddings), in Hugging Face's order. Values are random-ish: a pool of
N(0, 0.02) values is drawn once and every row chunk is a slice of it at a pseudo-random start, so the
script runs at disk speed and holds only the pool plus one chunk in memory. Norm weights are ones.
Shards are written header-first with tensorscale's ShardFile (pwrite at offsets, fsync at the end).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch

from tensorscale.planning.plan import parse_size
from tensorscale.writing.safetensors_writer import ShardFile, header_bytes

VOCAB = 32000
HEAD_DIM = 64
DTYPES = {"bf16": ("BF16", torch.bfloat16), "fp16": ("F16", torch.float16), "fp32": ("F32", torch.float32)}
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
POOL_NUMEL = 8 * 2**20  # random values drawn once (16 MiB in bf16)
CHUNK_NUMEL = 4 * 2**20  # elements written per pwrite

# (hidden, intermediate, attention heads, kv heads, natural layer count); head_dim is 64 throughout.
LADDER = [
    (256, 688, 4, 4, 4),
    (512, 1376, 8, 4, 8),
    (768, 2048, 12, 4, 12),
    (1024, 2816, 16, 4, 16),
    (1536, 4096, 24, 8, 20),
    (2048, 5632, 32, 8, 22),
    (3072, 8192, 48, 8, 28),
    (4096, 11008, 64, 8, 32),
    (5120, 13824, 80, 8, 40),
]


def layer_params(hidden: int, inter: int, heads: int, kv: int) -> int:
    attention = 2 * hidden * heads * HEAD_DIM + 2 * hidden * kv * HEAD_DIM
    return attention + 3 * hidden * inter + 2 * hidden


def total_params(hidden: int, inter: int, heads: int, kv: int, layers: int) -> int:
    return 2 * VOCAB * hidden + hidden + layers * layer_params(hidden, inter, heads, kv)


def choose_shape(params: float) -> dict:
    """The ladder rung closest (in log size) to `params`, with the layer count set to approach it."""
    best = min(LADDER, key=lambda r: abs(math.log(total_params(*r) / params)))
    hidden, inter, heads, kv, _ = best
    layers = max(1, round((params - 2 * VOCAB * hidden - hidden) / layer_params(hidden, inter, heads, kv)))
    return {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "num_hidden_layers": layers,
    }


def llama_config(shape: dict, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "attention_bias": False,
        "mlp_bias": False,
        "head_dim": HEAD_DIM,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "torch_dtype": TORCH_DTYPE_NAMES[dtype],
        **shape,
    }


def llama_tensors(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every LlamaForCausalLM parameter, in the order Hugging Face saves them."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    q, kv = shape["num_attention_heads"] * HEAD_DIM, shape["num_key_value_heads"] * HEAD_DIM
    out = [("model.embed_tokens.weight", (VOCAB, h))]
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (VOCAB, h))]
    return out


def split_shards(tensors, itemsize: int, shard_size: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy packing in order, like transformers' save_pretrained: a new shard when the next tensor overflows."""
    shards, current, size = [], [], 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * itemsize
        if current and size + nbytes > shard_size:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_shard(
    path: str,
    tensors,
    st_dtype: str,
    dtype: torch.dtype,
    pool: torch.Tensor,
    rng: random.Random,
    header_only: bool = False,
) -> int:
    itemsize = torch.tensor([], dtype=dtype).element_size()
    entries, offset = [], 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * itemsize
        entries.append((name, st_dtype, shape, offset, offset + nbytes))
        offset += nbytes
    if header_only:
        # A correct header over unwritten (sparse) data: full-size files that cost no disk, for timing
        # desc and plan on 12B-shaped checkpoints. Reading their data gives zeros.
        header = header_bytes(entries)
        with open(path, "wb") as handle:
            handle.write(header)
            handle.truncate(len(header) + offset)
        return len(header) + offset
    out = ShardFile(path, header_bytes(entries), offset)
    ones = None
    try:
        for (name, shape), (_, _, _, begin, _) in zip(tensors, entries):
            numel = math.prod(shape)
            if len(shape) == 1:  # norm weights: ones, as a freshly initialised Llama
                ones = torch.ones(numel, dtype=dtype)
                out.write_tensor_bytes(ones, begin)
                continue
            done = 0
            while done < numel:
                count = min(CHUNK_NUMEL, numel - done)
                start = rng.randrange(0, POOL_NUMEL)
                out.write_tensor_bytes(pool[start : start + count], begin + done * itemsize)
                done += count
        out.finish()
    finally:
        out.close()
    return len(header_bytes(entries)) + offset


def make_checkpoint(
    params: float,
    out_dir: str,
    dtype: str = "bf16",
    shard_size: int = 2 * 10**9,
    seed: int = 0,
    quiet: bool = False,
    header_only: bool = False,
) -> dict:
    st_dtype, torch_dt = DTYPES[dtype]
    itemsize = torch.tensor([], dtype=torch_dt).element_size()
    shape = choose_shape(params)
    tensors = llama_tensors(shape)
    shards = split_shards(tensors, itemsize, shard_size)
    os.makedirs(out_dir, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    # Doubled so that any slice of up to POOL_NUMEL elements starting in the first half is contiguous.
    half = (torch.randn(POOL_NUMEL, generator=generator) * 0.02).to(torch_dt)
    pool = torch.cat([half, half])
    assert CHUNK_NUMEL <= POOL_NUMEL
    rng = random.Random(seed)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    started = time.perf_counter()
    file_bytes = 0
    for filename, shard in zip(names, shards):
        file_bytes += write_shard(os.path.join(out_dir, filename), shard, st_dtype, torch_dt, pool, rng, header_only)
    total = sum(math.prod(s) for _, s in tensors)
    data_bytes = total * itemsize
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": data_bytes, "total_parameters": total},
            "weight_map": {name: filename for filename, shard in zip(names, shards) for name, _ in shard},
        }
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as fh:
            json.dump(index, fh, indent=2)
    else:
        stale = os.path.join(out_dir, "model.safetensors.index.json")
        if os.path.exists(stale):
            os.remove(stale)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(llama_config(shape, dtype), fh, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as fh:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, fh, indent=2)
    seconds = time.perf_counter() - started
    info = {
        "out": out_dir,
        "parameters": total,
        "data_bytes": data_bytes,
        "file_bytes": file_bytes,
        "shards": names,
        "seconds": round(seconds, 2),
        **shape,
    }
    if not quiet:
        print(
            f"wrote {out_dir}: {total / 1e9:.3f}B parameters, {file_bytes / 1e9:.2f} GB in {len(names)} shard(s), "
            f"hidden {shape['hidden_size']}, ffn {shape['intermediate_size']}, layers {shape['num_hidden_layers']}, "
            f"heads {shape['num_attention_heads']}/{shape['num_key_value_heads']} ({seconds:.1f} s)"
        )
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, required=True, help="target parameter count, e.g. 1.0e9")
    parser.add_argument("--out", required=True, help="output folder (created; existing shards overwritten)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--shard-size", default="2GB", help="largest shard, e.g. 2GB, 500MB (default 2GB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.add_argument(
        "--header-only",
        action="store_true",
        help="correct headers over sparse, unwritten data: full-size files that use no disk",
    )
    args = parser.parse_args(argv)
    info = make_checkpoint(
        args.params,
        args.out,
        args.dtype,
        parse_size(args.shard_size),
        args.seed,
        quiet=args.json,
        header_only=args.header_only,
    )
    if args.json:
        print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
