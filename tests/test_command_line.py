"""The command line people expect: MODEL as a positional argument or -i, `python -m tensorscale`, output
names that say what was done, progress that suits a log, -v, stdout for results only, and help that reads."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from fixtures import build_checkpoint, read_config

from tensorscale.cli.main import cli

# conftest silences tqdm for the whole suite; these tests look at progress, so their processes do not
ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")},
    "HF_HUB_OFFLINE": "1",
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("cl") / "tiny-llama", "llama", tie_word_embeddings=False)


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("cl-bf16") / "tiny-bf16", "llama", dtype=torch.bfloat16, seed=5)


def run(*args, cwd=None):
    old = os.getcwd()
    if cwd:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)


def process(*args, cwd=None, env=None, module="tensorscale"):
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env or ENV
    )


# ---------------------------------------------------------------- the model: MODEL or -i MODEL


def test_model_as_positional_argument_equals_input_option(llama, tmp_path):
    assert json.loads(run("desc", llama, "--json").stdout) == json.loads(run("desc", "-i", llama, "--json").stdout)
    positional = json.loads(run("plan", llama, "-edm", "2", "--json", "-o", tmp_path / "x").stdout)
    option = json.loads(run("plan", "--input", llama, "-edm", "2", "--json", "-o", tmp_path / "x").stdout)
    assert positional == option
    assert run("rules", "check", llama).exit_code == 0
    assert run("rules", "new", llama).stdout == run("rules", "new", "-i", llama).stdout
    result = run("up", llama, "-o", tmp_path / "up", "-edm", "2", "-q")  # options after MODEL too
    assert result.exit_code == 0, result.output
    assert read_config(tmp_path / "up")["hidden_size"] == 2 * read_config(llama)["hidden_size"]
    result = run("down", tmp_path / "up", "-o", tmp_path / "down", "-edd", "2", "-q")
    assert result.exit_code == 0, result.output
    assert read_config(tmp_path / "down")["hidden_size"] == read_config(llama)["hidden_size"]


@pytest.mark.parametrize(
    "command",
    [
        ["desc"],
        ["plan", "-edm", "2"],
        ["up", "-edm", "2"],
        ["down", "-edd", "2"],
        ["rules", "check"],
        ["rules", "new"],
        ["gen"],
    ],
)
def test_model_given_twice_or_not_at_all_is_one_line(llama, tmp_path, command):
    twice = (
        run(*command, llama, "-i", llama, "-o", tmp_path / "out")
        if command[0] in ("up", "down")
        else run(*command, llama, "-i", llama)
    )
    assert twice.exit_code == 2 and twice.stdout == ""
    assert "the model is given twice" in twice.stderr and len(twice.stderr.strip().splitlines()) == 1
    missing = run(*command)
    assert missing.exit_code == 2 and "which model?" in missing.stderr and "MODEL" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_python_dash_m_tensorscale(llama):
    result = process("desc", llama)
    assert result.returncode == 0, result.stderr
    assert "LlamaForCausalLM" in result.stdout
    assert process("--version").stdout.startswith("tensorscale, version ")


# ---------------------------------------------------------------- up refuses to do nothing; output names


def test_up_without_a_size_refuses_nothing_to_change(llama, tmp_path):
    config = read_config(llama)
    for extra in ([], ["--hidden-size", config["hidden_size"]], ["--dtype", "float32"], ["--snr-db", "20"]):
        result = run("up", llama, "-o", tmp_path / "out", *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert result.stderr.startswith("tensorscale: error: nothing to change") and "-edm" in result.stderr
        assert not (tmp_path / "out").exists()
    assert run("up", llama, "-o", tmp_path / "out", "--dtype", "bfloat16", "-q").exit_code == 0  # a real change


def test_default_output_of_dot_is_named_after_the_folder(llama, tmp_path):
    model = tmp_path / "my-model"
    shutil.copytree(llama, model)
    planned = json.loads(run("plan", ".", "-edm", "2", "--json", cwd=model).stdout)
    assert os.path.basename(planned["output"]).startswith("my-model-")
    # the current folder is the model itself: the output goes beside it, not inside it
    result = run("up", "-i", ".", "-edm", "2", "--json", cwd=model)
    assert result.exit_code == 0, result.output
    output = json.loads(result.stdout)["output"]
    assert os.path.dirname(output) == str(tmp_path) and os.path.basename(output) == os.path.basename(planned["output"])
    trailing = json.loads(run("plan", f"{model}{os.sep}", "-edm", "2", "--json", cwd=tmp_path).stdout)
    assert os.path.basename(trailing["output"]).startswith("my-model-")


def test_default_outputs_of_add_and_duplicate_layers_differ(llama, tmp_path):
    def output(*args):
        return os.path.basename(json.loads(run("plan", llama, "--json", *args, cwd=tmp_path).stdout)["output"])

    added, duplicated = output("--add-layers", "2"), output("--duplicate-layers", "0:2")
    assert added != duplicated
    assert added.endswith("-add2") and duplicated.endswith("-dup0-2")
    assert output("-edm", "2") != output("-edm", "2", "--strategy", "pad")
    assert output("-edm", "2").startswith("tiny-llama-") and "-add" not in output("-edm", "2")


# ---------------------------------------------------------------- progress, -v, stdout for results only


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(llama, tmp_path):
    result = process("up", llama, "-o", tmp_path / "out", "-edm", "2")
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("tensorscale: writing")]
    assert lines and lines[-1].startswith("tensorscale: writing 100%"), result.stderr
    assert result.stdout.startswith("wrote ") and len(result.stdout.splitlines()) == 1


def test_down_shows_the_analysis_progress_and_quiet_or_json_silence_it(llama, tmp_path):
    """down reads every weight before it writes (the analysis): minutes on a large model. Before: no progress
    at all until the writing started."""
    unset = {"TQDM_DISABLE": None, "HF_HUB_DISABLE_PROGRESS_BARS": None}

    def down(out, *flags):
        result = CliRunner().invoke(
            cli, ["down", llama, "-o", str(out), "-edd", "2", "-upd", "2", "--method", "fold", *flags], env=unset
        )
        assert result.exit_code == 0, result.output
        return result

    shown = down(tmp_path / "a")
    lines = [line for line in shown.stderr.splitlines() if line.startswith("tensorscale: analysing")]
    assert lines and lines[-1].startswith("tensorscale: analysing 100%") and lines[-1].endswith(", 2/2 layers)"), (
        shown.stderr
    )
    assert shown.stderr.index("tensorscale: analysing") < shown.stderr.index("tensorscale: writing")
    for flag in ("-q", "--json"):
        silent = down(tmp_path / flag.strip("-"), flag)
        assert silent.stderr == "", silent.stderr
    assert json.loads(silent.stdout)["output"] == str(tmp_path / "json")


@pytest.mark.parametrize("variable", ["TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"])
def test_progress_variables_silence_progress(llama, tmp_path, variable):
    unset = {"TQDM_DISABLE": None, "HF_HUB_DISABLE_PROGRESS_BARS": None}
    shown = CliRunner().invoke(cli, ["up", llama, "-o", str(tmp_path / "a"), "-edm", "2"], env=unset)
    assert shown.exit_code == 0 and "tensorscale: writing 100%" in shown.stderr, shown.output
    silenced = CliRunner().invoke(
        cli, ["up", llama, "-o", str(tmp_path / "b"), "-edm", "2"], env={**unset, variable: "1"}
    )
    assert silenced.exit_code == 0 and silenced.stderr == "", silenced.output


def test_plain_progress_lines_every_ten_percent_not_too_often():
    from tensorscale.progress import Progress

    now = [0.0]
    stream = io.StringIO()
    progress = Progress(1000, "writing", items=4, stream=stream, clock=lambda: now[0])
    for _ in range(100):
        now[0] += 1.0
        progress.update(10, 0)
    progress.update(0, 4)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == [
        "10%",
        "20%",
        "30%",
        "40%",
        "50%",
        "60%",
        "70%",
        "80%",
        "90%",
        "100%",
    ]
    assert lines[-1].endswith("4/4 tensors)")
    quick = io.StringIO()
    progress = Progress(1000, "writing", stream=quick, clock=lambda: 0.0)  # all at once: the first line, the end
    for _ in range(100):
        progress.update(10, 0)
    progress.close()
    assert len(quick.getvalue().splitlines()) == 2


def test_progress_bar_on_a_terminal():
    from tensorscale.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = Progress(100, "writing", stream=stream)
    assert progress.bar is not None
    progress.update(100, 0)
    progress.close()
    assert "\r" in stream.getvalue()


def test_verbose_logs_to_stderr_before_or_after_the_command(llama, tmp_path):
    for args in (["-v", "up"], ["up", "-v"]):
        out = tmp_path / "-".join(args).lstrip("-")
        result = run(*args, llama, "-o", out, "-edm", "2", "-q")
        assert result.exit_code == 0, result.output
        assert "tensorscale: opened " in result.stderr and "tensorscale: rules llama" in result.stderr
        assert "tensorscale: shard model.safetensors" in result.stderr and "into place" in result.stderr
        assert "opened" not in result.stdout
    quiet = run("up", llama, "-o", tmp_path / "quiet", "-edm", "2", "-q")  # -v does not outlive its command
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_stdout_carries_only_results(bf16, tmp_path):
    """The bf16 note goes to stderr; stdout is the summary line, or JSON that parses whole."""
    text = run("up", bf16, "-o", tmp_path / "a", "--hidden-size", "48")
    assert text.exit_code == 0, text.output
    assert text.stdout.startswith("wrote ") and len(text.stdout.splitlines()) == 1
    assert "note: not exact in bfloat16" in text.stderr and "note" not in text.stdout
    as_json = process("up", bf16, "-o", tmp_path / "b", "--hidden-size", "48", "--json")  # a real pipe, once
    summary = json.loads(as_json.stdout)
    assert any("not exact in bfloat16" in note for note in summary["notes"])
    assert "not exact in bfloat16" in as_json.stderr
    for command in (["desc", bf16, "--json"], ["plan", bf16, "-edm", "2", "--json"], ["rules", "list", "--json"]):
        result = run(*command)
        assert result.exit_code == 0 and json.loads(result.stdout), result.output


# ---------------------------------------------------------------- help text


def test_top_level_help_lists_each_command_once():
    text = run("--help").stdout
    before, commands = text.split("Commands:")
    listed = [line.split()[0] for line in commands.strip().splitlines()]
    assert sorted(listed) == sorted(cli.commands) and len(listed) == len(set(listed)) and "batch" in listed
    assert not [name for name in cli.commands if f"  {name} " in before]  # no second list in the summary
    assert "..." not in commands  # no summary cut short


def test_help_texts():
    assert "down" in run("plan", "--help").stdout.split("Options:")[0]
    assert "after END-1" in " ".join(run("up", "--help").stdout.split())
    from tensorscale.cli.down_command import down

    undocumented = [
        param.name for param in down.params if isinstance(param, __import__("click").Option) and not param.help
    ]
    assert undocumented == []


def test_rules_list_has_a_header_and_json():
    text = run("rules", "list").stdout.splitlines()
    assert text[0].split() == ["rules", "model_type", "description"] and set(text[1]) <= {"-", " "}
    rows = json.loads(run("rules", "list", "--json").stdout)
    llama = next(row for row in rows if row["name"] == "llama")
    assert "llama" in llama["model_types"] and llama["description"]


def test_unknown_architecture_points_to_rules_new(llama, tmp_path):
    source = tmp_path / "new-arch"
    shutil.copytree(llama, source)
    config = read_config(source)
    config["model_type"], config["architectures"] = "brandnew", ["BrandNewForCausalLM"]
    (source / "config.json").write_text(json.dumps(config))
    result = run("plan", source, "-edm", "2")
    assert result.exit_code == 2 and "tensorscale rules new MODEL" in result.stderr


def test_bash_completion_script():
    result = process(env={**ENV, "_TENSORSCALE_COMPLETE": "bash_source"})
    assert result.returncode == 0 and "_tensorscale_completion" in result.stdout
    words = subprocess.run(
        [sys.executable, "-m", "tensorscale"],
        capture_output=True,
        text=True,
        env={**ENV, "_TENSORSCALE_COMPLETE": "bash_complete", "COMP_WORDS": "tensorscale ru", "COMP_CWORD": "1"},
    )
    assert "rules" in words.stdout


def test_hub_bars_go_off_in_logs_without_silencing_ours(monkeypatch):
    import tensorscale.progress as progress

    monkeypatch.setattr(progress, "_SET_HERE", {})
    for name in progress.SILENCING_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    progress.quiet_hub_bars_in_logs(Terminal())
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ  # a terminal keeps the hub's bars
    progress.quiet_hub_bars_in_logs(io.StringIO())
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # read by huggingface_hub when imported
    assert not progress.silenced_by_environment()  # our own plain lines stay on
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "yes")  # the user's choice silences both
    assert progress.silenced_by_environment()
    monkeypatch.setattr(progress, "_SET_HERE", {})
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    progress.quiet_hub_bars_in_logs(io.StringIO())
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"  # never overrides what the user set
