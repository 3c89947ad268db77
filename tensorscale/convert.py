"""One conversion end to end: open the source, plan, write every shard into a temporary folder, commit."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import TensorscaleError
from .planning.plan import Options, Plan, ShardPlan, build_plan
from .reading.source import INDEX_NAME, ModelSource, open_source
from .rulebook.registry import resolve_rules
from .writing.integrity import MANIFEST_NAME, build_manifest, check_shard_file, verify_tensor_hashes
from .writing.output_folder import OutputFolder, check_output_path


def plan_conversion(source_label: str, options: Options, rules_path: str | None = None, *, headers_only: bool = False) -> Plan:
    source = open_source(source_label, headers_only=headers_only)
    rules = resolve_rules(source.config, rules_path)
    return build_plan(source, rules, options)


def targets_grow(source_label: str, targets: dict, rules_path: str | None = None) -> bool:
    """True when every given target size is at least the model's (so `plan` previews `up`, not `down`)."""
    from .planning.plan import current_units

    chosen = {key: value for key, value in targets.items() if value is not None}
    if not chosen:
        return True
    source = open_source(source_label, headers_only=True)
    rules = resolve_rules(source.config, rules_path)
    current = current_units(rules, source.config, Options())
    return all(current.get(key) is None or value >= current[key] for key, value in chosen.items())


def plan_down(source_label: str, options: Options, rules_path: str | None = None, progress=None,
              calibration: tuple[str, int] | None = None) -> Plan:
    """Plan `down`: read the weights once to cluster every space's units, then plan the merges.

    Unlike `up`, this reads tensor data (the clustering needs it), so even `plan` takes a full read."""
    from .folding.analysis import analyse
    from .heap import release_free_memory
    from .folding.retie import find_retie
    from .planning.plan import evaluate_env
    from .rulebook.compile import resolve_spaces

    options.mode = "down"
    options.validate()
    source = open_source(source_label)
    rules = resolve_rules(source.config, rules_path)
    env = evaluate_env(rules, source.config, options)
    folds = analyse(source, rules, env, resolve_spaces(rules, env), seed=options.seed, progress=progress,
                    calibration=calibration, influence=bool(options.remove_layer_count))
    if options.remove_layer_count:
        if folds.influence is None:
            raise TensorscaleError("--remove-layers chooses layers from a forward pass; it cannot be used with --fold-only")
        order = sorted(range(len(folds.influence)), key=lambda layer: float(folds.influence[layer]))
        options.remove_layers = tuple(sorted(order[:options.remove_layer_count]))
        folds.notes.append(f"removed layers {list(options.remove_layers)} (least block influence, ShortGPT)")
    release_free_memory()  # the analysis's buffers are gone; do not let writing stack on them
    plan = build_plan(source, rules, options, folds)
    retie = find_retie(plan)
    if retie:
        plan = build_plan(source, rules, options, folds, retie=retie)
    plan.folds = folds
    plan.retied = retie
    plan.notes.extend(getattr(folds, "notes", []))
    retarget_tie_compensation(plan, folds)
    return plan


def retarget_tie_compensation(plan: Plan, folds) -> None:
    """A tied model's final norm stands in for the shared head's reader scale: the rules scale it by
    1/n_tiles, which is right for a fold of copies. Where the residual stream was selected instead
    (folding.selection), the head must read like every other reader, scaled by that selection's factor."""
    from .folding.selection import Selection
    from .ops.library import Scale

    tie = plan.env.get("n_tiles")
    if not tie:
        return
    for tensor in plan.tensors:
        roles = [(space, role) for _, space, role in _roles(plan, tensor)]
        selected = [folds.by_key.get((space, None)) for space, role in roles if role == "norm"]
        if len(selected) != 1 or not isinstance(selected[0], Selection):
            continue
        for chain in (tensor.ops, tensor.row_ops):
            for index, op in enumerate(chain):
                if isinstance(op, Scale) and not op.offset and abs(op.factor * tie - 1) < 1e-9 and tie != 1:
                    chain[index] = Scale(selected[0].reader_scale)


def _roles(plan: Plan, tensor):
    from .planning.plan import match_rule
    from .rulebook.schema import split_role

    rule, _ = match_rule(plan.rules, tensor.source.name, plan.env)
    if rule is None or rule.transform.axes is None or rule.transform.scale is None:
        return []
    return [(axis, *split_role(label)) for axis, label in enumerate(rule.transform.axes)
            if isinstance(label, str) and label != "-"]


def size_label(parameters: int) -> str:
    """1_012_000_000 -> '1.0B', 492_000_000 -> '492M' (the seed tool's naming, e.g. Qwen3-0.6B-1.0B)."""
    if parameters >= 10**9:
        return f"{parameters / 1e9:.1f}B"
    if parameters >= 10**6:
        return f"{parameters / 1e6:.0f}M"
    return f"{parameters / 1e3:.0f}K"


