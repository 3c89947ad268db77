"""`--force` replaces only what tensorscale could have written, checked before any work; interrupts say what
state OUT is in; temporary folders are owned by kernel locks, not PIDs; a symlink OUT leaves nothing
behind; `down` does not carry the input's manifest; the whole output is reserved before the first write.

Each test here failed on the code before issue 14 (see the docstrings for what it did then)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner
from fixtures import build_checkpoint

from tensorscale.cli.main import cli
from tensorscale.convert import execute_plan, plan_conversion
from tensorscale.errors import TensorscaleError
from tensorscale.planning.plan import UpOptions
from tensorscale.writing import output_folder
from tensorscale.writing.integrity import MANIFEST_NAME


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("safety") / "src", "llama", tie_word_embeddings=False)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("tensorscale: error")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def tree(folder):
    return sorted(
        os.path.relpath(os.path.join(root, name), folder)
        for root, dirs, files in os.walk(folder)
        for name in dirs + files
    )


def up_x2(model, out, *extra):
    return invoke("up", "-i", model, "-o", out, "-edm", "2", "-q", *extra)


# ---- --force never deletes what is not ours ----------------------------------------------------------


def test_force_onto_a_folder_above_the_input_is_refused(model, tmp_path):
    """Before: `up -i proj/models/pd -o proj --force` exit 0, the input and proj/notes/thesis.txt gone."""
    import shutil

    proj = tmp_path / "proj"
    shutil.copytree(model, proj / "models" / "pd")
    (proj / "notes").mkdir()
    (proj / "notes" / "thesis.txt").write_text("years of work")
    before = tree(proj)
    one_line_error(up_x2(proj / "models" / "pd", proj, "--force"), "the input")
    assert tree(proj) == before


def test_force_onto_the_current_directory_is_refused(model, tmp_path, monkeypatch):
    """Before: `-o . --force` wiped the current directory."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "model.safetensors").write_bytes(b"")  # looks like a model folder, but it is where we are
    monkeypatch.chdir(work)
    one_line_error(up_x2(model, ".", "--force"), "current directory")
    assert os.listdir(work) == ["model.safetensors"]


