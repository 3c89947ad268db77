"""The in-memory approach to HyperCloning, as the seed tool dslm does it: a baseline for bench_rewrite.py.

Load the source with transformers, build the big model from its config in RAM, copy tiled weights into it,
save_pretrained. Every byte of both models is resident at once, which is what tensorscale's streaming
engine avoids. Llama-shaped checkpoints only (what make_checkpoint.py generates), untied.

    python benchmarks/baseline_in_memory.py SRC OUT -edm 2 -upm 2
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def tile_rows(w, n):
    return torch.cat([w] * n, dim=0)


def tile_cols(w, n, divide):
    return torch.cat([w / n if divide else w] * n, dim=1)


def grow(name: str, w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    if name.endswith("embed_tokens.weight"):
        return tile_cols(w, n, divide=False)
    if name == "lm_head.weight":
        return tile_cols(w, n, divide=True)
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
        return tile_cols(tile_rows(w, n), n, divide=True)
    if name.endswith(("gate_proj.weight", "up_proj.weight")):
        return tile_cols(tile_rows(w, m), n, divide=True)
    if name.endswith("down_proj.weight"):
        return tile_cols(tile_rows(w, n), m, divide=True)
    if name.endswith("norm.weight"):
        return torch.cat([w] * n)
    raise SystemExit(f"baseline_in_memory: no rule for {name}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src")
    parser.add_argument("out")
    parser.add_argument("-edm", type=int, default=2)
    parser.add_argument("-upm", type=int, default=2)
    args = parser.parse_args(argv)
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_grad_enabled(False)
    small = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.bfloat16)
    config = AutoConfig.from_pretrained(args.src)
    n, m = args.edm, args.upm
    config.hidden_size *= n
    config.num_attention_heads *= n
    config.num_key_value_heads *= n
    config.intermediate_size *= m
    big = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = big.state_dict()
    for name, w in small.state_dict().items():
        state[name].copy_(grow(name, w.float(), n, m).to(torch.bfloat16))
    big.save_pretrained(args.out)
    with open(os.path.join(args.out, "baseline.json"), "w") as handle:
        json.dump({"parameters": sum(p.numel() for p in big.parameters())}, handle)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
