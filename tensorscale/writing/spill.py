"""A checkpoint folder written tensor by tensor, for tensors that are computed rather than rewritten.

Why: `down`'s layer-wise refit produces each layer's new weights only after running that layer, in an
order the streaming writer cannot plan ahead. They are spilled here (shards of about SHARD_BYTES, so at
most one shard is ever held in memory), and the finished folder is then written to OUT by the ordinary
engine like any other source, with all its checks: the temporary folder is never the user's output.
"""

from __future__ import annotations

import json
import os

import torch

from ..errors import TensorscaleError

SHARD_BYTES = 256 * 2**20


class SpillFolder:
    def __init__(self, folder: str, dtype: torch.dtype | None = None):
        self.folder = folder
        self.dtype = dtype
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.shards = 0
        os.makedirs(folder, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        if name in self.weight_map or name in self.pending:
            raise TensorscaleError(f"internal: tensor {name} was written twice")
        wanted = dtype or self.dtype or tensor.dtype
        tensor = tensor.detach().to(wanted).contiguous()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TensorscaleError(f"the refit of {name} is not finite; try more --calibration-tokens")
        self.pending[name] = tensor
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the pending tensors as one safetensors shard (our own header writer, plain writes: the
        folder is read once, by the engine, right after)."""
        if not self.pending:
            return
        from ..reading.tensor_reader import SAFETENSORS_DTYPES
        from .safetensors_writer import as_bytes, header_bytes

        self.shards += 1
        filename = f"spill-{self.shards:05d}.safetensors"
        entries, offset = [], 0
        for name, tensor in self.pending.items():
            size = tensor.numel() * tensor.element_size()
            entries.append((name, SAFETENSORS_DTYPES[tensor.dtype], tuple(tensor.shape), offset, offset + size))
            offset += size
        path = os.path.join(self.folder, filename)
        try:
            with open(path, "wb") as handle:
                handle.write(header_bytes(entries))
                for tensor in self.pending.values():
                    handle.write(as_bytes(tensor).numpy().tobytes())
        except OSError as exc:
            raise TensorscaleError(
                f"cannot write the refitted tensors to {self.folder}: {exc.strerror} (is the disk full?)"
            ) from None
        for name in self.pending:
            self.weight_map[name] = filename
        self.pending = {}
        self.pending_bytes = 0

    def finish(self, config: dict) -> str:
        self.flush()
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w", encoding="utf-8") as handle:
            json.dump({"metadata": {}, "weight_map": self.weight_map}, handle)
        with open(os.path.join(self.folder, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)
        return self.folder