def default_output(source: ModelSource, plan: Plan) -> str:
    return os.path.join(os.getcwd(), f"{source.name}-{size_label(plan.total_parameters)}")


@dataclass
class Result:
    output: str
    plan: Plan
    seconds: float
    side_files: list[str]
    stale_removed: list[str]
    verified_files: bool = False
    manifest: str | None = None

    def summary(self) -> dict:
        plan = self.plan
        return {
            "input": plan.source.label,
            "output": self.output,
            "rules": plan.rules.name,
            "embed_dim_multiplier": plan.options.embed_dim_multiplier,
            "up_proj_multiplier": plan.options.up_proj_multiplier,
            "snr_db": plan.options.snr_db,
            "seed": plan.options.seed,
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
            "strategy": plan.options.strategy,
            "targets": dict(plan.options.targets),
        }


ShardRunner = Callable[[Plan, str, bool, Optional[Callable[[int, int], None]]], None]


def produce_shard(plan: Plan, shard: ShardPlan, path: str, *, verify_files: bool = False, progress=None,
                  reader=None) -> None:
    """Write one output shard and check it. Needs nothing but the plan: shards can run in any order,
    in other processes, or on other machines that see the same input files."""
    from .reading.tensor_reader import ShardReader  # torch loads here, with the first shard, not for plans
    from .writing.execute import write_shard

    hashes = {} if verify_files else None
    if reader is None:
        with ShardReader() as own_reader:
            write_shard(plan, shard, path, own_reader, progress, hashes)
    else:
        write_shard(plan, shard, path, reader, progress, hashes)
    check_shard_file(path, shard)
    if hashes is not None:
        verify_tensor_hashes(path, hashes)


def run_shards_in_order(plan: Plan, folder: str, verify_files: bool, progress) -> None:
    """The default shard runner: every shard in this process, one after another."""
    from .reading.tensor_reader import ShardReader

    with ShardReader() as reader:
        for shard in plan.shards:
            produce_shard(plan, shard, os.path.join(folder, shard.filename), verify_files=verify_files,
                          progress=progress, reader=reader)
            _check_inputs_unchanged(plan.source)


def execute_plan(plan: Plan, output: str | None, *, force: bool = False, show_progress: bool = True,
                 verify_files: bool = False, manifest: bool = False, command: list[str] | None = None,
                 shard_runner: ShardRunner | None = None) -> Result:
    """Write the plan into a temporary folder beside OUT, check it, and only then move it into place.

    `shard_runner(plan, folder, verify_files, progress)` produces every shard file in `folder` (by default
    in order, in this process); everything else (index, config, side files, manifest, commit) stays here."""
    started = time.perf_counter()
    source = plan.source
    out = check_output_path(output or default_output(source, plan), source.folder, force)
    folder = OutputFolder(out)
    bar = None
    try:
        folder.create()
        progress = None
        if show_progress:
            from tqdm import tqdm

            bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="writing", leave=False)
            counts = {"tensors": 0}

            def progress(nbytes, tensors):
                if nbytes:
                    bar.update(nbytes)
                if tensors:
                    counts["tensors"] += tensors
                    bar.set_postfix_str(f"{counts['tensors']}/{len(plan.tensors)} tensors", refresh=False)
        (shard_runner or run_shards_in_order)(plan, folder.tmp, verify_files, progress)
        _check_inputs_unchanged(source)
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
        if manifest:
            folder.write_json(MANIFEST_NAME, build_manifest(plan, folder.tmp, command))
        _check_inputs_unchanged(source)
        folder.commit()
    except BaseException:
        folder.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    return Result(out, plan, time.perf_counter() - started, side, folder.stale_removed, verify_files,
                  os.path.join(out, MANIFEST_NAME) if manifest else None)


def _check_inputs_unchanged(source: ModelSource) -> None:
    """Fail cleanly if an input shard vanished or was rewritten while we read it (size or mtime changed)."""
    for path, header in source.headers.items():
        try:
            status = os.stat(path)
        except OSError:
            raise TensorscaleError(f"input shard {path} vanished during the run; nothing was written") from None
        if status.st_size != header.file_size or (header.mtime_ns and status.st_mtime_ns != header.mtime_ns):
            raise TensorscaleError(f"input shard {path} changed during the run; nothing was written, run again")


def run_up(source_label: str, output: str | None, options: Options, *, rules_path: str | None = None,
           force: bool = False, show_progress: bool = True, verify_files: bool = False, manifest: bool = False) -> Result:
    plan = plan_conversion(source_label, options, rules_path)
    return execute_plan(plan, output, force=force, show_progress=show_progress, verify_files=verify_files, manifest=manifest)
