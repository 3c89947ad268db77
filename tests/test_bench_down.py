"""benchmarks/bench_down.py's bookkeeping (no model is run): the --levels parser, the parameter count a
level's shape gives, and the ShortGPT layer removal's renumbering, on the toy checkpoint in examples/."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "examples", "pydoc-llama")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_down", os.path.join(REPO, "benchmarks", "bench_down.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_levels_parse_and_reject(bench):
    assert bench.parse_levels("576,1280,9,3; 576,1024,6,3;") == [(576, 1280, 9, 3), (576, 1024, 6, 3)]
    assert len(bench.parse_levels(bench.REAL_LEVELS)) == 4
    for bad in ("576,1280,9", "576,1280,9,x", "576,0,9,3", "", ";"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_levels(bad)


def test_target_parameters_match_what_slice_writes(bench):
    weights = bench.tensors(TOY)
    shapes = bench.tensor_shapes(TOY)
    for _, hidden, inter, heads, kv in bench.TARGETS:
        layout = bench.Layout(TOY, dict(zip(bench.TARGET_KEYS, (hidden, inter, heads, kv))))
        sliced = bench.apply_selection(layout, weights, bench.select_units(layout, None), False)
        assert bench.target_parameters(layout, shapes) == sum(t.numel() for t in sliced.values())
    assert sum(math.prod(s) for s in shapes.values()) == sum(t.numel() for t in weights.values())


def test_remove_layers_renumbers_and_meets_the_budget(bench):
    weights = bench.tensors(TOY)
    config = bench.read_config(TOY)
    layout = bench.Layout(TOY, {k: config[k] for k in bench.TARGET_KEYS})
    layers = config["num_hidden_layers"]
    influence = {i: float(w) for i, w in enumerate([3.0, 1.0, 2.0, 4.0][:layers])}
    total = sum(t.numel() for t in weights.values())
    out, updates, removed = bench.remove_layers(layout, weights, influence, total - 1)
    assert removed == [1] and updates == {"num_hidden_layers": layers - 1}
    indices = {int(m.group(1)) for name in out for m in [re.search(r"\.layers\.(\d+)\.", name)] if m}
    assert indices == set(range(layers - 1))
    assert sum(t.numel() for t in out.values()) <= total - 1
    # layer 2 became layer 1: same tensors
    assert all(
        out[name.replace(".layers.2.", ".layers.1.")] is weights[name] for name in weights if ".layers.2." in name
    )
