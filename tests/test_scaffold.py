"""`tensorscale rules new`: a starting rules file from config.json and safetensors headers.

Used unchanged, the scaffold of a plain Llama-like model must give an exact `up`; for every tiny
architecture it must parse, match every tensor, and plan; the guesses it cannot settle (Conv1D layout, fused
part order, (1+w) norms, config fields that may follow the hidden size) must carry `# DECIDE:` comments.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner
from fixtures import TINY, build_checkpoint, read_config, relative_logit_error, run_cli_in_fresh_process

from tensorscale.cli.main import cli
from tensorscale.convert import plan_conversion, run_up
from tensorscale.planning.plan import UpOptions
from tensorscale.planning.rules_check import check_rules
from tensorscale.reading.source import open_source
from tensorscale.rulebook.scaffold import count_decisions, scaffold_rules
from tensorscale.rulebook.schema import load_rules_text

TOLERANCE = 1e-5
LLAMA_LIKE = ["llama", "mistral", "qwen2"]
# Exact with the scaffold used unchanged. The other four (gpt_neox: per-head interleaved qkv; gemma, gemma2,
# gemma3_text: (1+w) norms and a scaled embedding) are not, and their scaffolds say so in DECIDE comments.
EXACT_UNCHANGED = LLAMA_LIKE + ["qwen3", "smollm3", "olmo2", "phi", "stablelm", "phi3", "gpt2", "opt"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One tiny re-randomised checkpoint per architecture, built on first use."""
    root = tmp_path_factory.mktemp("scaffold")
    built = {}

    def get(model_type, **overrides):
        key = (model_type, tuple(sorted(overrides.items())))
        if key not in built:
            suffix = "-".join(f"{k}-{v}" for k, v in sorted(overrides.items()))
            built[key] = build_checkpoint(
                root / f"{model_type}{'-' + suffix if suffix else ''}", model_type, **overrides
            )
        return built[key]

    return get


