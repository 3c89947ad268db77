"""Held-out quality of a smaller model against the original, on the real texts (benchmarks/real_texts.py).

Fixed, non-overlapping 256-token windows of each evaluation domain (the first `tokens` tokens), float32,
stock transformers, eager attention. Per domain:

* ppl ratio   exp(loss_small − loss_original): 1.00 means no loss;
* KL          KL(original ‖ small) in nats per predicted position, over the original's top-128 tokens plus
              one bucket for the rest of the vocabulary (the reference is cached that way, 16 MB instead of
              GBs of full distributions; the bucket makes it a slight underestimate, never an overestimate
              of the top-128 part);
* top-1       share of positions where both models predict the same next token.
"""

from __future__ import annotations

import math

import torch

WINDOW = 256
TOPK = 128
BATCH = 8


def load(folder: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.train(False)
    return model


def domain_windows(tokenizer, texts: dict[str, str], tokens: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, text in texts.items():
        ids = tokenizer(text[: tokens * 8], add_special_tokens=False)["input_ids"]
        count = min(tokens, len(ids)) // WINDOW
        if count < 1:
            raise SystemExit(f"domain {name} gives fewer than {WINDOW} tokens")
        out[name] = torch.tensor(ids[: count * WINDOW]).reshape(count, WINDOW)
    return out


class Reference:
    """The original model's loss, top-k log-probabilities and argmax on every window, computed once."""

    @torch.no_grad()
    def __init__(self, model, windows: dict[str, torch.Tensor]):
        self.windows = windows
        self.cache = {}
        for name, w in windows.items():
            parts = []
            for b in range(0, len(w), BATCH):
                x = w[b : b + BATCH]
                logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), dim=-1)
                top = logp.topk(TOPK, dim=-1)
                nll = -logp.gather(-1, x[:, 1:, None]).squeeze(-1)
                parts.append((top.values, top.indices, nll))
            self.cache[name] = parts

    @torch.no_grad()
    def compare(self, model) -> dict[str, dict]:
        results = {}
        for name, w in self.windows.items():
            nll_small = nll_ref = kl = agree = count = 0.0
            for i, b in enumerate(range(0, len(w), BATCH)):
                x = w[b : b + BATCH]
                values, indices, ref_nll = self.cache[name][i]
                logq = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), dim=-1)
                nll_small += float(-logq.gather(-1, x[:, 1:, None]).sum())
                nll_ref += float(ref_nll.sum())
                p = values.exp()
                q_top = logq.gather(-1, indices)
                kl_top = (p * (values - q_top)).sum(-1)
                p_rest = (1 - p.sum(-1)).clamp_min(1e-12)
                q_rest = (1 - q_top.exp().sum(-1)).clamp_min(1e-12)
                kl += float((kl_top + p_rest * (p_rest.log() - q_rest.log())).sum())
                agree += float((indices[..., 0] == logq.argmax(-1)).sum())
                count += x[:, 1:].numel()
            results[name] = {
                "ppl": math.exp(nll_small / count),
                "ppl_original": math.exp(nll_ref / count),
                "ppl_ratio": math.exp((nll_small - nll_ref) / count),
                "kl": kl / count,
                "top1": agree / count,
                "positions": int(count),
            }
        return results
