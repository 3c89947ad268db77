"""The growth study's machinery (benchmarks/growth.py) at a toy budget: real `tensorscale up` on the real
reference model, function preserved, equal sizes, a stage interrupted and resumed ends exactly where an
uninterrupted run ends, and growth.json has the schema other scripts read N from.

It trains the 8.1M expansions for a few steps of 2 x 32 tokens, so it takes seconds, not hours."""

import importlib.util
import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

pytest.importorskip("transformers")


def load_growth():
    spec = importlib.util.spec_from_file_location("growth_study", os.path.join(REPO, "benchmarks", "growth.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["growth_study"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    """A small real corpus in the study's cache format: the docstrings of the stdlib's json package,
    tokenised with the reference's tokenizer (the whole stdlib takes a minute to parse; the machinery
    under test is the same)."""
    import sysconfig

    import torch
    from transformers import AutoTokenizer

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import corpus

    docs = corpus.stdlib_documents(os.path.join(sysconfig.get_paths()["stdlib"], "json"))
    tok = AutoTokenizer.from_pretrained(os.path.join(REPO, "examples", "pydoc-llama"))
    stream = corpus.encode_stream(tok, docs)
    cut = len(stream) * 4 // 5
    path = tmp_path_factory.mktemp("growth-data") / "data.pt"
    torch.save({"train": stream[:cut].clone(), "val": stream[cut:].clone()}, path)
    return path


def toy(work, results, *extra):
    return [
        "--work",
        str(work),
        "--results",
        str(results),
        "--s1-steps",
        "4",
        "--batch",
        "2",
        "--seq-len",
        "32",
        "--eval-every",
        "2",
        "--eval-windows",
        "2",
        "--threads",
        "1",
        *extra,
    ]


@pytest.mark.slow
def test_stage1_runs_resumes_and_reports(tmp_path, data_cache):
    growth = load_growth()
    work, results = tmp_path / "work", tmp_path / "results"
    work.mkdir()
    cache = data_cache
    os.link(cache, work / "data.pt")

    # Interrupted: every training stage stops after 2 steps of the call; call until nothing is left.
    for _ in range(20):
        growth.main(toy(work, results, "--stages", "s1", "--stop-after-steps", "2"))
        states = {
            n: growth.stage_state(growth.Study(growth.parse_args(toy(work, results))), n)
            for n in ("s1.expand", "s1.small", "s1.tabula", "s1.iso-snr", "s1.pad", "s1.iso")
        }
        if all(s == "done" for s in states.values()):
            break
    else:
        pytest.fail(f"stages never finished: {states}")

    out = json.loads((results / "growth.json").read_text())
    (scale,) = out["scales"]
    for key in ("small_params", "large_params", "budget_tokens", "crossing_tokens", "curves"):
        assert key in scale
    assert scale["budget_tokens"] == 4 * 2 * 32
    assert scale["large_params"] > 3 * scale["small_params"]
    assert set(scale["curves"]) == {"small", "tabula", "iso-snr", "iso", "pad"}
    for name, c in scale["curves"].items():
        assert c["done"] and c["tokens"][0] == 0 and c["tokens"][-1] == 256, name
        assert c["params"] == (scale["small_params"] if name == "small" else scale["large_params"])
    # Function preserved by the real CLI: every expansion starts at the small model's loss.
    small0 = scale["curves"]["small"]["val_loss"][0]
    for name in ("iso", "iso-snr", "pad"):
        assert scale["expansion"]["expansions"][name]["max_delta_logit"] < 1e-3
        assert scale["curves"][name]["val_loss"][0] == pytest.approx(small0, abs=1e-4)
        assert "tensorscale up" in scale["expansion"]["expansions"][name]["command"]
    assert scale["curves"]["tabula"]["val_loss"][0] > small0 + 1  # random init starts near ln(vocab)
    # FLOPs: pretrained recipes carry the small model's pretraining; tabula rasa starts at 0.
    assert scale["curves"]["tabula"]["flops_total"][0] == 0
    assert scale["curves"]["iso"]["flops_total"][0] == pytest.approx(scale["curves"]["small"]["flops_total"][0])
    assert (results / "growth_s1_tokens.png").exists() and (results / "growth_s1_flops.png").exists()

    # Resumed == uninterrupted, step for step.
    resumed = scale["curves"]["tabula"]["val_loss"]
    again = tmp_path / "again"
    again.mkdir()
    os.link(cache, again / "data.pt")
    growth.main(toy(again, tmp_path / "again-results", "--stages", "s1.expand,s1.tabula"))
    fresh = json.loads((tmp_path / "again-results" / "growth" / "s1.tabula.json").read_text())["val_loss"]
    assert fresh == pytest.approx(resumed, abs=1e-5)
    assert len(resumed) == 3  # steps 0, 2 and 4, each once, although the run was cut at step 2


@pytest.mark.slow
def test_down_as_initialisation_and_healing_stages(tmp_path, data_cache):
    """d.*: the trained large model is narrowed by the real `tensorscale down --method refit` to the small
    shape, trained on beside the same size from scratch; d.heal downs the real SmolLM2 and trains it on.
    Toy budgets: the machinery, not the numbers."""
    growth = load_growth()
    work, results = tmp_path / "work", tmp_path / "results"
    work.mkdir()
    os.link(data_cache, work / "data.pt")
    heal = [
        "--heal-steps",
        "2",
        "--heal-batch",
        "1",
        "--heal-eval-every",
        "1",
        "--heal-eval-tokens",
        "256",
        "--heal-calibration-tokens",
        "512",
    ]
    growth.main(toy(work, results, "--stages", "s1.expand,s1.tabula,d", *heal))
    out = json.loads((results / "growth.json").read_text())
    down = out["down_init"]["down"]
    assert "tensorscale down" in down["command"] and "--method refit" in down["command"]
    small = growth.load_model(str(work / "d" / "s1-down"))
    config = json.loads((work / "d" / "s1-down" / "config.json").read_text())
    assert {k: config[k] for k in growth.small_shape()} == growth.small_shape()
    assert down["params"] == growth.params_of(small) < down["large_params"] / 3
    curves = out["down_init"]["curves"]
    assert set(curves) == {"down-init", "scratch"} and all(c["done"] for c in curves.values())
    assert curves["down-init"]["params"] == curves["scratch"]["params"] == down["params"]
    assert curves["down-init"]["val_loss"][0] == pytest.approx(down["loss"], abs=1e-4)  # it starts from the down
    assert curves["down-init"]["flops_total"][0] == down["large_flops"] > 0 == curves["scratch"]["flops_total"][0]
    healing = out["healing"]
    assert healing["done"] and healing["steps"] == [0, 1, 2] and healing["params"] < 0.8 * healing["source_params"]
    for name, ratios in healing["ppl_ratio"].items():
        assert len(ratios) == 3 and ratios[0] > 1, name  # a 25% cut starts worse than the original
    if importlib.util.find_spec("matplotlib"):
        assert (results / "growth_down_init.png").exists() and (results / "growth_healing.png").exists()


def test_crossing_is_the_first_catch_up():
    growth = load_growth()
    x = [0, 10, 20, 30]
    assert growth.crossing(x, [9, 6, 4, 2], x, [5, 5, 5, 5]) == pytest.approx(15)
    assert growth.crossing(x, [9, 8, 7, 6], x, [5, 5, 5, 5]) is None


def stage_file(results, name, params, tokens, losses, flops_before=0.0, done=True):
    curve = {
        "stage": name,
        "params": params,
        "start_step": 0,
        "end_step": len(tokens) - 1,
        "tokens": tokens,
        "val_loss": losses,
        "flops_total": [flops_before + 6 * params * t for t in tokens],
        "lr": [0.0] * len(tokens),
        "done": done,
        "extra": {},
        "seconds": 1.0,
        "cpu_seconds": 1.0,
        "flops_before": flops_before,
        "steps": list(range(len(tokens))),
    }
    (results / "growth").mkdir(parents=True, exist_ok=True)
    (results / "growth" / f"{name}.json").write_text(json.dumps(curve))


def test_report_reads_n_from_the_stage_files(tmp_path):
    """growth.json's schema and N, from stage files whose crossing is known: tabula rasa comes down to
    Recipe 2's loss exactly halfway between its evaluations at 2048 and 4096 tokens."""
    growth = load_growth()
    results = tmp_path / "results"
    tokens = [0, 2048, 4096, 6144]
    stage_file(results, "s1.small", 100, tokens, [5.0, 4.9, 4.8, 4.7], flops_before=1e9)
    stage_file(results, "s1.iso-snr", 300, tokens, [5.0, 4.8, 4.6, 4.4], flops_before=1e9)
    stage_file(results, "s1.tabula", 300, tokens, [8.0, 5.0, 4.4, 4.0])
    (results / "growth" / "s1.expand.json").write_text(
        json.dumps({"stage": "s1.expand", "done": True, "expansions": {"iso": {"params": 300}}})
    )
    args = [
        "--work",
        str(tmp_path / "work"),
        "--results",
        str(results),
        "--s1-steps",
        "3",
        "--batch",
        "4",
        "--seq-len",
        "128",
    ]
    out = growth.main(args + ["--report"])
    (scale,) = out["scales"]
    assert (scale["small_params"], scale["large_params"], scale["budget_tokens"]) == (100, 300, 3 * 512)
    # tabula - iso-snr: +0.2 at 2048, -0.2 at 4096 -> N = 3072 tokens.
    assert scale["crossing_tokens"] == pytest.approx(3072)
    assert scale["curves"]["tabula"]["flops_total"][0] == 0
    assert not scale["complete"]  # pad and iso have not run
    # s1.tabula's curve is done, but d.s1.down reads its trained model, which this work folder lacks
    assert out["stages"]["s1.pad"] == "not started" and out["stages"]["s1.tabula"].startswith("outputs missing")
    (tmp_path / "work" / "s1.tabula" / "final").mkdir(parents=True)
    assert growth.main(args + ["--report"])["stages"]["s1.tabula"] == "done"
    on_disk = json.loads((results / "growth.json").read_text())
    assert on_disk["scales"][0]["crossing_tokens"] == pytest.approx(3072)
    # A curve that never comes down gives null, not a number.
    stage_file(results, "s1.tabula", 300, tokens, [8.0, 6.0, 5.5, 5.0])
    assert growth.main(args + ["--report"])["scales"][0]["crossing_tokens"] is None
