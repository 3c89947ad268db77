"""A small, safe expression language for rules files.

Rules files compute op parameters and new config values from config fields and the command's options,
e.g. ``hidden_size * n`` or ``cfg('head_dim', hidden_size // num_attention_heads)``. Rules files come from
users, so this must never run code: we parse with Python's ``ast`` module (parsing only) and then walk the
tree ourselves, accepting a short whitelist of node types. Attribute access, subscripts, lambdas,
comprehensions, calls to anything but the functions below, and names not in the environment are all
rejected with a one-line error. ``eval`` is never called.
"""

from __future__ import annotations

import ast
import math
import operator
import warnings
from typing import Any, Callable, Mapping

from ..errors import TensorscaleError

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_CONSTANT_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}
_MAX_LENGTH = 2000
_MAX_POWER = 64
_MAX_INT_BITS = 1024


class ExpressionError(TensorscaleError):
    """An expression in a rules file that does not parse, uses a forbidden construct, or fails."""


def _short(source) -> str:
    """The expression for an error message, cut so that the message stays one readable line."""
    text = repr(source)
    return text if len(text) <= 80 else text[:77] + "..."


def _safe_pow(base, exponent):
    if isinstance(exponent, (int, float)) and abs(exponent) > _MAX_POWER:
        raise ExpressionError(f"exponent {exponent} is too large (at most {_MAX_POWER})")
    return operator.pow(base, exponent)


class Expression:
    """A parsed, validated expression; ``evaluate(env)`` computes it against named values."""

    def __init__(self, source: str | int | float | bool | None):
        self.source = source
        if isinstance(source, bool) or source is None or isinstance(source, (int, float)):
            self._tree = ast.Constant(value=source)
            return
        if not isinstance(source, str):
            raise ExpressionError(f"expected an expression string or a number, got {type(source).__name__}")
        if len(source) > _MAX_LENGTH:
            raise ExpressionError(f"expression longer than {_MAX_LENGTH} characters")
        try:
            with warnings.catch_warnings():  # "invalid decimal literal" and friends: we report our own error
                warnings.simplefilter("ignore", SyntaxWarning)
                tree = ast.parse(source.strip(), mode="eval")
        except SyntaxError as exc:
            raise ExpressionError(f"cannot parse expression {_short(source)}: {exc.msg}") from None
        except (ValueError, RecursionError, MemoryError) as exc:  # null bytes, absurd nesting
            raise ExpressionError(f"cannot parse expression {_short(source)}: {type(exc).__name__}") from None
        _validate(tree.body, source)
        self._tree = tree.body

    def names(self) -> set[str]:
        """The free names the expression reads (config fields, options, let-bindings)."""
        found = set()
        for node in ast.walk(self._tree):
            if isinstance(node, ast.Name) and node.id not in _CONSTANT_NAMES and node.id not in FUNCTIONS:
                found.add(node.id)
        return found

    def evaluate(self, env: Mapping[str, Any]) -> Any:
        try:
            value = _Evaluator(env, self.source).visit(self._tree)
            if isinstance(value, float) and not math.isfinite(value):
                # a config value of NaN or 1e400 (inf in JSON), or arithmetic that overflows
                raise ExpressionError(
                    f"{_short(self.source)} evaluates to {value}, not a finite number "
                    "(check config.json for NaN or huge values)"
                )
            if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > _MAX_INT_BITS:
                raise ExpressionError(
                    f"{_short(self.source)} evaluates to a number of {value.bit_length()} bits, "
                    "far beyond any model size (check config.json)"
                )
            return value
        except ExpressionError:
            raise
        except ZeroDivisionError:
            raise ExpressionError(f"division by zero in {_short(self.source)}") from None
        except RecursionError:
            raise ExpressionError(f"expression {_short(self.source)} is nested too deeply") from None
        except (TypeError, ValueError, OverflowError) as exc:
            raise ExpressionError(f"cannot evaluate {_short(self.source)}: {exc}") from None

    def __repr__(self) -> str:
        return f"Expression({_short(self.source)})"


