"""Reproducible random streams keyed by names, not by call order.

Noise (`up --snr-db`) and the fold analysis's sketches must come out the same on every machine, with any
number of threads, in any execution order. Each stream is therefore seeded from a sha256 of the parts that
name it (the user's seed, a tensor, a chunk, an op), never from a shared generator's state.
"""

from __future__ import annotations


def seeded_generator(*parts):
    """A torch.Generator seeded by sha256("|".join(parts)): the same parts give the same stream."""
    import hashlib

    import torch

    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
