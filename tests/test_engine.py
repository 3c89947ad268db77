"""Engine properties: row-chunked streaming gives the same bytes as whole tensors, shards are independent,
and the input is never modified."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace

import pytest
from fixtures import build_checkpoint, relative_logit_error

from tensorscale.convert import plan_conversion, run_up
from tensorscale.planning.plan import UpOptions
from tensorscale.reading.tensor_reader import ShardReader
from tensorscale.writing import execute
from tensorscale.writing.execute import write_shard


def digest_folder(folder):
    return {
        name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(folder))
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("engine") / "src", "llama", tie_word_embeddings=False)


def test_tiny_chunks_give_identical_bytes(source, tmp_path, monkeypatch):
    run_up(source, str(tmp_path / "whole"), UpOptions(3, 2), show_progress=False)
    monkeypatch.setattr(execute, "CHUNK_BYTES", 64)  # a handful of rows per chunk
    run_up(source, str(tmp_path / "chunked"), UpOptions(3, 2), show_progress=False)
    assert digest_folder(tmp_path / "whole") == digest_folder(tmp_path / "chunked")


def test_tiny_chunks_with_noise_stay_exact(source, tmp_path, monkeypatch):
    monkeypatch.setattr(execute, "CHUNK_BYTES", 64)
    run_up(source, str(tmp_path / "out"), UpOptions(2, 2, snr_db=10.0, seed=3), show_progress=False)
    assert relative_logit_error(source, tmp_path / "out") <= 1e-5


def test_each_shard_can_be_written_alone(source, tmp_path):
    options = UpOptions(2, 2, max_shard_size=30_000)
    run_up(source, str(tmp_path / "full"), options, show_progress=False)
    plan = plan_conversion(source, options)
    # execute_plan puts the provenance into every shard's header; a shard written alone carries the same
    from tensorscale.writing.model_card import card_facts, safetensors_metadata

    plan = replace(plan, metadata=safetensors_metadata(card_facts(plan, None)))
    assert len(plan.shards) > 2
    last = plan.shards[-1]
    with ShardReader() as reader:
        write_shard(plan, last, str(tmp_path / "alone.safetensors"), reader)
    alone = open(tmp_path / "alone.safetensors", "rb").read()
    assert alone == open(tmp_path / "full" / last.filename, "rb").read()


def test_input_untouched(source, tmp_path):
    before = digest_folder(source)
    stats = {name: os.stat(os.path.join(source, name)).st_mtime_ns for name in os.listdir(source)}
    run_up(source, str(tmp_path / "out"), UpOptions(2, 3, snr_db=30.0), show_progress=False)
    assert digest_folder(source) == before
    assert {name: os.stat(os.path.join(source, name)).st_mtime_ns for name in os.listdir(source)} == stats


@pytest.mark.parametrize("skip_bytes,iov_max", [(0, 1024), (64, 3), (2**16, 1024)])
def test_reading_a_list_of_rows_gives_those_rows(tmp_path, monkeypatch, skip_bytes, iov_max):
    """Runs of rows, gaps read past or seeked over, and spans cut by the iovec limit all land in place."""
    import torch
    from safetensors.torch import save_file

    from tensorscale.reading import tensor_reader
    from tensorscale.reading.safetensors_header import read_header

    monkeypatch.setattr(tensor_reader, "SKIP_BYTES", skip_bytes)
    monkeypatch.setattr(tensor_reader, "IOV_MAX", iov_max)
    generator = torch.Generator().manual_seed(skip_bytes + iov_max)
    weights = {
        "a": torch.randn(3, 101, 4, generator=generator).to(torch.bfloat16),
        "w": torch.randn(200, 6, generator=generator),
    }
    save_file(weights, str(tmp_path / "t.safetensors"))
    info = read_header(str(tmp_path / "t.safetensors")).tensors["w"]
    with ShardReader() as reader:
        for rows in (
            [],
            [0],
            [199],
            list(range(200)),
            [0, 1, 2, 5, 6, 40, 41, 199],
            sorted(torch.randperm(200, generator=generator)[:70].tolist()),
        ):
            got = reader.read_row_list(info, rows)
            assert got.shape == (len(rows), 6)
            assert torch.equal(got, weights["w"][rows])