def scaffold_file(folder, path):
    """`rules new` through the CLI: the YAML is the whole of stdout."""
    result = CliRunner().invoke(cli, ["rules", "new", "-i", folder], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(result.stdout)
    return result.stdout


def decisions_by_rule(text):
    """The DECIDE comments above each `- match:` line, keyed by the regex (comments elsewhere under None)."""
    found, pending = {}, []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# DECIDE:"):
            pending.append(stripped[len("# DECIDE:") :].strip())
        elif stripped.startswith("#   ") and pending:
            pending[-1] += " " + stripped[1:].strip()
        elif stripped.startswith("- match:"):
            regex = re.match(r"- match: '(.*?)'", stripped).group(1)
            found.setdefault(regex, []).extend(pending)
            pending = []
        elif stripped and not stripped.startswith("#"):
            if pending:
                found.setdefault(None, []).extend(pending)
            pending = []
    return found


@pytest.mark.parametrize("model_type", EXACT_UNCHANGED)
def test_scaffold_is_exact_unchanged(checkpoints, tmp_path, model_type):
    source = checkpoints(model_type)
    text = scaffold_file(source, tmp_path / "rules.yaml")
    run_up(source, str(tmp_path / "out"), UpOptions(2, 2), rules_path=str(tmp_path / "rules.yaml"), show_progress=False)
    before, after = read_config(source), read_config(tmp_path / "out")
    hidden = "n_embd" if model_type == "gpt2" else "hidden_size"
    assert after[hidden] == 2 * before[hidden]
    assert relative_logit_error(source, tmp_path / "out") < TOLERANCE
    if model_type in LLAMA_LIKE:
        assert (after["intermediate_size"], after["num_attention_heads"]) == (96, 8)
        # Every tensor rule's roles were settled by names and shapes: no DECIDE on them.
        assert not [regex for regex, notes in decisions_by_rule(text).items() if regex is not None and notes]


def test_tied_scaffold_keeps_or_unties_exactly(checkpoints, tmp_path):
    source = checkpoints("llama", tie_word_embeddings=True)
    scaffold_file(source, tmp_path / "rules.yaml")
    for untie in (False, True):
        out = tmp_path / f"out-{untie}"
        run_up(
            source,
            str(out),
            UpOptions(2, 2, untie_embeddings=untie),
            rules_path=str(tmp_path / "rules.yaml"),
            show_progress=False,
        )
        assert read_config(out)["tie_word_embeddings"] is (not untie)
        assert relative_logit_error(source, out) < TOLERANCE


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_every_architecture_parses_checks_and_plans(checkpoints, tmp_path, model_type):
    source = checkpoints(model_type)
    text = scaffold_file(source, tmp_path / "rules.yaml")
    rule_set = load_rules_text(text, "scaffold")
    assert rule_set.detect_model_types == [model_type]
    report = check_rules(open_source(source, headers_only=True), str(tmp_path / "rules.yaml"))
    assert report["error"] is None and report["unmatched_tensors"] == [], report
    # The roles fit the shapes: a headers-only plan of up ×2 succeeds (exact or not is what DECIDE is for).
    plan = plan_conversion(source, UpOptions(2, 2), str(tmp_path / "rules.yaml"), headers_only=True)
    assert plan.tensors


def test_decide_comments_where_the_guess_is_hard(checkpoints, tmp_path):
    texts = {
        t: scaffold_file(checkpoints(t), tmp_path / f"{t}.yaml") for t in ("gpt2", "phi3", "opt", "gpt_neox", "gemma")
    }
    counts = {t: count_decisions(text) for t, text in texts.items()}
    assert counts["gpt2"] > counts["phi3"] >= 2 and counts["opt"] >= 2, counts

    gpt2 = decisions_by_rule(texts["gpt2"])
    for module in (r"attn\.c_attn", r"attn\.c_proj", r"mlp\.c_fc", r"mlp\.c_proj"):
        notes = gpt2[rf"transformer\.h\.(?P<layer>\d+)\.{module}\.weight"]
        assert any("[in, out]" in note for note in notes), (module, notes)
    assert any("fused" in note for note in gpt2[r"transformer\.h\.(?P<layer>\d+)\.attn\.c_attn\.weight"])
    assert "# DECIDE: n_inner is null" in texts["gpt2"]
    assert "ffn: {size: ffn_size" in texts["gpt2"] and 'n_inner: "ffn_size * m"' in texts["gpt2"]

    phi3 = decisions_by_rule(texts["phi3"])
    qkv = phi3[r"model\.layers\.(?P<layer>\d+)\.self_attn\.qkv_proj\.weight"]
    gate_up = phi3[r"model\.layers\.(?P<layer>\d+)\.mlp\.gate_up_proj\.weight"]
    assert any("[heads, kv_heads, kv_heads]" in note for note in qkv)
    assert any("[ffn, ffn]" in note for note in gate_up)

    opt = texts["opt"]
    assert re.search(r"# DECIDE: word_embed_proj_dim = 32 equals the hidden size", opt)
    assert re.search(r"# DECIDE: .*do_layer_norm_before=true", opt)
    assert any(
        "GPT-NeoX" in note
        for note in decisions_by_rule(texts["gpt_neox"])[
            r"gpt_neox\.layers\.(?P<layer>\d+)\.attention\.query_key_value\.weight"
        ]
    )
    assert "rms_one_plus" in texts["gemma"] and "# DECIDE: Gemma-like" in texts["gemma"]
    # Post-LN OPT, tied: no norm sits before the head, so dividing one by n is left to the user.
    post_ln = scaffold_file(checkpoints("opt", do_layer_norm_before=False), tmp_path / "post-ln.yaml")
    assert any("no top-level norm before the head" in note for note in decisions_by_rule(post_ln)[r"lm_head\.weight"])


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_depth_section_inserts_identity_layers(checkpoints, tmp_path, model_type):
    source = checkpoints(model_type)
    text = scaffold_file(source, tmp_path / "rules.yaml")
    if load_rules_text(text).__dict__.get("depth") is None:
        pytest.skip("this version of the rules language has no depth section")
    run_up(
        source,
        str(tmp_path / "out"),
        UpOptions(2, 1, add_layers=2),
        rules_path=str(tmp_path / "rules.yaml"),
        show_progress=False,
    )
    layers = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
    assert read_config(tmp_path / "out")[layers] == read_config(source)[layers] + 2
    assert relative_logit_error(source, tmp_path / "out") < TOLERANCE


def test_guesses_on_synthetic_headers():
    """Unknown tensors, squares without a name hint, 3-D tensors and a missing FFN field each get a DECIDE."""
    config = {
        "model_type": "toy",
        "architectures": ["ToyForCausalLM"],
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": 96,
    }
    tensors = {
        "model.embed_tokens.weight": ((96, 32), "F32"),
        "model.norm.weight": ((32,), "F32"),
        "lm_head.weight": ((96, 32), "F32"),
    }
    for layer in range(2):
        prefix = f"model.layers.{layer}"
        tensors.update(
            {
                f"{prefix}.mixer.weight": ((32, 32), "F32"),  # square, says nothing
                f"{prefix}.blob.weight": ((2, 3, 4), "F32"),  # 3-D
                f"{prefix}.mlp.fc1.weight": ((80, 32), "F32"),  # FFN 80, no config field
                f"{prefix}.mlp.fc2.weight": ((32, 80), "F32"),
                f"{prefix}.ln.weight": ((32,), "F32"),
                f"{prefix}.counter": ((1,), "I64"),
            }
        )
    text = scaffold_rules(config, tensors, source="toy")
    rule_set = load_rules_text(text, "toy")
    by_rule = decisions_by_rule(text)
    assert by_rule[r"model\.layers\.(?P<layer>\d+)\.mixer\.weight"]
    assert by_rule[r"model\.layers\.(?P<layer>\d+)\.blob\.weight"]
    assert by_rule[r"model\.layers\.(?P<layer>\d+)\.counter"]
    assert "no FFN-size field" in text and 'ffn_size: "80"' in text
    roles = {rule.pattern: rule.transform.axes for rule in rule_set.tensors}
    assert roles[r"model\.layers\.(?P<layer>\d+)\.mlp\.fc1\.weight"] == ["ffn", "hidden.in"]
    assert roles[r"model\.layers\.(?P<layer>\d+)\.blob\.weight"] == ["-", "-", "-"]
    assert roles[r"model\.layers\.(?P<layer>\d+)\.ln\.weight"] == ["hidden.norm"]
    assert not by_rule.get(r"model\.layers\.(?P<layer>\d+)\.mlp\.fc1\.weight")


def test_cli_stdout_only_and_no_heavy_imports(checkpoints, tmp_path):
    source = checkpoints("llama")
    result = run_cli_in_fresh_process(
        ["rules", "new", "-i", source, "--name", "mymodel"], forbidden=("transformers", "torch")
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert load_rules_text(result.stdout).name == "mymodel"


@pytest.mark.parametrize("case", ["missing", "no_config", "no_weights"])
def test_bad_input_is_one_line_and_exit_2(checkpoints, tmp_path, case):
    folder = tmp_path / case
    if case != "missing":
        folder.mkdir()
    if case == "no_weights":
        (folder / "config.json").write_text(open(os.path.join(checkpoints("llama"), "config.json")).read())
    result = subprocess.run(
        [sys.executable, "-m", "tensorscale.cli.main", "rules", "new", "-i", str(folder)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("tensorscale: error:"), (
        result.stderr
    )
