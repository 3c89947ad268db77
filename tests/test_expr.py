"""The rules expression language computes what it should and refuses anything that could run code."""

import pytest

from tensorscale.rulebook.expr import Expression, ExpressionError, evaluate

ENV = {"hidden_size": 64, "num_attention_heads": 4, "n": 3, "flag": True, "nothing": None}


@pytest.mark.parametrize(
    "source,expected",
    [
        ("hidden_size * n", 192),
        ("hidden_size // num_attention_heads", 16),
        ("1 / n", 1 / 3),
        ("cfg('head_dim', hidden_size // num_attention_heads)", 16),
        ("cfg('nothing', 5)", 5),
        ("cfg('hidden_size', 1)", 64),
        ("flag and not false", True),
        ("2 if n > 2 else 1", 2),
        ("max(n, 5) + min(1, 2)", 6),
        ("n in [1, 2, 3]", True),
        ("-n ** 2", -9),
        (7, 7),
    ],
)
def test_evaluates(source, expected):
    assert evaluate(source, ENV) == pytest.approx(expected)


@pytest.mark.parametrize(
    "source",
    [
        "__import__('os').system('true')",
        "n.__class__",
        "().__class__.__bases__",
        "[x for x in range(3)]",
        "lambda: 1",
        "open('/etc/passwd')",
        "ENV['n']",
        "getattr(n, 'real')",
        "print(1)",
        "max(n, key=abs)",
        "n if",
    ],
)
def test_rejects_code(source):
    with pytest.raises(ExpressionError):
        Expression(source)


def test_unknown_name_is_explained():
    with pytest.raises(ExpressionError, match="unknown name 'intermediate_size'"):
        evaluate("intermediate_size * 2", ENV)


def test_huge_power_is_refused():
    with pytest.raises(ExpressionError, match="exponent"):
        evaluate("9 ** 999999", ENV)


def test_division_by_zero_is_one_line():
    with pytest.raises(ExpressionError, match="division by zero"):
        evaluate("n / 0", ENV)
