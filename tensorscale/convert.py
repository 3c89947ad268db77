"""One conversion end to end: open the source, plan, write every shard into a temporary folder, commit."""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

from .errors import TensorscaleError
from .progress import progress_for
from .planning.plan import DownOptions, DownSection, Plan, ShardPlan, UpOptions, build_plan
from .reading.source import INDEX_NAME, ModelSource, open_source
from .rulebook.registry import resolve_rules
from .writing.integrity import MANIFEST_NAME, build_manifest, check_shard_file, verify_tensor_hashes
from .writing.output_folder import OutputFolder, SpillWorkspace, check_output_path, release_reservation

# Room each shard's header may take beyond its tensors' bytes, in the whole-output disk reservation.
HEADER_ALLOWANCE = 2**20

log = logging.getLogger(__name__)  # `-v` shows these lines on stderr


def plan_conversion(source_label: str, options: UpOptions, rules_path: str | None = None, *,
                    headers_only: bool = False) -> Plan:
    source = open_source(source_label, headers_only=headers_only)
    log.info("opened %s (%s): %d tensor(s) in %d shard(s)", source.label, source.folder, len(source.tensors),
             len(source.shards))
    rules = resolve_rules(source.config, rules_path)
    log.info("rules %s", rules.name)
    plan = build_plan(source, rules, options)
    log.info("planned %d tensor(s) in %d shard(s), %d bytes", len(plan.tensors), len(plan.shards), plan.total_bytes)
    return plan


def plan_down(source_label: str, options: DownOptions, rules_path: str | None = None, progress=None) -> Plan:
    """Plan `down`: read the weights once to cluster every space's units, then plan the merges.

    Unlike `up`, this reads tensor data (the clustering needs it), so even `plan` takes a full read."""
    from .folding.analysis import analyse
    from .heap import release_free_memory
    from .folding.retie import find_retie
    from .planning.plan import evaluate_env
    from .rulebook.compile import resolve_spaces

    options.validate()
    source = open_source(source_label)
    rules = resolve_rules(source.config, rules_path)
    env = evaluate_env(rules, source.config, options)
    folds = analyse(source, rules, env, resolve_spaces(rules, env), seed=options.seed, progress=progress)
    release_free_memory()  # the analysis's buffers are gone; do not let writing stack on them
    plan = build_plan(source, rules, options, DownSection("fold", folds))
    retie = find_retie(plan)
    if retie:
        plan = build_plan(source, rules, options, DownSection("fold", folds, retied=retie))
    return plan


def plan_down_by_method(source_label: str, options: DownOptions, rules_path: str | None, method: str, text: str | None,
                        tokens: int, spill_folder: str, show_progress: bool = False) -> tuple[Plan, dict | None]:
    """`down`'s plan by `method`: "fold" (cluster-fold, exact on copies), "refit" (layer-wise select and
    refit, folding.layerwise), or "auto": fold where every clustering merged copies (a HyperCloned model),
    else refit. Returns the plan and, for refit, its calibration report (None for fold)."""
    if method not in ("auto", "fold", "refit"):
        raise TensorscaleError(f"unknown down method {method!r}; use auto, fold or refit")
    if text is not None and method == "fold":
        raise TensorscaleError("--calibration is for --method refit (fold merges copies from the weights alone)")
    if method in ("auto", "fold"):
        plan = plan_down(source_label, options, rules_path, progress=show_progress)
        if method == "fold" or plan.down.exact:
            return plan, None
        del plan
    return _refit_with_calibration(source_label, options, rules_path, text, tokens, spill_folder, show_progress)


def _refit_with_calibration(source_label, options, rules_path, text, tokens, spill_folder, show_progress):
    from .folding.calibration import calibration_ids, self_generated_ids
    from .gguf_import import runnable_source
    from .inference.loading import require_transformers

    require_transformers("down (refit)")
    _check_refit_possible(source_label, options, rules_path)  # before minutes of sampling, not after
    model = runnable_source(source_label)
    if text is not None:
        ids = calibration_ids(model.folder, model.label, text, tokens)
    else:
        bar = progress_for(tokens, "down: sampling calibration text", enabled=show_progress, unit="tokens")
        ids = self_generated_ids(model.folder, model.label, model.config, tokens, seed=options.seed,
                                 progress=bar.update if bar else None)
        if bar:
            bar.close()
    layers = int(model.config.get("num_hidden_layers") or 0)
    passes = 2 if options.targets.get("hidden_size") or options.embed_dim_divisor else 1
    bar = progress_for(passes * layers, "down: refitting layers", enabled=show_progress, unit="layers")
    try:
        return plan_refit_down(source_label, options, rules_path, ids, spill_folder,
                               progress=(lambda kind, layer: bar.update(1)) if bar else None)
    finally:
        if bar:
            bar.close()


