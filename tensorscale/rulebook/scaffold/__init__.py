"""`rules new`: a starting rules file for a new architecture, from config.json and safetensors headers.

Pure functions, headers and config in, YAML text out: no tensor data is read and nothing imports torch or
transformers. The scaffold is written in the rules language of `schema.py`:
- sizes come from config.json (hidden, heads, kv heads, FFN, vocab under their usual names), or, where a
  field is missing or null, from the tensor shapes;
- tensor names are grouped into patterns, the first index generalised to ``(?P<layer>\\d+)``;
- each axis gets a role from its size compared with the spaces' sizes, and from the module's name where
  sizes alone cannot tell (a square q_proj is [heads, hidden.in]; an o_proj is [hidden, heads.in]);
- the storage layout, [out, in] (nn.Linear) or [in, out] (GPT-2's Conv1D), is voted on by the tensors whose
  names say whether they read or write the residual stream and whose shapes say on which axis it lies;
- the tied-embedding pattern of rules/llama.yaml (final norm ÷n_tiles while tied, lm_head rules, `create`
  for --untie-embeddings) and a drop rule for rotary inv_freq buffers are added.
Every guess that the names and shapes cannot settle gets a ``# DECIDE:`` comment above it.

The work runs in one direction, a module a step, so each can be read (and a new architecture's names added)
without the others:
- vocabulary.py: the name tables (config fields, module names) and the DECIDE marker;
- model.py: the checkpoint as patterns and sizes, and its norm kind;
- roles.py: each tensor's axis roles, the storage layout, and the guesses they leave;
- render.py: the YAML text, section by section.
"""

from __future__ import annotations

from .model import _group, _model, _settle_norm
from .render import _render, count_decisions
from .roles import _kind, _settle_layout, _tensor_rules
from .vocabulary import DECIDE

__all__ = ["DECIDE", "count_decisions", "scaffold_rules"]


def scaffold_rules(config: dict, tensors: dict, *, source: str = "SRC", name: str | None = None) -> str:
    """A starting rules file (YAML text) for the checkpoint with this config.json and these tensors (name ->
    an object with .shape and .dtype, such as a safetensors TensorInfo, or a (shape, dtype) pair)."""
    patterns = _group(tensors)
    model = _model(config, patterns)
    _settle_norm(config, model, patterns)
    _settle_layout(model, patterns)
    kinds = {p.regex: _kind(p) for p in patterns}
    by_regex = _tensor_rules(model, patterns, kinds)
    return _render(config, model, patterns, by_regex, kinds, source, name)
