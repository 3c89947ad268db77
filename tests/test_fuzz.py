"""Fuzzing: hostile headers, rules files, expressions and CLI arguments end in a normal result or our
clean one-line error — never another exception, a hang, or a file outside the temporary folder.

Default: 150 cases per test. `pytest tests/test_fuzz.py --fuzz` runs 10,000 per test.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile

import pytest
import yaml
from hypothesis import given, strategies as st

from fixtures import bounded_time, build_checkpoint
from tensorscale.errors import TensorscaleError
from tensorscale.reading.safetensors_header import DTYPE_SIZES, parse_header_bytes
from tensorscale.rulebook.expr import Expression, ExpressionError
from tensorscale.rulebook.schema import load_rules_text

CASE_SECONDS = 10


def time_limit(seconds=CASE_SECONDS):
    return bounded_time(seconds)


# ---- safetensors headers -------------------------------------------------------------------------

dtypes = st.sampled_from([*DTYPE_SIZES, "F99", "", "bf16", 7])
shapes = st.one_of(st.lists(st.integers(-2, 40), max_size=4), st.integers(), st.text(max_size=3), st.none())
offsets = st.one_of(st.lists(st.integers(-5, 2000), min_size=0, max_size=3), st.none(), st.text(max_size=2))
entries = st.fixed_dictionaries({}, optional={"dtype": dtypes, "shape": shapes, "data_offsets": offsets})
headers = st.dictionaries(st.text(max_size=8), st.one_of(entries, st.integers(), st.lists(st.integers())), max_size=5)


@given(header=headers, data_size=st.integers(0, 3000), metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3), st.integers()))))
def test_header_reader_structured(header, data_size, metadata):
    if metadata is not None:
        header = {**header, "__metadata__": metadata}
    raw = json.dumps(header).encode()
    with time_limit():
        try:
            parsed = parse_header_bytes(raw, path="fuzz.safetensors", file_size=8 + len(raw) + data_size)
        except TensorscaleError:
            return
    covered = sum(info.nbytes for info in parsed.tensors.values())
    assert covered == data_size  # accepted headers describe exactly the data that is there


def read_file_bytes(raw: bytes) -> None:
    """Write `raw` as a .safetensors file and read its header: a result or our clean error, in bounded time."""
    from tensorscale.reading.safetensors_header import read_header

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as handle:
        handle.write(raw)
        handle.flush()
        with time_limit():
            try:
                read_header(handle.name)
            except TensorscaleError:
                pass


@given(raw=st.binary(max_size=300))
def test_header_reader_random_bytes(raw):
    read_file_bytes(raw)


@given(length=st.integers(0, 2**64 - 1), body=st.binary(max_size=64))
def test_header_reader_lengths(length, body):
    read_file_bytes(struct.pack("<Q", length) + body)


# ---- expressions ---------------------------------------------------------------------------------

TOKENS = ["n", "m", "hidden_size", "1", "0", "2.5", "-", "+", "*", "/", "//", "%", "**", "(", ")", " if ", " else ",
          " and ", " or ", "not ", "==", "<", "cfg('x', 3)", "max(", ",", "min(", "'s'", "[", "]", ".real",
          "__import__", "lambda", "x", "sqrt(", "int(", "len(", "abs(", " in ", "True", "None", "9" * 30]


@given(parts=st.lists(st.sampled_from(TOKENS), max_size=25))
def test_expressions_from_tokens(parts):
    check_expression("".join(parts))


@given(text=st.text(max_size=60))
def test_expressions_from_text(text):
    check_expression(text)


def check_expression(text):
    env = {"n": 2, "m": 3, "hidden_size": 64, "x": None}
    with time_limit():
        try:
            Expression(text).evaluate(env)
        except ExpressionError:
            pass


# ---- rules files ---------------------------------------------------------------------------------

leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.text(max_size=12),
                 st.sampled_from(["n", "hidden_size * n", "hidden", "hidden.in", "-", ".*", "model\\..*", "(", "1/0",
                                  "cfg('a')", "__import__('os')", "tile", "fused"]))
KEYS = ["name", "detect", "let", "checks", "spaces", "config", "tensors", "create", "unmatched", "match", "axes", "ops",
        "scale", "when", "replicate", "drop", "size", "grow", "unit", "clone", "axis", "times", "parts", "tile",
        "tile_divide", "fused", "pad", "assert", "message", "from", "count", "model_type", "hidden"]
documents = st.recursive(
    leaf,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.sampled_from(KEYS), children, max_size=5)),
    max_leaves=30,
)


@given(document=documents)
def test_rules_parser_structures(document):
    text = yaml.safe_dump(document)
    with time_limit():
        try:
            load_rules_text(text, "fuzz.yaml")
        except TensorscaleError:
            pass


@given(text=st.text(max_size=200))
def test_rules_parser_text(text):
    with time_limit():
        try:
            load_rules_text(text, "fuzz.yaml")
        except TensorscaleError:
            pass


# ---- CLI argument combinations ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny", "llama", tie_word_embeddings=True,
                            hidden_size=16, intermediate_size=16, num_hidden_layers=1, vocab_size=32)


OPTIONS = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["-edm", "-upm"]), st.sampled_from(["1", "2", "3", "0", "-1", "1.5", "x", ""])),
        st.tuples(st.just("--snr-db"), st.sampled_from(["20", "-5", "nan", "inf", "x"])),
        st.tuples(st.just("--dtype"), st.sampled_from(["keep", "float32", "bfloat16", "float16", "int8"])),
        st.tuples(st.just("--max-shard-size"), st.sampled_from(["5GB", "1KB", "0", "-1MB", "1e3", "x"])),
        st.tuples(st.just("--seed"), st.sampled_from(["0", "-3", "x"])),
        st.tuples(st.sampled_from(["--untie-embeddings", "--force", "--json", "-q", "--verify-files", "--manifest",
                                   "--bogus"]),),
        # width, strategy and depth (the tiny model: hidden 16, FFN 16, 4 heads over 2 kv heads, 1 layer)
        st.tuples(st.just("--strategy"), st.sampled_from(["clone", "pad", "zeros"])),
        st.tuples(st.sampled_from(["--hidden-size", "--intermediate-size", "--num-attention-heads",
                                   "--num-key-value-heads"]), st.sampled_from(["24", "32", "16", "8", "6", "3", "0", "x"])),
        st.tuples(st.just("--add-layers"), st.sampled_from(["0", "1", "2", "-1", "x"])),
        st.tuples(st.just("--at"), st.sampled_from(["0", "1", "0,0", "5", "-1", "x", ""])),
        st.tuples(st.just("--duplicate-layers"), st.sampled_from(["0:1", "1:0", "0:5", "x", "::"])),
    ),
    max_size=6,
)


@given(command=st.sampled_from(["up", "plan"]), options=OPTIONS)
def test_cli_combinations(tiny, command, options):
    from click.testing import CliRunner

    from tensorscale.cli.main import cli

    with tempfile.TemporaryDirectory() as work:
        args = [command, "-i", tiny, "-o", os.path.join(work, "out")] + [part for option in options for part in option]
        if command == "plan":
            args = [a for a in args if a not in ("--force", "-q", "--verify-files", "--manifest")]
        with time_limit(60):
            result = CliRunner().invoke(cli, args)
        assert result.exit_code in (0, 2), (args, result.output, result.exception)
        if result.exception is not None:
            assert isinstance(result.exception, SystemExit), (args, repr(result.exception))
        assert "Traceback" not in result.output
        produced = set(os.listdir(work))
        assert produced <= {"out"}, f"left {produced} for {args}"
        if result.exit_code != 0 or command == "plan":
            assert produced == set(), f"wrote {produced} for {args} ({result.output})"


# ---- issue 14: nesting depth, huge numbers, NaN/Inf, aliases, backtracking patterns --------------------

from hypothesis import settings  # noqa: E402

# Cases that plan or write a checkpoint cost ~0.1-1 s each: fewer of them by default, a tenth of --fuzz's.
HEAVY = settings(max_examples=20 if settings().max_examples <= 150 else settings().max_examples // 10)

@HEAVY
@given(depth=st.integers(1, 200_000), kind=st.sampled_from(["[", "{\"a\":"]))
def test_header_reader_nesting_depth(depth, kind):
    close = "]" if kind == "[" else "}"
    raw = ('{"x": ' + kind * depth + ("1" if kind != "[" else "") + close * depth + "}").encode()
    with time_limit():
        try:
            parse_header_bytes(raw, path="fuzz.safetensors", file_size=8 + len(raw))
        except TensorscaleError:
            pass


HUGE = st.one_of(st.integers(-(2**70), 2**70), st.integers(10**300, 10**400),
                 st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, -1, 2**62, 10**18]))
CONFIG_KEYS = ["hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
               "vocab_size", "rms_norm_eps", "head_dim", "max_position_embeddings"]


@HEAVY
@given(values=st.dictionaries(st.sampled_from(CONFIG_KEYS), HUGE, min_size=1, max_size=3),
       multiplier=st.sampled_from([1, 2, 3, 10**5, 10**9]))
def test_plans_from_huge_or_nonfinite_config_numbers(tiny, values, multiplier):
    """Huge ints, 1e400 (inf), NaN: a plan or one line, in bounded time and memory."""
    from tensorscale.convert import plan_conversion
    from tensorscale.planning.plan import Options

    with tempfile.TemporaryDirectory() as work:
        folder = os.path.join(work, "m")
        os.mkdir(folder)
        for name in os.listdir(tiny):
            os.symlink(os.path.join(tiny, name), os.path.join(folder, name))
        config = json.load(open(os.path.join(tiny, "config.json")))
        config.update(values)
        os.unlink(os.path.join(folder, "config.json"))
        with open(os.path.join(folder, "config.json"), "w") as handle:
            handle.write(json.dumps(config, allow_nan=True))
        with time_limit():
            try:
                plan_conversion(folder, Options(multiplier, multiplier), headers_only=True)
            except TensorscaleError:
                pass


@given(anchor_depth=st.integers(1, 12), fanout=st.integers(1, 12))
def test_rules_with_aliases_are_refused(anchor_depth, fanout):
    lines = ["name: bomb", "x0: &a0 [1]"]
    for level in range(1, anchor_depth + 1):
        lines.append(f"x{level}: &a{level} [{', '.join([f'*a{level - 1}'] * fanout)}]")
    lines.append("tensors: [{match: 'a', drop: true}]")
    with time_limit():
        with pytest.raises(TensorscaleError, match="alias|unknown key"):
            load_rules_text("\n".join(lines), "fuzz.yaml")


@HEAVY
@given(depth=st.integers(1, 2000))
def test_rules_nesting_depth(depth):
    text = "name: deep\ntensors: " + "[" * depth + "]" * depth + "\n"
    with time_limit():
        try:
            load_rules_text(text, "fuzz.yaml")
        except TensorscaleError:
            pass


PATTERN_TOKENS = ["(", ")", ".", "|", "*", "+", "?", "a", "x", "\\.", "\\d+", "{2,}", "(?P<layer>\\d+)", "[ab]", "Q", ".*"]


@given(parts=st.lists(st.sampled_from(PATTERN_TOKENS), min_size=1, max_size=16),
       name=st.sampled_from(["model.layers.0.self_attn.q_proj.weight", "x" * 60, "a" * 60 + "b",
                             "model.layers.12.mlp.down_proj.weight.model.layers.12.mlp"]))
def test_backtracking_patterns_are_bounded(parts, name):
    from tensorscale.rulebook.patterns import Pattern

    with time_limit(5):
        try:
            Pattern("".join(parts), "fuzz.yaml: tensors[0]").fullmatch(name)
        except TensorscaleError:
            pass


@HEAVY
@given(positions=st.lists(st.integers(0, 10_000), min_size=1, max_size=4),
       value=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
       allow=st.booleans())
def test_nonfinite_weights_are_refused_or_warned(tiny, positions, value, allow):
    from safetensors.torch import load_file, save_file

    from tensorscale.convert import execute_plan, plan_conversion
    from tensorscale.planning.plan import Options

    with tempfile.TemporaryDirectory() as work:
        folder = os.path.join(work, "m")
        os.mkdir(folder)
        for name in os.listdir(tiny):
            if name != "model.safetensors":
                os.symlink(os.path.join(tiny, name), os.path.join(folder, name))
        tensors = load_file(os.path.join(tiny, "model.safetensors"))
        names = sorted(tensors)
        for position in positions:
            tensor = tensors[names[position % len(names)]]
            tensor.view(-1)[position % tensor.numel()] = value
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        out = os.path.join(work, "out")
        with time_limit(60):
            try:
                result = execute_plan(plan_conversion(folder, Options(2, 2)), out, show_progress=False,
                                      allow_nonfinite=allow)
            except TensorscaleError as exc:
                assert not allow and "NaN or Inf" in str(exc)
                assert not os.path.exists(out)
            else:
                assert allow and result.warnings