def test_force_onto_a_home_directory_is_refused(model, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.json").write_text("{}")
    monkeypatch.setenv("HOME", str(home))
    one_line_error(up_x2(model, home, "--force"), "home directory")
    assert (home / "config.json").exists()


def test_force_onto_a_folder_that_holds_a_mount_point_is_refused(model, monkeypatch, tmp_path):
    """Before: EBUSY traceback after the whole conversion. The mount table is read from /proc; here a
    mount point is placed inside OUT by pointing the reader at a fake table."""
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    table = tmp_path / "mountinfo"
    table.write_text(f"36 35 98:0 / {out / 'sub'} rw,noatime master:1 - ext3 /dev/root rw\n")
    from tensorscale.writing import replace_guard

    real_open = open

    def fake_open(path, *args, **kwargs):
        return real_open(table if path == "/proc/self/mountinfo" else path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    with pytest.raises(TensorscaleError, match="mount point"):
        replace_guard.check_location(str(out), model)


def test_force_refuses_a_folder_with_a_file_we_never_write(model, tmp_path):
    """Before: any folder was replaced. Now one line names the unexpected file, and nothing changes."""
    out = tmp_path / "out"
    assert up_x2(model, out).exit_code == 0
    (out / "thesis.txt").write_text("mine")
    before = tree(out)
    line = one_line_error(up_x2(model, out, "--force"), "thesis.txt")
    assert "not a model file" in line
    assert tree(out) == before and not [n for n in os.listdir(tmp_path) if ".tensorscale-" in n]


def test_force_refuses_a_folder_with_a_subfolder(model, tmp_path):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    one_line_error(up_x2(model, out, "--force"), "data/")
    assert (out / "data").is_dir()


def test_force_replaces_a_model_folder_it_could_have_written(model, tmp_path):
    out = tmp_path / "out"
    assert up_x2(model, out, "--manifest").exit_code == 0
    for name in ("README.md", "tokenizer.json", "chat_template.jinja", "model.gguf", "merges.txt"):
        (out / name).write_text("x")
    result = up_x2(model, out, "--force")
    assert result.exit_code == 0, result.output
    assert json.load(open(out / "config.json"))["hidden_size"] == 64


def test_force_checks_happen_before_any_work(model, tmp_path, monkeypatch):
    """The refusal comes before planning (down's planning reads every weight)."""
    import tensorscale.convert as convert

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def no_planning(*args, **kwargs):
        raise AssertionError("planned before checking OUT")

    monkeypatch.setattr(convert, "plan_conversion", no_planning)
    monkeypatch.setattr(convert, "plan_down", no_planning)
    one_line_error(up_x2(model, out, "--force"), "notes.txt")
    one_line_error(invoke("down", "-i", model, "-o", out, "-edd", "2", "--force", "-q"), "notes.txt")


# ---- symlink OUT ---------------------------------------------------------------------------------------


def test_force_onto_a_symlink_replaces_the_link_and_leaves_nothing(model, tmp_path):
    """Before: the old link stayed behind as `.out.tensorscale-tmp-PID`, never removed."""
    target = tmp_path / "target"
    assert up_x2(model, target).exit_code == 0
    before = tree(target)
    link = tmp_path / "out"
    link.symlink_to(target)
    result = up_x2(model, link, "--force")
    assert result.exit_code == 0, result.output
    assert not link.is_symlink() and link.is_dir()
    assert tree(target) == before  # the link's target is untouched
    assert sorted(os.listdir(tmp_path)) == ["out", "target"]


# ---- interrupts say what state OUT is in -------------------------------------------------------------


def test_interrupt_after_the_swap_says_out_holds_the_new_model(model, tmp_path):
    """Before: Ctrl-C after the swap (then: during `up --force --verify`; verify now runs before the swap)
    said "nothing was written". Here the interrupt comes while the summary is rendered, after the swap."""
    out = tmp_path / "out"
    assert up_x2(model, out).exit_code == 0
    script = textwrap.dedent(f"""
        import sys
        import tensorscale.cli.render as render
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt
        render.up_summary = interrupted  # runs once OUT has been swapped in
        from tensorscale.cli.main import cli
        sys.argv = ["tensorscale", "up", "-i", {model!r}, "-o", {str(out)!r}, "-upm", "2", "-q", "--force"]
        cli(prog_name="tensorscale")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 130, result.stderr
    assert "nothing was written" not in result.stderr, result.stderr
    assert str(out) in result.stderr and "complete new model" in result.stderr and "replaced" in result.stderr
    assert json.load(open(out / "config.json"))["intermediate_size"] == 96  # the new one, as it says


# ---- liveness by kernel lock, not PID ----------------------------------------------------------------


def hold_lock(path):
    """A process in 'another container' holding our kind of lock: its PID means nothing here."""
    code = (
        "import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_live_run_in_another_pid_namespace_is_not_deleted(model, tmp_path):
    """Before: a temporary folder named after a PID that is dead *here* (e.g. PID 1 of another container,
    or any PID of it) was deleted as "left by a run that was killed" while its run was alive."""
    run = "4194301-0a1b2c3d"  # a PID no process here has
    live = tmp_path / f".out{output_folder.TMP_MARKER}{run}"
    live.mkdir()
    (live / "model.safetensors").write_bytes(b"half written")
    holder = hold_lock(tmp_path / f".out{output_folder.LOCK_MARKER}{run}")
    try:
        with pytest.raises(TensorscaleError, match="another tensorscale run"):
            execute_plan(plan_conversion(model, UpOptions(2, 1)), str(tmp_path / "out"), show_progress=False)
        assert (live / "model.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    result = execute_plan(plan_conversion(model, UpOptions(2, 1)), str(tmp_path / "out"), show_progress=False)
    assert live.name in result.stale_removed and not live.exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_temporary_folders_have_a_random_suffix_and_a_held_lock(model, tmp_path, monkeypatch):
    """Two runs with the same PID (two containers' PID 1) never share a temporary folder."""
    seen = []
    real = output_folder.OutputFolder.create

    def create(self):
        real(self)
        seen.append(self.tmp)
        assert self._lock_fd is not None
        probe = os.open(self.lock_path, os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(probe)

    monkeypatch.setattr(output_folder.OutputFolder, "create", create)
    for name in ("a", "b"):
        execute_plan(plan_conversion(model, UpOptions(2, 1)), str(tmp_path / name), show_progress=False)
    suffixes = [path.rsplit("-", 1)[1] for path in seen]
    assert len(set(suffixes)) == 2 and all(len(s) == 8 for s in suffixes)
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


# ---- down does not carry the input's manifest; the whole output is reserved first ------------------


def test_down_does_not_copy_the_inputs_manifest(model, tmp_path):
    """Before: `down` copied the input's tensorscale-manifest.json (another command, wrong hashes)."""
    wide = tmp_path / "wide"
    assert up_x2(model, wide, "--manifest").exit_code == 0
    narrow = tmp_path / "narrow"
    result = invoke("down", "-i", wide, "-o", narrow, "-edd", "2", "-q")
    assert result.exit_code == 0, result.output
    assert MANIFEST_NAME not in os.listdir(narrow)


def test_the_whole_output_is_reserved_before_the_first_write(model, tmp_path, monkeypatch):
    """Before: each shard reserved its own size when it was opened, so a disk that held the first shards
    but not the last failed late. Now the whole size is claimed before any shard is written."""
    from tensorscale.writing import safetensors_writer

    plan = plan_conversion(model, UpOptions(2, 2, max_shard_size=20_000))
    assert len(plan.shards) > 2
    reserved = []
    real_fallocate = os.posix_fallocate

    def fallocate(fd, offset, length):
        reserved.append(length)
        return real_fallocate(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    real_init = safetensors_writer.ShardFile.__init__

    def shard_opened(self, *args, **kwargs):
        assert reserved and reserved[0] >= plan.total_bytes, "a shard was opened before the output was reserved"
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(safetensors_writer.ShardFile, "__init__", shard_opened)
    execute_plan(plan, str(tmp_path / "out"), show_progress=False)
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".")]


def test_a_disk_too_small_for_the_whole_output_fails_before_any_shard(model, tmp_path, monkeypatch):
    import errno

    plan = plan_conversion(model, UpOptions(2, 2, max_shard_size=20_000))

    def full(fd, offset, length):
        if length >= plan.total_bytes:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(TensorscaleError, match="cannot reserve .* for the output"):
        execute_plan(plan, str(tmp_path / "out"), show_progress=False)
    assert os.listdir(tmp_path) == []