def _check_refit_possible(source_label: str, options: DownOptions, rules_path: str | None) -> None:
    from .folding.analysis import match_all
    from .folding.layerwise import classify
    from .planning.plan import evaluate_env

    source = open_source(source_label, headers_only=True)
    rules = resolve_rules(source.config, rules_path)
    env = evaluate_env(rules, source.config, options)
    classify(match_all(source, rules, env), rules.depth.group if rules.depth is not None else "layer")
    working_targets(rules, source.config, options)  # head counts refit can make


def refit_workspace(output: str | None) -> SpillWorkspace:
    """The temporary folder refitted tensors spill to, beside OUT (output_folder.SpillWorkspace)."""
    return SpillWorkspace(output)


def plan_refit_down(source_label: str, options: DownOptions, rules_path: str | None, ids, spill_folder: str,
                    progress=None) -> tuple[Plan, dict]:
    """Plan `down` by layer-wise select-and-refit (folding.layerwise) on the calibration tokens `ids`.

    The new weights are computed layer by layer into `spill_folder` (a temporary folder the caller removes);
    the plan then writes them to OUT through the ordinary engine, with the source's provenance."""
    from .folding.analysis import match_all
    from .folding.layerwise import LayerwiseDown
    from .planning.plan import evaluate_env, rewrite_config
    from .reading.tensor_reader import torch_dtype
    from .rulebook.compile import resolve_spaces
    from .writing.spill import SpillFolder

    options.validate()
    source = open_source(source_label)
    rules = resolve_rules(source.config, rules_path)
    env = evaluate_env(rules, source.config, options)
    spaces = resolve_spaces(rules, env)
    new_config = rewrite_config(rules, source.config, env, options)
    new_config.pop("torch_dtype", None) if options.dtype == "keep" else None
    working = DownOptions(targets=working_targets(rules, source.config, options))
    working_config = rewrite_config(rules, source.config, evaluate_env(rules, source.config, working), working)
    for config in (new_config, working_config):
        _pin_head_dim(config, env)
    group = rules.depth.group if rules.depth is not None else "layer"
    engine = LayerwiseDown(source, spaces, new_config, working_config, match_all(source, rules, env), group, ids,
                           progress=progress)
    spill = SpillFolder(spill_folder)
    report = engine.run(lambda name, tensor: spill.add(name, tensor, torch_dtype(source.tensors[name].dtype)))
    spill.finish(new_config)
    # The refitted tensors are written as they are: an up plan that changes nothing, over the spill folder.
    # The plan says down, and its source is the real one: provenance, side files and the input checks are
    # the real source's. (seed: the write has no noise to seed; the summary and manifest record 0, as before.)
    spilled = open_source(spill_folder)
    storage = dict(dtype=options.dtype, max_shard_size=options.max_shard_size)
    copy = build_plan(spilled, rules, UpOptions(**storage))
    plan = replace(copy, source=source, options=DownOptions(**storage, targets=options.targets),
                   down=DownSection("refit", spill=spilled))
    return plan, report


def _pin_head_dim(config: dict, env: dict) -> None:
    """Heads keep their width when the residual stream is cut to a size the head count does not divide
    into it: write head_dim, which transformers otherwise derives as hidden_size // num_attention_heads."""
    head_dim = env.get("head_dim")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if isinstance(head_dim, int) and isinstance(hidden, int) and isinstance(heads, int) and heads and \
            config.get("head_dim") is None and hidden // heads != head_dim:
        config["head_dim"] = head_dim


def working_targets(rules, config: dict, options: DownOptions) -> dict:
    """The sizes the small stream runs at while a layer is refitted: the final hidden size and kv heads,
    every query head of the kept kv groups and the whole FFN (those are cut at their readers)."""
    from .planning.plan import current_units, down_ratios

    current = current_units(rules, config, options)
    ratios = down_ratios(rules, config, options)
    kv = round(current["num_key_value_heads"] * ratios["nkv"])
    group = current["num_attention_heads"] // current["num_key_value_heads"]
    heads = round(current["num_attention_heads"] * ratios["nh"])
    if heads > kv * group:
        raise TensorscaleError(
            f"refit keeps whole kv groups of {group} query heads and drops query heads inside them, so "
            f"{kv} kv heads hold at most {kv * group} query heads, not {heads}; keep more kv heads "
            f"(--num-key-value-heads) or ask for at most {kv * group} heads")
    return {"hidden_size": round(current["hidden_size"] * ratios["n"]), "num_key_value_heads": kv,
            "num_attention_heads": kv * group}


