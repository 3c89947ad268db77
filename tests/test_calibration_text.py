"""Calibration text from several files: each gives an equal share of the windows, interleaved, so that every
kind of text is in the refit and in the windows held back for the damage estimate (the last eighth)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fixtures import build_checkpoint

from tensorscale.errors import TensorscaleError
from tensorscale.folding.calibration import calibration_ids


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from test_inference import save_tokenizer

    folder = build_checkpoint(tmp_path_factory.mktemp("cal") / "m", "llama", tie_word_embeddings=False)
    save_tokenizer(folder)
    return folder


def _text(word, count):
    return " ".join([word] * count)


def _ids_of(model, word):
    return int(calibration_ids(model, model, _text(word, 300), 256)[0, 0])


def test_one_text_gives_its_first_tokens_in_whole_windows(model):
    ids = calibration_ids(model, model, _text("paris", 1000), 600, sequence=256)
    assert ids.shape == (2, 256)


def test_several_texts_give_equal_interleaved_shares(model):
    paris, berlin = _ids_of(model, "paris"), _ids_of(model, "berlin")
    ids = calibration_ids(model, model, [_text("paris", 5000), _text("berlin", 5000)], 8 * 256)
    assert ids.shape == (8, 256)
    assert [int(row[0]) for row in ids] == [paris, berlin] * 4  # the held-out tail holds both
    assert all(len(set(row.tolist())) == 1 for row in ids)  # no window mixes the two


def test_a_short_text_gives_what_it_has_and_the_others_fill_in(model):
    paris, berlin = _ids_of(model, "paris"), _ids_of(model, "berlin")
    ids = calibration_ids(model, model, [_text("paris", 300), _text("berlin", 5000)], 6 * 256)
    firsts = [int(row[0]) for row in ids]
    assert len(firsts) == 6 and firsts.count(paris) == 1 and firsts.count(berlin) == 5


def test_texts_too_short_for_one_window_are_one_line(model):
    with pytest.raises(TensorscaleError, match="fewer than one window"):
        calibration_ids(model, model, [_text("paris", 10), _text("berlin", 10)], 512)


def test_down_takes_several_calibration_files(model, tmp_path):
    from test_inference import SENTENCES

    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text(" ".join(SENTENCES[:2] * 300))
    second.write_text(" ".join(SENTENCES[2:] * 300))
    result = subprocess.run(
        [sys.executable, "-m", "tensorscale.cli.main", "down", "-i", model, "-o", tmp_path / "out"]
        + ["--intermediate-size", "32", "--calibration", first, "--calibration", second]
        + ["--calibration-tokens", "1024", "--json", "-q"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["calibration"]["source"] == "file"