def _validate(node: ast.AST, source: str) -> None:
    allowed = (
        ast.Constant,
        ast.Name,
        ast.Load,
        ast.BinOp,
        ast.UnaryOp,
        ast.BoolOp,
        ast.Compare,
        ast.IfExp,
        ast.Call,
        ast.And,
        ast.Or,
        ast.List,
        ast.Tuple,
        *_BINARY.keys(),
        *_UNARY.keys(),
        *_COMPARE.keys(),
        ast.In,
        ast.NotIn,
    )
    for child in ast.walk(node):
        if not isinstance(child, allowed):
            raise ExpressionError(
                f"forbidden construct {type(child).__name__} in expression {_short(source)}: "
                "only arithmetic, comparisons, and/or/not, 'a if c else b' and the functions "
                f"{', '.join(sorted(FUNCTIONS))} are allowed"
            )
        if isinstance(child, ast.Constant) and not isinstance(child.value, (int, float, bool, str, type(None))):
            raise ExpressionError(f"unsupported constant {child.value!r} in {_short(source)}")
        if isinstance(child, ast.Call):
            if not isinstance(child.func, ast.Name) or child.func.id not in FUNCTIONS:
                raise ExpressionError(
                    f"call to a function that is not allowed in {_short(source)}; allowed: "
                    f"{', '.join(sorted(FUNCTIONS))}"
                )
            if child.keywords:
                raise ExpressionError(f"keyword arguments are not allowed in {_short(source)}")


class _Evaluator:
    def __init__(self, env: Mapping[str, Any], source):
        self.env = env
        self.source = source

    def visit(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in _CONSTANT_NAMES:
                return _CONSTANT_NAMES[node.id]
            if node.id not in self.env:
                raise ExpressionError(
                    f"unknown name {node.id!r} in expression {_short(self.source)} "
                    f"(missing from config.json? use cfg('{node.id}', default))"
                )
            return self.env[node.id]
        if isinstance(node, ast.BinOp):
            left, right = self.visit(node.left), self.visit(node.right)
            for value in (left, right):
                # Arithmetic on numbers only: 'x' * 10**9 or [0] * 10**9 would exhaust memory.
                if not isinstance(value, (int, float)):
                    raise ExpressionError(
                        f"arithmetic on a non-number ({type(value).__name__}) in {_short(self.source)}"
                    )
            op = _safe_pow if isinstance(node.op, ast.Pow) else _BINARY[type(node.op)]
            result = op(left, right)
            if isinstance(result, int) and result.bit_length() > _MAX_INT_BITS:
                raise ExpressionError(f"number too large in {_short(self.source)}")
            if isinstance(result, complex):
                raise ExpressionError(f"complex result in {_short(self.source)}")
            return result
        if isinstance(node, ast.UnaryOp) and not isinstance(node.op, ast.Not):
            value = self.visit(node.operand)
            if not isinstance(value, (int, float)):
                raise ExpressionError(f"arithmetic on a non-number ({type(value).__name__}) in {_short(self.source)}")
            return _UNARY[type(node.op)](value)
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](self.visit(node.operand))
        if isinstance(node, ast.BoolOp):
            if isinstance(node.op, ast.And):
                value = True
                for part in node.values:
                    value = self.visit(part)
                    if not value:
                        return value
                return value
            value = False
            for part in node.values:
                value = self.visit(part)
                if value:
                    return value
            return value
        if isinstance(node, ast.Compare):
            left = self.visit(node.left)
            for op, comparator in zip(node.ops, node.comparators):
                right = self.visit(comparator)
                if isinstance(op, ast.In):
                    ok = left in right
                elif isinstance(op, ast.NotIn):
                    ok = left not in right
                else:
                    ok = _COMPARE[type(op)](left, right)
                if not ok:
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return self.visit(node.body) if self.visit(node.test) else self.visit(node.orelse)
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self.visit(element) for element in node.elts]
        if isinstance(node, ast.Call):
            name = node.func.id
            if name == "cfg":
                # cfg('field', default): a config field that may be absent or null.
                if len(node.args) not in (1, 2) or not isinstance(node.args[0], ast.Constant):
                    raise ExpressionError(
                        f"cfg() takes a quoted field name and an optional default in {_short(self.source)}"
                    )
                field = node.args[0].value
                value = self.env.get(field)
                if value is None:
                    return self.visit(node.args[1]) if len(node.args) == 2 else None
                return value
            args = [self.visit(arg) for arg in node.args]
            return FUNCTIONS[name](*args)
        raise ExpressionError(f"unsupported construct in {_short(self.source)}")  # pragma: no cover - validated


def _integer(value):
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    raise ExpressionError(f"expected a whole number, got {value!r}")


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "cfg": None,  # handled specially: it looks at a field that may be missing
    "min": min,
    "max": max,
    "abs": abs,
    "int": _integer,
    "sqrt": math.sqrt,
    "len": len,
}


def evaluate(source, env: Mapping[str, Any]) -> Any:
    """Parse and evaluate in one step."""
    return Expression(source).evaluate(env)
