"""The jobs file: a YAML `jobs:` list of conversions, validated whole before any job runs.

A typo in job 37 must not surface after 36 conversions have run, so every key and value is checked up
front and the first problem is reported in one line naming the job and the key. Options use the CLI's long
names with underscores, so a command line translates into a job by replacing dashes; each job's options
are checked against its own command (`snr_db` in a `down` job is a mistake, not ignored).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from ..errors import TensorscaleError
from ..reading.source import looks_like_hub_id
from ..rulebook.targets import TARGET_KEYS
from ..strict_yaml import load_yaml_file

MAX_JOBS_BYTES = 16 * 2**20
COMMANDS = ("up", "down")
REQUIRED = ("command", "input", "output")
# Options shared by both commands, by the CLI's long names with underscores, and their defaults.
COMMON_OPTIONS = {
    "seed": 0,
    "dtype": "keep",
    "rules": None,
    "max_shard_size": "5GB",
    "force": False,
    "verify_files": False,
    "allow_nonfinite": False,
}
DOWN_TARGETS = TARGET_KEYS  # the size options
UP_OPTIONS = {
    "embed_dim_multiplier": 1,
    "up_proj_multiplier": 1,
    **{key: None for key in DOWN_TARGETS},  # any larger width
    "strategy": "clone",
    "add_layers": 0,
    "at": None,
    "duplicate_layers": None,
    "snr_db": None,
    "untie_embeddings": False,
    **COMMON_OPTIONS,
}
STRATEGIES = ("clone", "pad")
DOWN_OPTIONS = {
    "embed_dim_divisor": None,
    "up_proj_divisor": None,
    **{key: None for key in DOWN_TARGETS},
    "method": "auto",
    "calibration": None,
    "calibration_tokens": 8192,
    **COMMON_OPTIONS,
}
OPTIONS = {"up": UP_OPTIONS, "down": DOWN_OPTIONS}
ALL_OPTIONS = {**UP_OPTIONS, **DOWN_OPTIONS}
KNOWN_KEYS = (*REQUIRED, *ALL_OPTIONS)
DTYPES = ("keep", "float32", "bfloat16", "float16")


@dataclass
class Job:
    """One conversion, with paths made absolute (relative ones are read from the jobs file's folder)."""

    index: int  # 1-based, as messages and the summary name it
    command: str
    input: str
    output: str
    options: dict = field(default_factory=dict)  # the command's option keys, defaults filled in
    rules: str | None = None
    kept: tuple = ()  # files no replaced output may hold (the jobs file, the summary)

    @property
    def force(self) -> bool:
        return self.options["force"]

    @property
    def verify_files(self) -> bool:
        return self.options["verify_files"]

    def engine_options(self):
        """The planner's UpOptions or DownOptions (max_shard_size parsed to bytes)."""
        from ..planning.plan import DownOptions, UpOptions, parse_size

        o = self.options
        shared = dict(
            seed=o["seed"],
            dtype=o["dtype"],
            max_shard_size=parse_size(o["max_shard_size"]),
            targets={key: o[key] for key in DOWN_TARGETS if o[key] is not None},
        )
        if self.command == "down":
            return DownOptions(embed_dim_divisor=o["embed_dim_divisor"], up_proj_divisor=o["up_proj_divisor"], **shared)
        return UpOptions(
            o["embed_dim_multiplier"],
            o["up_proj_multiplier"],
            snr_db=o["snr_db"],
            untie_embeddings=o["untie_embeddings"],
            strategy=o["strategy"],
            add_layers=o["add_layers"],
            insert_at=_positions(o["at"]),
            duplicate_layers=o["duplicate_layers"],
            **shared,
        )

    def command_line(self) -> list[str]:
        """The equivalent single command, recorded in the output's manifest: it names every option that
        shapes the bytes (not --force), so a rerun can tell an edited job from a finished one, and a
        person can rerun one job by hand."""
        args = ["tensorscale", self.command, "--input", self.input, "--output", self.output]
        for key, value in self.options.items():
            if key in ("force", "verify_files") or value is None or value is False:
                continue
            if key == "calibration_tokens" and self.options.get("calibration") is None:
                continue
            if (key, value) in (("strategy", "clone"), ("add_layers", 0)):
                continue  # the defaults: command lines stay as they were before these options existed
            if key == "at":
                value = ",".join(str(p) for p in _positions(value))
            flag = "--" + key.replace("_", "-")
            args += [flag] if value is True else [flag, str(value)]
        if self.rules:
            args += ["--rules", self.rules]
        return args + ["--manifest"]


def load_jobs(path: str) -> list[Job]:
    """Read and validate the whole jobs file; raise one TensorscaleError line on the first problem."""
    if not os.path.lexists(path):
        raise TensorscaleError(f"jobs file {path} does not exist; check the path")
    # safe loading (plain data only), a key given twice refused, nesting bounded (strict_yaml)
    return parse_jobs(load_yaml_file(path, "jobs file", MAX_JOBS_BYTES), path)


def parse_jobs(data, path: str = "<jobs>") -> list[Job]:
    if not isinstance(data, dict) or "jobs" not in data:
        raise TensorscaleError(f"{path}: expected a top-level `jobs:` list of conversions")
    extra = sorted(set(data) - {"jobs", "defaults"})
    if extra:
        raise TensorscaleError(f"{path}: unknown top-level key {extra[0]!r}; only `jobs:` and `defaults:` are read")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise TensorscaleError(f"{path}: `defaults:` must be a mapping of options shared by every job")
    for key in defaults:
        if key not in ALL_OPTIONS:
            raise TensorscaleError(
                f"{path}: defaults: unknown key {key!r}; defaults hold options ({', '.join(ALL_OPTIONS)})"
            )
    entries = data["jobs"]
    if not isinstance(entries, list) or not entries:
        raise TensorscaleError(f"{path}: `jobs:` must be a non-empty list of mappings")
    base = os.path.dirname(os.path.abspath(path))
    jobs = [_parse_job(i, entry, defaults, base, path) for i, entry in enumerate(entries, start=1)]
    _check_across_jobs(jobs, path, base)
    return jobs


def _parse_job(index: int, entry, defaults: dict, base: str, path: str) -> Job:
    where = f"{path}: job {index}"
    if not isinstance(entry, dict):
        raise TensorscaleError(f"{where}: expected a mapping with command, input and output")
    for key in entry:
        if key not in KNOWN_KEYS:
            hint = (
                f"; did you mean {key.replace('-', '_')!r}?"
                if isinstance(key, str) and key.replace("-", "_") in KNOWN_KEYS
                else f"; known keys: {', '.join(KNOWN_KEYS)}"
            )
            raise TensorscaleError(f"{where}: unknown key {key!r}{hint}")
    for key in REQUIRED:
        if key not in entry:
            raise TensorscaleError(f"{where}: missing `{key}`")
    command = entry["command"]
    if command not in COMMANDS:
        raise TensorscaleError(f"{where}: command must be `up` or `down`, got {command!r}")
    if command == "down":
        _require_down()
    known = OPTIONS[command]
    for key in entry:
        if key not in REQUIRED and key not in known:
            raise TensorscaleError(
                f"{where}: `{key}` is not an option of `{command}`; {command} takes {', '.join(known)}"
            )
    for key in ("input", "output"):
        if not isinstance(entry[key], str) or not entry[key].strip():
            raise TensorscaleError(f"{where}: `{key}` must be a path (or, for input, a hub id like org/name)")
        if "\0" in entry[key]:
            raise TensorscaleError(f"{where}: `{key}` contains a NUL character; give a plain path")
    options = dict(known)
    options.update({k: v for k, v in defaults.items() if k in known})  # a default for the other command is skipped
    options.update({k: v for k, v in entry.items() if k in known})
    for key, value in options.items():
        problem = _check_value(key, value)
        if problem:
            raise TensorscaleError(f"{where}: `{key}` {problem}")
    if "snr_db" in options and options["snr_db"] is not None:
        options["snr_db"] = float(options["snr_db"])
    options["max_shard_size"] = str(options["max_shard_size"])
    rules = options.pop("rules")
    if rules is not None:
        rules = _resolve(rules, base)
        if not os.path.isfile(rules):
            raise TensorscaleError(f"{where}: rules file {rules} does not exist")
    if command == "down":
        if not any(options[key] is not None for key in ("embed_dim_divisor", "up_proj_divisor", *DOWN_TARGETS)):
            raise TensorscaleError(
                f"{where}: say how small: embed_dim_divisor/up_proj_divisor, or {'/'.join(DOWN_TARGETS)}"
            )
        if options["calibration"] is not None:
            options["calibration"] = _resolve(options["calibration"], base)
            if not os.path.isfile(options["calibration"]):
                raise TensorscaleError(f"{where}: calibration text {options['calibration']} does not exist")
    return Job(index, command, _resolve_input(entry["input"], base), _resolve(entry["output"], base), options, rules)


def _require_down() -> None:
    """`down` runs only where the engine has it (it landed after batch was written)."""
    from .. import convert

    if not hasattr(convert, "plan_down"):
        raise TensorscaleError("command `down` is not available in this version; only `up` jobs can run")


def _positions(value) -> tuple[int, ...] | None:
    """`at: [4, 8]` or `at: "4,8"` (as on the command line) -> (4, 8)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, str):
        return tuple(int(part) for part in value.split(",") if part.strip())
    return tuple(value)


def _check_value(key: str, value) -> str | None:
    """What is wrong with an option value, in words; None when it is fine."""
    if key == "strategy":
        if value not in STRATEGIES:
            return f"must be one of {', '.join(STRATEGIES)}, got {value!r}"
    elif key == "add_layers":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"must be a whole number >= 0, got {value!r}"
    elif key == "at":
        if value is None:
            return None
        try:
            positions = _positions(value)
        except (TypeError, ValueError):
            positions = None
        if not positions or any(isinstance(p, bool) or not isinstance(p, int) for p in positions):
            return f'must be layer indices, as a list [4, 8] or a string "4,8", got {value!r}'
    elif key == "duplicate_layers":
        if value is not None and not isinstance(value, str):
            return f'must be START:END as a string (quote it: "8:16"), got {value!r}'
    elif key in ("embed_dim_multiplier", "up_proj_multiplier", "calibration_tokens"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"must be a whole number >= 1, got {value!r}"
    elif key in ("embed_dim_divisor", "up_proj_divisor", *DOWN_TARGETS):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            return f"must be a whole number >= 1, got {value!r}"
    elif key == "method":
        if value not in ("auto", "fold", "refit"):
            return f"must be auto, fold or refit, got {value!r}"
    elif key == "calibration":
        if value is not None and not isinstance(value, str):
            return f"must be a path to a text file, got {value!r}"
    elif key == "seed":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be a whole number, got {value!r}"
    elif key == "snr_db":
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        ):
            return f"must be a finite number of decibels (or null for no noise), got {value!r}"
    elif key in ("untie_embeddings", "force", "verify_files", "allow_nonfinite"):
        if not isinstance(value, bool):
            return f"must be true or false, got {value!r}"
    elif key == "dtype":
        if value not in DTYPES:
            return f"must be one of {', '.join(DTYPES)}, got {value!r}"
    elif key == "rules":
        if value is not None and not isinstance(value, str):
            return f"must be a path to a rules file, got {value!r}"
    elif key == "max_shard_size":
        from ..planning.plan import parse_size

        if isinstance(value, bool) or not isinstance(value, (int, str)):
            return f"must be a size like 5GB or 500MB, got {value!r}"
        try:
            parse_size(str(value))
        except TensorscaleError as exc:
            return str(exc)
    return None


def _resolve(path: str, base: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def _resolve_input(text: str, base: str) -> str:
    """A path relative to the jobs file if it exists there; otherwise a hub id (or pkg:NAME) stays as written."""
    if text.startswith("pkg:"):
        return text
    local = _resolve(text, base)
    if os.path.exists(local) or not looks_like_hub_id(text):
        return local
    return text


def check_inputs_and_outputs(jobs: list[Job], path: str = "<jobs>") -> None:
    """The rest of the up-front check, which reads the disk: every input opens (config.json and the
    safetensors headers, or the hub's) and has rules, and every output's parent folder exists or can be
    created. A missing input in job 37 is one line before job 1 starts, not a failure after it."""
    from ..convert import asks_for_a_change
    from ..reading.source import open_source
    from ..rulebook.registry import resolve_rules

    for job in jobs:
        where = f"{path}: job {job.index}"
        if job.command == "up" and not asks_for_a_change(job.engine_options()):
            raise TensorscaleError(
                f"{where}: nothing to change; give embed_dim_multiplier, up_proj_multiplier, a "
                "target size, add_layers or duplicate_layers"
            )
        try:
            source = open_source(job.input, headers_only=True)
            resolve_rules(source.config, job.rules)
        except TensorscaleError as exc:
            hint = ""
            if not os.path.isabs(job.input):  # a hub id: it may have been meant as a folder
                hint = f" (and there is no folder {_resolve(job.input, os.path.dirname(os.path.abspath(path)))})"
            raise TensorscaleError(f"{where}: input {job.input}: {exc}{hint}") from None
        parent = os.path.dirname(job.output)
        existing = parent
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise TensorscaleError(f"{where}: cannot create the folder for {job.output}: {existing} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise TensorscaleError(f"{where}: cannot create {job.output}: {existing} is not writable")


def create_output_parents(jobs: list[Job]) -> None:
    """`output: out/x` works without a prior `mkdir out` (checked by check_inputs_and_outputs first)."""
    for job in jobs:
        try:
            os.makedirs(os.path.dirname(job.output), exist_ok=True)
        except OSError as exc:
            raise TensorscaleError(
                f"job {job.index}: cannot create {os.path.dirname(job.output)}: {exc.strerror}"
            ) from None


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_across_jobs(jobs: list[Job], path: str, base: str | None = None) -> None:
    """Jobs run in parallel, so two may not write one folder (or one inside the other), nor may one read
    what another writes, even where that output does not exist yet (`out/x2` also reads as a hub id);
    and no output may hold the jobs file itself."""
    base = base or os.path.dirname(os.path.abspath(path))
    jobs_file = os.path.realpath(path)
    writers: dict[str, int] = {}
    for job in jobs:
        out = os.path.realpath(job.output)
        if _inside(jobs_file, out):
            raise TensorscaleError(
                f"{path}: job {job.index} writes {job.output}, which holds this jobs file; "
                "choose an output folder of its own"
            )
        for other, index in writers.items():
            if other == out:
                raise TensorscaleError(
                    f"{path}: jobs {index} and {job.index} both write {job.output}; give each its own output"
                )
            if _inside(out, other) or _inside(other, out):
                raise TensorscaleError(
                    f"{path}: the outputs of jobs {index} and {job.index} are nested (one inside the "
                    "other); give each a folder of its own, side by side"
                )
        writers[out] = job.index
    for job in jobs:
        candidates = {os.path.realpath(job.input if os.path.isabs(job.input) else _resolve(job.input, base))}
        for source in candidates:
            for out, index in writers.items():
                if _inside(source, out) or _inside(out, source):
                    raise TensorscaleError(
                        f"{path}: job {job.index} reads the output of job {index}; jobs run in parallel, "
                        "so put chained conversions in two jobs files run one after the other"
                    )


def check_outputs(jobs: list[Job], jobs_file: str, summary_path: str) -> None:
    """Before any job runs: no existing output may be a folder that a rerun must not replace (the input,
    the current directory, a home, a mount point, or a folder holding the jobs file or the summary), and
    each must hold only model files, except a finished output of the same job, which a rerun skips and
    so keeps whatever the user added (if it must be redone instead, that job fails with one line then)."""
    from ..writing.replace_guard import check_contents, check_location
    from .resume import records_job

    for job in jobs:
        job.kept = (jobs_file, summary_path)
        if not os.path.lexists(job.output):
            continue
        source = job.input if os.path.isabs(job.input) else None
        try:
            check_location(job.output, source, (jobs_file, summary_path))
            if not records_job(job, job.output):
                check_contents(job.output)
        except TensorscaleError as exc:
            raise TensorscaleError(f"{jobs_file}: job {job.index}: {exc}") from None
