"""Re-tie embeddings after folding: a model `up` untied comes back tied when its folded head equals its
folded embedding (the noise in the head's copies cancels when they are summed)."""

from __future__ import annotations

import torch

from ..ops.library import OpContext
from ..planning.plan import Plan
from ..reading.tensor_reader import ShardReader

RETIE_TOLERANCE = 1e-5  # relative to the largest embedding entry
CLEARLY_DIFFERENT = 1e-2  # a difference this large (relative to the largest entry so far) ends the comparison
CHUNK_ELEMENTS = 2**22  # entries of each matrix compared at once


def find_retie(plan: Plan) -> str | None:
    """The head tensor to drop if the output can be tied again, else None."""
    if plan.source.config.get(plan.rules.tie):
        return None
    by_name = {t.name: t for t in plan.tensors}
    for create in plan.rules.create:
        embedding, head = by_name.get(create.source), by_name.get(create.name)
        if embedding is None or head is None or head.source.name != create.name:
            continue
        if embedding.out_shape != head.out_shape or embedding.row_map is None or head.row_map is None:
            continue
        if _equal(embedding, head):
            return create.name
    return None


def _equal(embedding, head) -> bool:
    """Whether the folded head equals the folded embedding, chunk by chunk.

    An ordinary untied model's head differs from its embedding in the first chunk already, and reading on
    cost both whole matrices (0.3 s of a 5 s `down` at 0.1B). Stopping there can only leave a model untied
    that a larger entry further on would have allowed to tie: the untied output computes the same function."""
    rows = embedding.source.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(1, embedding.source.numel // max(1, rows)))
    largest = 0.0
    worst = 0.0
    with ShardReader() as reader:
        for begin in range(0, rows, step):
            end = min(rows, begin + step)
            a = _apply(embedding, reader.read_rows(embedding.source, begin, end))
            b = _apply(head, reader.read_rows(head.source, begin, end))
            largest = max(largest, float(a.abs().max()))
            worst = max(worst, float((a - b).abs().max()))
            if worst > CLEARLY_DIFFERENT * largest:
                return False
    return worst <= RETIE_TOLERANCE * max(largest, 1e-30)


def _apply(tensor, x):
    ctx = OpContext(store_dtype=torch.float32)
    x = x.float()
    for index, op in enumerate(tensor.row_ops):
        x = op.apply(x, ctx, index)
    return x