def asks_for_a_change(options: UpOptions) -> bool:
    """Whether `up` options ask for anything: growth in width (multipliers or targets) or depth, another
    storage dtype, or an untied head. Checked before a hub download; plan_changes_nothing after planning."""
    return (options.embed_dim_multiplier != 1 or options.up_proj_multiplier != 1 or bool(options.targets)
            or bool(options.add_layers) or options.duplicate_layers is not None or options.dtype != "keep"
            or options.untie_embeddings
            or options.insert_at is not None)  # --at without --add-layers: the depth planner says what is missing


def plan_changes_nothing(plan: Plan) -> bool:
    """True when writing the plan would reproduce the source: same config, same tensor names, shapes and
    dtypes (e.g. targets equal to the current sizes, or --dtype naming the dtype the model already has)."""
    if plan.config != plan.source.config:
        return False
    written = {t.name: (tuple(t.out_shape), t.out_dtype) for t in plan.tensors}
    present = {name: (tuple(info.shape), info.dtype) for name, info in plan.source.tensors.items()}
    return written == present


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


def produce_shard(plan: Plan, shard: ShardPlan, path: str, *, verify_files: bool = False, progress=None,
                  reader=None) -> list[str]:
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
            plan.nonfinite_inputs.update(produce_shard(plan, shard, os.path.join(folder, shard.filename),
                                                       verify_files=verify_files, progress=progress, reader=reader))
            _check_inputs_unchanged(plan.source)


def nonfinite_message(names) -> str:
    names = sorted(names)
    more = f" and {len(names) - 1} more tensor(s)" if len(names) > 1 else ""
    return f"the input holds NaN or Inf values in {names[0]}{more}"


def execute_plan(plan: Plan, output: str | None, *, force: bool = False, show_progress: bool = True,
                 verify_files: bool = False, manifest: bool = False, command: list[str] | None = None,
                 shard_runner: ShardRunner | None = None, check: Callable[[str], dict | None] | None = None,
                 allow_nonfinite: bool = False, extra_kept: tuple[str, ...] = ()) -> Result:
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
        log.info("writing %s: %d tensor(s) in %d shard(s), %d bytes, into %s", out, len(plan.tensors),
                 len(plan.shards), plan.total_bytes, folder.tmp)
        progress = bar.update if bar is not None else None
        (shard_runner or run_shards_in_order)(plan, folder.tmp, verify_files, progress)
        folder.drop_reservation()
        _check_inputs_unchanged(source)
        if plan.nonfinite_inputs:
            if not allow_nonfinite:
                raise TensorscaleError(f"{nonfinite_message(plan.nonfinite_inputs)}, so the output would compute NaN; "
                                       "nothing was written. Repair the checkpoint, or pass --allow-nonfinite to "
                                       "write it anyway")
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
    return Result(out, plan, time.perf_counter() - started, side, folder.stale_removed, verify_files,
                  os.path.join(out, MANIFEST_NAME) if manifest else None, warnings)


def _check_inputs_unchanged(source: ModelSource) -> None:
    """Fail cleanly if an input shard vanished or was rewritten while we read it (size or mtime changed)."""
    for path, header in source.headers.items():
        try:
            status = os.stat(path)
        except OSError:
            raise TensorscaleError(f"input shard {path} vanished during the run; nothing was written") from None
        if status.st_size != header.file_size or (header.mtime_ns and status.st_mtime_ns != header.mtime_ns):
            raise TensorscaleError(f"input shard {path} changed during the run; nothing was written, run again")


def run_up(source_label: str, output: str | None, options: UpOptions, *, rules_path: str | None = None,
           force: bool = False, show_progress: bool = True, verify_files: bool = False, manifest: bool = False,
           command: list[str] | None = None) -> Result:
    """`up` from Python; `command` is the command line the model card and metadata record (None: the API)."""
    plan = plan_conversion(source_label, options, rules_path)
    return execute_plan(plan, output, force=force, show_progress=show_progress, verify_files=verify_files,
                        manifest=manifest, command=command)
