"""tensorscale: resize transformer language models by rewriting safetensors checkpoints.

Importing the package is cheap on purpose: no transformers, no torch import until an operation runs.
"""

__version__ = "0.1.0"
