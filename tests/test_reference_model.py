"""The reference model the repo ships loads offline with stock transformers, and writes learned text."""

from __future__ import annotations

import os

import torch

HERE = os.path.dirname(__file__)
MODEL = os.path.join(HERE, "..", "examples", "pydoc-llama")


def test_reference_model_loads_and_generates():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model, info = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = tokenizer("Return the", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0][ids.shape[1] :])
    words = [w.strip(".,:'\"()") for w in text.split()]
    # A trained model continues a docstring with English words, not byte soup.
    common = {"the", "a", "of", "is", "to", "and", "in", "be", "or", "string", "file", "list", "return", "value", "not"}
    assert sum(w.lower() in common for w in words) >= 2, text


def test_reference_model_perplexity_is_learned():
    """Held-out-like text scores far better than chance (vocab 4096): the weights are trained, not random."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    text = "Return a new list containing all items from the iterable in ascending order."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert torch.exp(torch.tensor(loss)) < tokenizer.vocab_size / 4  # a random model scores about vocab_size
