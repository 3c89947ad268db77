"""Running checkpoints: `gen` (stream a completion) and `verify` (prove two checkpoints compute the same function).

Everything here needs torch and transformers, which the rest of tensorscale never loads: the engine rewrites
checkpoints without instantiating them. So nothing is imported at package level; each module imports
transformers through `loading.require_transformers`, which turns a missing install into a one-line hint.
"""
