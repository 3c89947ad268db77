"""Up and down are separate option types and one frozen Plan: planning reads options and never changes them,
`plan up` / `plan down` say the direction (a mistake is one line), and the planning and cli modules hold no
import cycle (not even one through an import inside a function)."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest
from click.testing import CliRunner
from fixtures import build_checkpoint, read_config

from tensorscale.cli.main import cli
from tensorscale.convert import execute_plan, plan_conversion, plan_down
from tensorscale.errors import TensorscaleError
from tensorscale.planning.plan import DownOptions, UpOptions

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tensorscale"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(build_checkpoint(tmp_path_factory.mktemp("options") / "tiny-llama", "llama"))


@pytest.fixture(scope="module")
def wide(tmp_path_factory, llama):
    """A HyperCloned llama: down folds it back exactly."""
    out = tmp_path_factory.mktemp("options-wide") / "wide"
    result = CliRunner().invoke(cli, ["up", llama, "-o", str(out), "-edm", "2", "-upm", "2", "-q"])
    assert result.exit_code == 0, result.output
    return str(out)


# ---------------------------------------------------------------- validation: one line naming the option


@pytest.mark.parametrize(
    "options, words",
    [
        (UpOptions(0, 1), "--embed-dim-multiplier must be a whole number >= 1"),
        (UpOptions(1, True), "--up-proj-multiplier must be a whole number >= 1"),
        (UpOptions(targets={"hidden_size": 0}), "--hidden-size must be a whole number >= 1"),
        (UpOptions(targets={"width": 8}), "unknown target width"),
        (UpOptions(strategy="spread"), "--strategy must be clone or pad"),
        (UpOptions(add_layers=-1), "--add-layers must be a whole number >= 0"),
        (UpOptions(add_layers=10**6), "--add-layers 1,000,000 is more than"),
        (UpOptions(snr_db=float("nan")), "--snr-db must be a finite number"),
        (UpOptions(snr_db=-40.0), "--snr-db -40 is below -20 dB"),
        (UpOptions(dtype="int8"), "--dtype must be one of keep"),
        (UpOptions(max_shard_size=0), "--max-shard-size must be positive"),
        (DownOptions(embed_dim_divisor=0), "--embed-dim-divisor must be a whole number >= 1"),
        (DownOptions(up_proj_divisor=1.5), "--up-proj-divisor must be a whole number >= 1"),
        (DownOptions(embed_dim_divisor=2, targets={"hidden_size": 16}), "either divisors or target sizes, not both"),
        (DownOptions(targets={"num_key_value_heads": -1}), "--num-key-value-heads must be a whole number >= 1"),
        (DownOptions(dtype="int8"), "--dtype must be one of keep"),
        (DownOptions(max_shard_size=-5), "--max-shard-size must be positive"),
    ],
)
def test_invalid_options_are_one_line(options, words):
    with pytest.raises(TensorscaleError) as caught:
        options.validate()
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_each_direction_has_only_its_own_options():
    for field in ("snr_db", "untie_embeddings", "strategy", "add_layers", "insert_at", "duplicate_layers"):
        with pytest.raises(TypeError):
            DownOptions(**{field: None})
    with pytest.raises(TypeError):
        UpOptions(embed_dim_divisor=2)
    assert (UpOptions.mode, DownOptions.mode) == ("up", "down")
    # what outputs record has the same keys both ways; down records up's neutral values
    assert DownOptions(seed=4).recorded() == {**UpOptions(seed=4).recorded(), "mode": "down"}


# ---------------------------------------------------------------- options are read, never changed


def test_options_are_frozen_and_do_not_alias_the_callers_targets():
    asked = {"intermediate_size": 100}
    options = UpOptions(targets=asked)
    asked["hidden_size"] = 999
    assert options.targets == {"intermediate_size": 100}
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.seed = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        DownOptions().embed_dim_divisor = 2


def test_planning_never_changes_the_options_it_is_given(llama, wide):
    up = UpOptions(2, 2, snr_db=20.0, seed=3, targets={"intermediate_size": 300})
    before = dataclasses.asdict(up)
    plan = plan_conversion(llama, up, headers_only=True)
    assert plan.options is up and dataclasses.asdict(up) == before

    down = DownOptions(embed_dim_divisor=2, up_proj_divisor=2, seed=1)
    before = dataclasses.asdict(down)
    first = plan_down(wide, down)
    again = plan_down(wide, down)  # the same options plan the same again: nothing was left on them
    assert dataclasses.asdict(down) == before and first.options is down
    assert first.config == again.config and [t.name for t in first.tensors] == [t.name for t in again.tensors]
    assert first.down.method == "fold" and first.down.exact


# ---------------------------------------------------------------- one immutable Plan


def test_plan_is_immutable_and_writing_makes_a_new_one(llama, tmp_path):
    plan = plan_conversion(llama, UpOptions(2, 1))
    for name, value in (("options", UpOptions()), ("metadata", {}), ("down", None), ("tensors", [])):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(plan, name, value)
    result = execute_plan(plan, str(tmp_path / "out"), show_progress=False)
    assert plan.metadata is None  # the plan passed in is as it was
    assert result.plan is not plan and result.plan.metadata["tensorscale.operation"] == "up"
    assert plan.down is None


# ---------------------------------------------------------------- `plan up` / `plan down`


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_plan_up_and_plan_down_from_the_command_line(llama, wide, tmp_path):
    up = _invoke("plan", "up", llama, "-edm", "2", "-upm", "2", "--json", "-o", tmp_path / "x")
    assert up.exit_code == 0, up.output
    up_data = json.loads(up.stdout)
    hidden = read_config(llama)["hidden_size"]
    assert up_data["mode"] == "up" and up_data["config_changes"]["hidden_size"] == {"from": hidden, "to": 2 * hidden}
    plain = _invoke("plan", llama, "-edm", "2", "-upm", "2", "--json", "-o", tmp_path / "x")
    assert plain.exit_code == 0 and json.loads(plain.stdout) == up_data  # a plain `plan MODEL` is `plan up`
    down = _invoke("plan", "down", wide, "-edd", "2", "-upd", "2", "--json", "-o", tmp_path / "y")
    assert down.exit_code == 0, down.output
    down_data = json.loads(down.stdout)
    assert down_data["mode"] == "down"
    assert down_data["config_changes"]["hidden_size"] == {"from": 2 * hidden, "to": hidden}
    assert "plan up" in _invoke("plan", "--help").stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["plan", "up", "{model}", "-edd", "2"], "-edd is an option of `plan down`, not `plan up`"),
        (["plan", "{model}", "--embed-dim-divisor", "2"], "--embed-dim-divisor is an option of `plan down`"),
        (["plan", "down", "{model}", "-edm", "2"], "-edm is an option of `plan up`, not `plan down`"),
        (["plan", "down", "{model}", "-edd", "2", "--snr-db=20"], "--snr-db is an option of `plan up`"),
        (["plan", "down", "{model}", "--hidden-size", "256"], "larger than the model's"),
        (["plan", "up", "{model}", "--hidden-size", "16"], "smaller than the model's"),
        (["plan", "down", "{model}"], "say how small"),
    ],
)
def test_a_direction_mistake_is_one_line(llama, args, words):
    result = _invoke(*[llama if arg == "{model}" else arg for arg in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("tensorscale: error:"), result.stderr
