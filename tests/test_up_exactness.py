"""`up` is function-preserving: stock transformers loads the output with no key problems and its logits
equal the source's, for every shipped architecture, on stress-initialised tiny checkpoints."""

from __future__ import annotations

import pytest
import torch
from fixtures import TINY, build_checkpoint, read_config, relative_logit_error
from safetensors import safe_open

from tensorscale.convert import run_up
from tensorscale.planning.plan import UpOptions

TOLERANCE = 1e-5


def up(source, output, n, m, **options):
    return run_up(str(source), str(output), UpOptions(n, m, **options), show_progress=False)


@pytest.fixture(scope="module", params=sorted(TINY))
def model_type(request):
    return request.param


@pytest.fixture(scope="module")
def untied(model_type, tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp(f"{model_type}-untied"), model_type, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tied(model_type, tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp(f"{model_type}-tied"), model_type, tie_word_embeddings=True)


@pytest.mark.parametrize("n,m", [(1, 1), (2, 3), (3, 2)])
def test_untied(untied, tmp_path, n, m):
    up(untied, tmp_path / "out", n, m)
    assert relative_logit_error(untied, tmp_path / "out") <= TOLERANCE


@pytest.mark.parametrize("n,m", [(2, 2), (3, 1)])
def test_tied_keeps_tie(tied, tmp_path, n, m):
    up(tied, tmp_path / "out", n, m)
    assert read_config(tmp_path / "out")["tie_word_embeddings"] is True
    assert relative_logit_error(tied, tmp_path / "out") <= TOLERANCE


def test_tied_untie(tied, tmp_path):
    up(tied, tmp_path / "out", 2, 2, untie_embeddings=True)
    config = read_config(tmp_path / "out")
    assert config["tie_word_embeddings"] is False
    assert relative_logit_error(tied, tmp_path / "out") <= TOLERANCE


def _tensors(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def test_noise_changes_weights_not_function(untied, tmp_path):
    up(untied, tmp_path / "plain", 2, 2)
    up(untied, tmp_path / "noisy", 2, 2, snr_db=20.0, seed=7)
    up(untied, tmp_path / "again", 2, 2, snr_db=20.0, seed=7)
    plain, noisy, again = _tensors(tmp_path / "plain"), _tensors(tmp_path / "noisy"), _tensors(tmp_path / "again")
    changed = [name for name in plain if not torch.equal(plain[name], noisy[name])]
    assert changed, "noise changed no weight"
    assert all(torch.equal(noisy[name], again[name]) for name in noisy), "the same seed must give the same bytes"
    assert relative_logit_error(untied, tmp_path / "noisy") <= TOLERANCE
