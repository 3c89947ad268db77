"""The one exception type a user's mistake raises.

The CLI turns a TensorscaleError into a single line and a nonzero exit; anything else is a bug and keeps
its traceback. Messages name the problem and, where there is one, the fix.
"""


class TensorscaleError(Exception):
    """A problem with the user's input, options or environment, explained in one line."""


class CannotFold(TensorscaleError):
    """Sizes cluster-folding cannot make (a stream that folds only into equal clusters, by whole divisors).
    `down --method auto` then refits instead: a model with no copies to merge is what refit is for."""
