"""Run a plan into OUT: every shard written and checked, the model card and side files, the commit.

Why a module of its own: this is the one path every rewrite ends in (`up`, `down`, a GGUF imported for
`gen`, a batch job), and convert.py, which plans rewrites, imports the GGUF import that needs it; here it
imports neither, so nothing cycles.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

from .errors import TensorscaleError
from .planning.plan import Plan, ShardPlan, UpOptions
from .progress import progress_for
from .reading.source import INDEX_NAME, ModelSource
from .writing.integrity import MANIFEST_NAME, build_manifest, check_shard_file, verify_tensor_hashes
from .writing.output_folder import OutputFolder, check_output_path, release_reservation

# Room each shard's header may take beyond its tensors' bytes, in the whole-output disk reservation.
HEADER_ALLOWANCE = 2**20

log = logging.getLogger(__name__)  # `-v` shows these lines on stderr


def size_label(parameters: int) -> str:
    """1_012_000_000 -> '1.0B', 492_000_000 -> '492M' (the seed tool's naming, e.g. Qwen3-0.6B-1.0B)."""
    if parameters >= 10**9:
        return f"{parameters / 1e9:.1f}B"
    if parameters >= 10**6:
        return f"{parameters / 1e6:.0f}M"
    return f"{parameters / 1e3:.0f}K"


def default_output(source: ModelSource, plan: Plan) -> str:
    """<source name>-<size> in the current folder (beside the model when that is the model's own folder),
    plus what else shaped the output, so that different recipes get different folders: `-pad` (the
    top-left strategy), `-add<K>` (identity layers), `-dup<START>-<END>` (duplicated layers)."""
    name = f"{source.name}-{size_label(plan.total_parameters)}"
    options = plan.options
    if isinstance(options, UpOptions):
        if options.strategy == "pad":
            name += "-pad"
        if options.add_layers:
            name += f"-add{options.add_layers}"
        if options.duplicate_layers is not None:
            name += "-dup" + "-".join(re.findall(r"\d+", str(options.duplicate_layers)))
    here, model = os.path.realpath(os.getcwd()), os.path.realpath(source.folder)
    if here == model or here.startswith(model + os.sep):  # `cd my-model && tensorscale up .`: write beside it
        here = os.path.dirname(model)
    return os.path.join(here, name)


@dataclass
class Result:
    output: str
    plan: Plan
    seconds: float
    side_files: list[str]
    stale_removed: list[str]
    verified_files: bool = False
    manifest: str | None = None
    warnings: list[str] = None

    def summary(self) -> dict:
        plan = self.plan
        options = plan.options.recorded()
        return {
            "input": plan.source.label,
            "output": self.output,
            "rules": plan.rules.name,
            "embed_dim_multiplier": options["embed_dim_multiplier"],
            "up_proj_multiplier": options["up_proj_multiplier"],
            "snr_db": options["snr_db"],
            "seed": options["seed"],
            "source_parameters": sum(info.numel for info in plan.source.tensors.values()),
            "total_parameters": plan.total_parameters,
            "total_bytes": plan.total_bytes,
            "tensors": len(plan.tensors),
            "shards": [shard.filename for shard in plan.shards],
            "side_files": self.side_files,
            "verified_files": self.verified_files,
            "manifest": self.manifest,
            "stale_temporary_folders_removed": self.stale_removed,
            "depth": plan.depth.describe() if getattr(plan, "depth", None) else None,
            "seconds": round(self.seconds, 3),
            "notes": list(plan.notes),
            "strategy": options["strategy"],
            "targets": options["targets"],
        }


ShardRunner = Callable[[Plan, str, bool, Optional[Callable[[int, int], None]]], None]


def produce_shard(
    plan: Plan, shard: ShardPlan, path: str, *, verify_files: bool = False, progress=None, reader=None
) -> list[str]:
    """Write one output shard and check it. Needs nothing but the plan: shards can run in any order,
    in other processes, or on other machines that see the same input files.

    Returns the input tensors found holding NaN or Inf while they were read (execute_plan decides)."""
    from .reading.tensor_reader import ShardReader  # torch loads here, with the first shard, not for plans
    from .writing.execute import write_shard

    hashes = {} if verify_files else None
    release_reservation(os.path.dirname(path), shard.nbytes + HEADER_ALLOWANCE)
    if reader is None:
        with ShardReader() as own_reader:
            own_reader.nonfinite = set()
            write_shard(plan, shard, path, own_reader, progress, hashes)
            found = sorted(own_reader.nonfinite)
    else:
        if reader.nonfinite is None:
            reader.nonfinite = set()
        write_shard(plan, shard, path, reader, progress, hashes)
        found = sorted(reader.nonfinite)
    check_shard_file(path, shard)
    if hashes is not None:
        verify_tensor_hashes(path, hashes)
    return found


def run_shards_in_order(plan: Plan, folder: str, verify_files: bool, progress) -> None:
    """The default shard runner: every shard in this process, one after another."""
    from .reading.tensor_reader import ShardReader

    with ShardReader() as reader:
        for shard in plan.shards:
            log.info("shard %s: %d tensor(s), %d bytes", shard.filename, len(shard.tensors), shard.nbytes)
            plan.nonfinite_inputs.update(
                produce_shard(
                    plan,
                    shard,
                    os.path.join(folder, shard.filename),
                    verify_files=verify_files,
                    progress=progress,
                    reader=reader,
                )
            )
            _check_inputs_unchanged(plan.source)


def nonfinite_message(names) -> str:
    names = sorted(names)
    more = f" and {len(names) - 1} more tensor(s)" if len(names) > 1 else ""
    return f"the input holds NaN or Inf values in {names[0]}{more}"


def execute_plan(
    plan: Plan,
    output: str | None,
    *,
    force: bool = False,
    show_progress: bool = True,
    verify_files: bool = False,
    manifest: bool = False,
    command: list[str] | None = None,
    shard_runner: ShardRunner | None = None,
    check: Callable[[str], dict | None] | None = None,
    allow_nonfinite: bool = False,
    extra_kept: tuple[str, ...] = (),
) -> Result:
    """Write the plan into a temporary folder beside OUT, check it, and only then move it into place.

    `shard_runner(plan, folder, verify_files, progress)` produces every shard file in `folder` (by default
    in order, in this process); everything else (index, config, side files, model card, manifest, commit)
    stays here. `check(folder)`, when given, runs on the complete temporary folder before the model card is
    written (up --verify); what it returns goes into the card, and an interrupt there leaves OUT untouched.
    Input tensors holding NaN or Inf (seen as they are read) fail the run, with nothing written, unless
    `allow_nonfinite`: then the Result carries the warning."""
    from .writing.model_card import CARD_NAME, card_facts, card_text, safetensors_metadata

    started = time.perf_counter()
    source = plan.source
    out = check_output_path(output or default_output(source, plan), source.input_path, force, extra_kept)
    facts = card_facts(plan, command)
    plan = replace(plan, metadata=safetensors_metadata(facts))
    folder = OutputFolder(out)
    bar = progress_for(plan.total_bytes, "writing", len(plan.tensors), enabled=show_progress)
    completed = False
    warnings = []
    try:
        folder.create()
        folder.reserve(plan.total_bytes + HEADER_ALLOWANCE * len(plan.shards))
        log.info(
            "writing %s: %d tensor(s) in %d shard(s), %d bytes, into %s",
            out,
            len(plan.tensors),
            len(plan.shards),
            plan.total_bytes,
            folder.tmp,
        )
        progress = bar.update if bar is not None else None
        (shard_runner or run_shards_in_order)(plan, folder.tmp, verify_files, progress)
        folder.drop_reservation()
        _check_inputs_unchanged(source)
        if plan.nonfinite_inputs:
            if not allow_nonfinite:
                raise TensorscaleError(
                    f"{nonfinite_message(plan.nonfinite_inputs)}, so the output would compute NaN; "
                    "nothing was written. Repair the checkpoint, or pass --allow-nonfinite to "
                    "write it anyway"
                )
            warnings.append(f"{nonfinite_message(plan.nonfinite_inputs)}; written anyway (--allow-nonfinite)")
        if len(plan.shards) > 1:
            folder.write_json(
                INDEX_NAME,
                {
                    "metadata": {"total_size": plan.total_bytes, "total_parameters": plan.total_parameters},
                    "weight_map": {t.name: shard.filename for shard in plan.shards for t in shard.tensors},
                },
            )
        folder.write_json("config.json", plan.config)
        side = folder.copy_side_files(source.folder)
        checked = check(folder.tmp) if check is not None else None
        folder.write_text(CARD_NAME, card_text(facts, checked))
        if manifest:
            folder.write_json(MANIFEST_NAME, build_manifest(plan, folder.tmp, command))
        _check_inputs_unchanged(source)
        folder.commit()
        completed = True
        log.info("moved %s into place%s", out, f"; copied {', '.join(side)}" if side else "")
    except BaseException:
        folder.abort()
        raise
    finally:
        if bar is not None:
            bar.close(completed)
    return Result(
        out,
        plan,
        time.perf_counter() - started,
        side,
        folder.stale_removed,
        verify_files,
        os.path.join(out, MANIFEST_NAME) if manifest else None,
        warnings,
    )


def _check_inputs_unchanged(source: ModelSource) -> None:
    """Fail cleanly if an input shard vanished or was rewritten while we read it (size or mtime changed)."""
    for path, header in source.headers.items():
        try:
            status = os.stat(path)
        except OSError:
            raise TensorscaleError(f"input shard {path} vanished during the run; nothing was written") from None
        if status.st_size != header.file_size or (header.mtime_ns and status.st_mtime_ns != header.mtime_ns):
            raise TensorscaleError(f"input shard {path} changed during the run; nothing was written, run again")
