"""Fuzzing: hostile headers, rules files, expressions and CLI arguments end in a normal result or our
clean one-line error — never another exception, a hang, or a file outside the temporary folder.

Default: 150 cases per test. `pytest tests/test_fuzz.py --fuzz` runs 10,000 per test.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile

import pytest
import yaml
from fixtures import bounded_time, build_checkpoint
from hypothesis import example, given
from hypothesis import strategies as st

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


@given(
    header=headers,
    data_size=st.integers(0, 3000),
    metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3), st.integers()))),
)
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

TOKENS = [
    "n",
    "m",
    "hidden_size",
    "1",
    "0",
    "2.5",
    "-",
    "+",
    "*",
    "/",
    "//",
    "%",
    "**",
    "(",
    ")",
    " if ",
    " else ",
    " and ",
    " or ",
    "not ",
    "==",
    "<",
    "cfg('x', 3)",
    "max(",
    ",",
    "min(",
    "'s'",
    "[",
    "]",
    ".real",
    "__import__",
    "lambda",
    "x",
    "sqrt(",
    "int(",
    "len(",
    "abs(",
    " in ",
    "True",
    "None",
    "9" * 30,
]


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

leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 300),
    st.text(max_size=12),
    st.sampled_from(
        [
            "n",
            "hidden_size * n",
            "hidden",
            "hidden.in",
            "-",
            ".*",
            "model\\..*",
            "(",
            "1/0",
            "cfg('a')",
            "__import__('os')",
            "tile",
            "fused",
        ]
    ),
)
KEYS = [
    "name",
    "detect",
    "let",
    "checks",
    "spaces",
    "config",
    "tensors",
    "create",
    "unmatched",
    "match",
    "axes",
    "ops",
    "scale",
    "when",
    "replicate",
    "drop",
    "size",
    "grow",
    "unit",
    "clone",
    "axis",
    "times",
    "parts",
    "tile",
    "tile_divide",
    "fused",
    "pad",
    "assert",
    "message",
    "from",
    "count",
    "model_type",
    "hidden",
]
documents = st.recursive(
    leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.sampled_from(KEYS), children, max_size=5)
    ),
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
    return build_checkpoint(
        tmp_path_factory.mktemp("fuzz") / "tiny",
        "llama",
        tie_word_embeddings=True,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        vocab_size=32,
    )


OPTIONS = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["-edm", "-upm"]), st.sampled_from(["1", "2", "3", "0", "-1", "1.5", "x", ""])),
        st.tuples(st.just("--snr-db"), st.sampled_from(["20", "-5", "nan", "inf", "x"])),
        st.tuples(st.just("--dtype"), st.sampled_from(["keep", "float32", "bfloat16", "float16", "int8"])),
        st.tuples(st.just("--max-shard-size"), st.sampled_from(["5GB", "1KB", "0", "-1MB", "1e3", "x"])),
        st.tuples(st.just("--seed"), st.sampled_from(["0", "-3", "x"])),
        st.tuples(
            st.sampled_from(
                ["--untie-embeddings", "--force", "--json", "-q", "--verify-files", "--manifest", "--bogus"]
            ),
        ),
        # width, strategy and depth (the tiny model: hidden 16, FFN 16, 4 heads over 2 kv heads, 1 layer)
        st.tuples(st.just("--strategy"), st.sampled_from(["clone", "pad", "zeros"])),
        st.tuples(
            st.sampled_from(["--hidden-size", "--intermediate-size", "--num-attention-heads", "--num-key-value-heads"]),
            st.sampled_from(["24", "32", "16", "8", "6", "3", "0", "x"]),
        ),
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


# ---- GGUF files ----------------------------------------------------------------------------------


def _gguf_bytes(tmp_path_factory, model_type="llama", qtype="Q4_1", **overrides):
    from gguf_fixtures import build_gguf

    path = build_gguf(tmp_path_factory.mktemp("gguf-fuzz"), model_type, qtype, **overrides)
    with open(path, "rb") as handle:
        return handle.read()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return _gguf_bytes(tmp_path_factory)


def _open_and_read_all(path):
    """Open a GGUF as the engine does, and decode every tensor; a TensorscaleError is the only failure allowed."""
    from tensorscale.reading.source import open_source
    from tensorscale.reading.tensor_reader import ShardReader

    source = open_source(path, headers_only=True)
    with ShardReader() as reader:
        for info in source.tensors.values():
            reader.read(info)


@given(cut=st.integers(0, 10**6))
def test_gguf_truncated(gguf_file, cut):
    cut = cut % len(gguf_file)
    with tempfile.TemporaryDirectory() as folder, time_limit():
        path = os.path.join(folder, "cut.gguf")
        with open(path, "wb") as handle:
            handle.write(gguf_file[:cut])
        with pytest.raises(TensorscaleError):
            _open_and_read_all(path)


def test_gguf_truncated_anywhere_in_the_header(tmp_path_factory, tmp_path):
    """Every cut inside the header (metadata of every type, string arrays, the tensor table)."""
    from tensorscale.reading.gguf_header import read_gguf_header

    data = _gguf_bytes(tmp_path_factory, tokenizer=True)
    path = tmp_path / "cut.gguf"
    path.write_bytes(data)
    header_end = read_gguf_header(str(path)).data_start
    for cut in range(0, header_end, 3):
        path.write_bytes(data[:cut])
        with pytest.raises(TensorscaleError):
            read_gguf_header(str(path))


@given(
    edits=st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), min_size=1, max_size=6),
    spot=st.sampled_from(["header", "anywhere"]),
)
@example(edits=[(691, 0)], spot="header")  # a k_proj dimension set to 0: gguf-py raised on the empty tensor
def test_gguf_corrupted_bytes(gguf_file, edits, spot):
    """Bytes of the header (counts, lengths, types, shapes, offsets) or data changed: a model or our error."""
    data = bytearray(gguf_file)
    for where, value in edits:
        data[where if spot == "header" else (where * 151) % len(data)] = value
    with tempfile.TemporaryDirectory() as folder, time_limit():
        path = os.path.join(folder, "bad.gguf")
        with open(path, "wb") as handle:
            handle.write(data)
        try:
            _open_and_read_all(path)
        except TensorscaleError as exc:
            assert "\n" not in str(exc)


def _cli_refuses(path, tmp_path, fragment):
    """`desc` and `up` give one line naming the problem, exit 2, and write nothing."""
    out = tmp_path / "out"
    for args in (["desc", "-i", str(path)], ["up", "-i", str(path), "-o", str(out), "-edm", "2", "-q"]):
        result = subprocess_cli(args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], result.stderr
        assert "Traceback" not in result.stderr
    assert not out.exists()


# The CLI's address space in these tests: far above what it needs (desc runs in 2 GB), far below the machine,
# so an allocation sized by a corrupt count fails here as a MemoryError traceback instead of an OOM kill.
CLI_ADDRESS_SPACE = 4 << 30


def _limit_memory():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (CLI_ADDRESS_SPACE, CLI_ADDRESS_SPACE))


def subprocess_cli(args):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "tensorscale.cli.main", *args], capture_output=True, text=True, preexec_fn=_limit_memory
    )


def _patched(data: bytes, find: bytes, replace: bytes) -> bytes:
    assert data.count(find) >= 1
    return data.replace(find, replace, 1)


def test_gguf_bad_inputs_are_one_line(gguf_file, tmp_path, tmp_path_factory):
    import gguf as gguf_py

    cases = {}
    cases["truncated.gguf"] = (gguf_file[: len(gguf_file) - 1000], "truncated")
    cases["header-cut.gguf"] = (gguf_file[:200], "truncated")
    # an architecture we do not know (same length, so the header stays well formed)
    cases["arch.gguf"] = (
        _patched(gguf_file, b"\x05\x00\x00\x00\x00\x00\x00\x00llama", b"\x05\x00\x00\x00\x00\x00\x00\x00lxama"),
        "architecture 'lxama' is not supported",
    )
    # a tensor whose ggml type id is unknown, and one of a type we do not read (Q2_K)
    name = b"blk.0.ffn_up.weight"
    at = gguf_file.index(name) + len(name) + 4 + 16  # n_dims, 2 dims, then the type
    cases["type.gguf"] = (gguf_file[:at] + struct.pack("<I", 99) + gguf_file[at + 4 :], "unknown ggml type 99")
    q2k = struct.pack("<I", int(gguf_py.GGMLQuantizationType.Q2_K))
    cases["q2k.gguf"] = (gguf_file[:at] + q2k + gguf_file[at + 4 :], None)  # sizes change: refused either way
    # metadata that disagrees with the shapes: embedding_length 256 -> 512
    key = b"llama.embedding_length"
    at = gguf_file.index(key) + len(key) + 4
    cases["sizes.gguf"] = (gguf_file[:at] + struct.pack("<I", 512) + gguf_file[at + 4 :], "disagrees with the tensors")
    key = b"llama.block_count"
    at = gguf_file.index(key) + len(key) + 4
    cases["blocks.gguf"] = (
        gguf_file[:at] + struct.pack("<I", 3) + gguf_file[at + 4 :],
        "block_count is 3 but the file holds",
    )
    # a block count of 2**32 - 1: found by the fuzz test above, where set(range(block_count)) took 24 GB
    cases["blocks-huge.gguf"] = (
        gguf_file[:at] + struct.pack("<I", 2**32 - 1) + gguf_file[at + 4 :],
        "block_count is 4294967295 but the file holds",
    )
    key = b"llama.attention.head_count_kv"
    at = gguf_file.index(key) + len(key) + 4
    kv_lie = gguf_file[:at] + struct.pack("<I", 1) + gguf_file[at + 4 :]
    # a split GGUF, by name
    cases["model-00001-of-00003.gguf"] = (gguf_file, "split into 3 files")
    for filename, (data, fragment) in cases.items():
        path = tmp_path / filename
        path.write_bytes(data)
        if fragment is None:
            with pytest.raises(TensorscaleError):
                _open_and_read_all(str(path))
            continue
        _cli_refuses(path, tmp_path, fragment)
    # kv heads that disagree with k's rows: desc describes what the header says; up refuses to write
    path = tmp_path / "kv.gguf"
    path.write_bytes(kv_lie)
    result = subprocess_cli(["up", "-i", str(path), "-o", str(tmp_path / "kv-out"), "-edm", "2", "-q"])
    assert result.returncode == 2 and "does not match" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "kv-out").exists()


def test_gguf_lying_offsets(gguf_file, tmp_path):
    """A tensor offset pointing past the end or onto another tensor."""
    name = b"blk.0.ffn_up.weight"
    at = gguf_file.index(name) + len(name) + 4 + 16 + 4
    for offset, fragment in ((len(gguf_file) * 2 // 32 * 32, "past the end"), (0, "overlap")):
        path = tmp_path / "offset.gguf"
        path.write_bytes(gguf_file[:at] + struct.pack("<Q", offset) + gguf_file[at + 8 :])
        _cli_refuses(path, tmp_path, fragment)


# ---- issue 14: nesting depth, huge numbers, NaN/Inf, aliases, backtracking patterns --------------------

from hypothesis import settings  # noqa: E402

# Cases that plan or write a checkpoint cost ~0.1-1 s each: fewer of them by default, a tenth of --fuzz's.
HEAVY = settings(max_examples=20 if settings().max_examples <= 150 else settings().max_examples // 10)


@HEAVY
@given(depth=st.integers(1, 200_000), kind=st.sampled_from(["[", '{"a":']))
def test_header_reader_nesting_depth(depth, kind):
    close = "]" if kind == "[" else "}"
    raw = ('{"x": ' + kind * depth + ("1" if kind != "[" else "") + close * depth + "}").encode()
    with time_limit():
        try:
            parse_header_bytes(raw, path="fuzz.safetensors", file_size=8 + len(raw))
        except TensorscaleError:
            pass


HUGE = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(10**300, 10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 2**62, 10**18]),
)
CONFIG_KEYS = [
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "vocab_size",
    "rms_norm_eps",
    "head_dim",
    "max_position_embeddings",
]


@HEAVY
@given(
    values=st.dictionaries(st.sampled_from(CONFIG_KEYS), HUGE, min_size=1, max_size=3),
    multiplier=st.sampled_from([1, 2, 3, 10**5, 10**9]),
)
def test_plans_from_huge_or_nonfinite_config_numbers(tiny, values, multiplier):
    """Huge ints, 1e400 (inf), NaN: a plan or one line, in bounded time and memory."""
    from tensorscale.convert import plan_conversion
    from tensorscale.planning.plan import UpOptions

    with tempfile.TemporaryDirectory() as work:
        folder = os.path.join(work, "m")
        os.mkdir(folder)
        for name in os.listdir(tiny):  # copies: a weight file linked from outside the folder is refused
            shutil.copy(os.path.join(tiny, name), os.path.join(folder, name))
        config = json.load(open(os.path.join(tiny, "config.json")))
        config.update(values)
        os.unlink(os.path.join(folder, "config.json"))
        with open(os.path.join(folder, "config.json"), "w") as handle:
            handle.write(json.dumps(config, allow_nan=True))
        with time_limit():
            try:
                plan_conversion(folder, UpOptions(multiplier, multiplier), headers_only=True)
            except TensorscaleError as exc:
                assert "\n" not in str(exc) and "link out of the model folder" not in str(exc), str(exc)


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


PATTERN_TOKENS = [
    "(",
    ")",
    ".",
    "|",
    "*",
    "+",
    "?",
    "a",
    "x",
    "\\.",
    "\\d+",
    "{2,}",
    "(?P<layer>\\d+)",
    "[ab]",
    "Q",
    ".*",
]


@given(
    parts=st.lists(st.sampled_from(PATTERN_TOKENS), min_size=1, max_size=16),
    name=st.sampled_from(
        [
            "model.layers.0.self_attn.q_proj.weight",
            "x" * 60,
            "a" * 60 + "b",
            "model.layers.12.mlp.down_proj.weight.model.layers.12.mlp",
        ]
    ),
)
def test_backtracking_patterns_are_bounded(parts, name):
    from tensorscale.rulebook.patterns import Pattern

    with time_limit(5):
        try:
            Pattern("".join(parts), "fuzz.yaml: tensors[0]").fullmatch(name)
        except TensorscaleError:
            pass


@HEAVY
@given(
    positions=st.lists(st.integers(0, 10_000), min_size=1, max_size=4),
    value=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    allow=st.booleans(),
)
def test_nonfinite_weights_are_refused_or_warned(tiny, positions, value, allow):
    from safetensors.torch import load_file, save_file

    from tensorscale.convert import execute_plan, plan_conversion
    from tensorscale.planning.plan import UpOptions

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
                result = execute_plan(
                    plan_conversion(folder, UpOptions(2, 2)), out, show_progress=False, allow_nonfinite=allow
                )
            except TensorscaleError as exc:
                assert not allow and "NaN or Inf" in str(exc)
                assert not os.path.exists(out)
            else:
                assert allow and result.warnings
