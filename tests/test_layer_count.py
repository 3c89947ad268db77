"""A config.json whose layer count disagrees with the tensors gets one line naming both, and nothing is
written; a huge count (a corrupt or hostile config) is answered in bounded time and memory, never by
materialising range(count)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from fixtures import build_checkpoint

ADDRESS_SPACE = 4 << 30  # the CLI needs ~2 GB; an allocation sized by the count fails instead of OOM-killing


def _limit_memory():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("layers") / "m", "llama", num_hidden_layers=2)


def _with_layer_count(folder, tmp_path, count):
    copy = tmp_path / "m"
    copy.mkdir()
    for name in os.listdir(folder):
        if name != "config.json":
            shutil.copy(os.path.join(folder, name), copy / name)
    config = json.load(open(os.path.join(folder, "config.json")))
    config["num_hidden_layers"] = count
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    "count, fragment",
    [
        (1, "holds tensors of layer 1 (2 layers in all)"),
        (4, "no tensors for layer 2, 3 of the 4"),
        (2**40, "no tensors for layer 2, 3, 4 ... of the 1099511627776"),
        (2**62, "no tensors for layer 2, 3, 4 ... of the 4611686018427387904"),
    ],
)
def test_layer_count_disagreeing_with_the_tensors(two_layers, tmp_path, count, fragment):
    model = _with_layer_count(two_layers, tmp_path, count)
    out = tmp_path / "out"
    for args in (["plan", "-i", str(model), "-edm", "2"], ["up", "-i", str(model), "-o", str(out), "-edm", "2", "-q"]):
        result = subprocess.run(
            [sys.executable, "-m", "tensorscale.cli.main", *args],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=_limit_memory,
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stderr[-2000:]
        assert len(lines) == 1 and fragment in lines[0], result.stderr[-2000:]
    assert not out.exists()
