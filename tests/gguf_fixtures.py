"""Tiny GGUF files, written the way llama.cpp's convert_hf_to_gguf.py writes them, with gguf-py.

A tiny transformers model (re-randomised as in fixtures.py) is saved as GGUF: tensor names from gguf-py's
name map, Llama's q/k rows permuted as LlamaModel.permute does, 1-D tensors in F32, metadata from the
config with GGUFWriter's own setters, and 2-D weights stored in the chosen type by `gguf.quants.quantize`.
gguf-py cannot quantize the K types (Q4_K, Q5_K, Q6_K): for them each block is random bytes with finite,
small f16 scales, which is a valid block of that type (its decoded values are what the tests compare).
Sizes are multiples of 256 so that every block type fits a row.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from fixtures import tiny_model

GGUF_TINY = {
    "llama": dict(
        vocab_size=96,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        vocab_size=96,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    ),
    # Qwen3's head_dim is its own (transformers' GGUF loader assumes the default 128).
    "qwen3": dict(
        vocab_size=96,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
}
# GGUF architecture name per model type (Mistral is written as llama by llama.cpp).
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama"}
PERMUTED = {"llama"}  # llama.cpp's LlamaModel permutes q/k; Qwen2Model and Qwen3Model do not


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _random_k_blocks(shape: tuple[int, ...], qtype, generator: np.random.Generator) -> np.ndarray:
    """Random valid blocks of a K type: random bytes, with every f16 scale set finite and small."""
    import gguf

    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows = int(np.prod(shape[:-1]))
    blocks = generator.integers(0, 256, size=(rows * shape[-1] // block, block_bytes), dtype=np.uint8)
    scales = (generator.random((blocks.shape[0], 2), dtype=np.float32) * 2e-3 + 1e-4).astype(np.float16)
    name = qtype.name
    if name in ("Q4_K", "Q5_K"):  # d, dmin at the start
        blocks[:, 0:4] = scales.view(np.uint8).reshape(-1, 4)
    elif name == "Q6_K":  # d at the end
        blocks[:, -2:] = scales[:, :1].view(np.uint8).reshape(-1, 2)
    else:
        raise ValueError(name)
    return blocks.reshape(*shape[:-1], shape[-1] // block * block_bytes)


def _add_tokenizer(writer, vocab: int) -> None:
    """A small byte-level BPE vocabulary in llama.cpp's keys (what convert_hf_to_gguf.py writes for gpt2 models)."""
    singles = [chr(0x21 + i) for i in range(vocab - 3 - 4)]
    merges = [f"{singles[i]} {singles[i + 1]}" for i in range(4)]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + singles + [m.replace(" ", "") for m in merges]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")


def build_gguf(
    folder, model_type: str, qtype_name: str = "Q8_0", *, seed: int = 0, tokenizer: bool = False, **overrides
) -> str:
    """Write a tiny `model_type` model as `<folder>/<model_type>-<type>.gguf`; returns the file's path."""
    import gguf

    model = tiny_model(model_type, seed=seed, sizes=GGUF_TINY, **overrides)
    config = model.config
    arch = GGUF_ARCH[model_type]
    qtype = gguf.GGMLQuantizationType[qtype_name]
    path = os.path.join(str(folder), f"{model_type}-{qtype_name}.gguf")
    writer = gguf.GGUFWriter(path, arch)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(f"tiny {model_type}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    if model_type == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(qtype) if qtype_name not in ("F32",) else 0)
    if tokenizer:
        _add_tokenizer(writer, config.vocab_size)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    generator = np.random.default_rng(seed)
    state = model.state_dict()
    for hf_name, tensor in state.items():
        if config.tie_word_embeddings and hf_name == "lm_head.weight":
            continue
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = f"{name_map.get_name(base)}.{suffix}"
        data = tensor.float().numpy()
        if model_type in PERMUTED and base.endswith("q_proj"):
            data = _permute(data, config.num_attention_heads)
        elif model_type in PERMUTED and base.endswith("k_proj"):
            data = _permute(data, config.num_key_value_heads)
        if data.ndim == 1 or qtype_name == "F32":
            writer.add_tensor(gguf_name, data.astype(np.float32))
            continue
        if qtype_name in ("Q4_K", "Q5_K", "Q6_K"):
            packed = _random_k_blocks(data.shape, qtype, generator)
        else:
            packed = gguf.quants.quantize(data, qtype)
        writer.add_tensor(gguf_name, packed, raw_dtype=qtype)  # uint8 blocks: the writer derives the shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def transformers_gguf_model(path: str):
    """transformers' own loading of a GGUF file, in float32 with eager attention."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32, attn_implementation="eager"
    )
    model.train(False)
    return model


def folder_model(folder: str):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.train(False)
    return model


def relative_logit_error(a, b, vocab: int, seed: int = 0) -> float:
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x, y = a(ids).logits, b(ids).logits
    return float((x - y).norm() / x.norm())
