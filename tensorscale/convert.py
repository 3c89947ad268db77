"""One conversion end to end: open the source, plan, write every shard into a temporary folder, commit."""

from __future__ import annotations

import logging
from dataclasses import replace

from .errors import CannotFold, TensorscaleError
from .planning import depth
from .planning.plan import DownOptions, DownSection, Plan, UpOptions, build_plan, pin_head_dim
from .progress import progress_for
from .reading.source import open_source
from .rewrite import Result, execute_plan
from .rulebook.registry import resolve_rules
from .writing.output_folder import SpillWorkspace

log = logging.getLogger(__name__)  # `-v` shows these lines on stderr


def plan_conversion(
    source_label: str, options: UpOptions, rules_path: str | None = None, *, headers_only: bool = False
) -> Plan:
    source = open_source(source_label, headers_only=headers_only)
    log.info(
        "opened %s (%s): %d tensor(s) in %d shard(s)",
        source.label,
        source.folder,
        len(source.tensors),
        len(source.shards),
    )
    rules = resolve_rules(source.config, rules_path)
    log.info("rules %s", rules.name)
    plan = build_plan(source, rules, options)
    log.info("planned %d tensor(s) in %d shard(s), %d bytes", len(plan.tensors), len(plan.shards), plan.total_bytes)
    return plan


def plan_down(source_label: str, options: DownOptions, rules_path: str | None = None, progress=None) -> Plan:
    """Plan `down`: read the weights once to cluster every space's units, then plan the merges.

    Unlike `up`, this reads tensor data (the clustering needs it), so even `plan` takes a full read."""
    from .folding.analysis import analyse
    from .folding.retie import find_retie
    from .heap import release_free_memory
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


def plan_down_by_method(
    source_label: str,
    options: DownOptions,
    rules_path: str | None,
    method: str,
    text: str | None,
    tokens: int,
    spill_folder: str,
    show_progress: bool = False,
) -> tuple[Plan, dict | None]:
    """`down`'s plan by `method`: "fold" (cluster-fold, exact on copies), "refit" (layer-wise select and
    refit, folding.layerwise), or "auto": fold where every clustering merged copies (a HyperCloned model),
    else refit. Returns the plan and, for refit, its calibration report (None for fold)."""
    if method not in ("auto", "fold", "refit"):
        raise TensorscaleError(f"unknown down method {method!r}; use auto, fold or refit")
    if text is not None and method == "fold":
        raise TensorscaleError("--calibration is for --method refit (fold merges copies from the weights alone)")
    measure_depth = options.remove_layers and options.remove_at is None  # only refit measures which layers
    if method == "fold":
        return plan_down(source_label, options, rules_path, progress=show_progress), None
    if method == "auto" and not measure_depth:
        try:
            plan = plan_down(source_label, options, rules_path, progress=show_progress)
        except CannotFold:  # sizes folding cannot make (a LayerNorm stream folds only by whole divisors):
            plan = None  # there are no copies to merge, so refit, which says if it cannot either
        if plan is not None and plan.down.exact:
            return plan, None
        del plan
    return _refit_with_calibration(source_label, options, rules_path, text, tokens, spill_folder, show_progress)


def _refit_with_calibration(source_label, options, rules_path, text, tokens, spill_folder, show_progress):
    from .folding.calibration import calibration_ids, self_generated_ids, window_length
    from .gguf_import import runnable_source
    from .inference.loading import require_transformers

    require_transformers("down (refit)")
    _check_refit_possible(source_label, options, rules_path)  # before minutes of sampling, not after
    model = runnable_source(source_label)
    window = window_length(model.config)
    if text is not None:
        ids = calibration_ids(model.folder, model.label, text, tokens, sequence=window)
    else:
        bar = progress_for(tokens, "down: sampling calibration text", enabled=show_progress, unit="tokens")
        ids = self_generated_ids(
            model.folder,
            model.label,
            model.config,
            tokens,
            seed=options.seed,
            sequence=window,
            progress=bar.update if bar else None,
        )
        if bar:
            bar.close()
    layers = int(model.config.get("num_hidden_layers") or 0)
    first_pass = (
        options.targets.get("hidden_size")
        or options.embed_dim_divisor
        or (options.remove_layers and not options.remove_at)
    )
    passes = 2 if first_pass else 1
    bar = progress_for(passes * layers, "down: refitting layers", enabled=show_progress, unit="layers")
    try:
        return plan_refit_down(
            source_label,
            options,
            rules_path,
            ids,
            spill_folder,
            progress=(lambda kind, layer: bar.update(1)) if bar else None,
        )
    finally:
        if bar:
            bar.close()


def _check_refit_possible(source_label: str, options: DownOptions, rules_path: str | None) -> None:
    from .folding.analysis import match_all
    from .folding.layerwise import classify
    from .planning.plan import checked_down_config, evaluate_env

    source = open_source(source_label, headers_only=True)
    rules = resolve_rules(source.config, rules_path)
    env = evaluate_env(rules, source.config, options)
    classify(match_all(source, rules, env), rules.depth.group if rules.depth is not None else "layer")
    working = DownOptions(targets=working_targets(rules, source.config, options))  # head counts refit can make
    from .inference.layer_slot import LayerSlot

    for sizes in (options, working):  # the output and the small stream must both be models transformers builds
        try:
            config = checked_down_config(rules, source.config, sizes)  # the rules' own checks first
            LayerSlot.build_config(config, "down (refit)")
        except TensorscaleError as exc:
            raise TensorscaleError(
                f"{exc} (refit runs the kept kv groups' {working.targets['num_attention_heads']} query heads while "
                "it re-solves a layer; choose sizes every head count divides)"
                if sizes is working
                else str(exc)
            ) from None
    if options.remove_layers:  # the depth section, the layer count and any --at, before minutes of work
        count = source.config.get(rules.depth.count) if rules.depth is not None else None
        at = options.remove_at
        if at is None and isinstance(count, int) and not isinstance(count, bool):
            at = tuple(range(min(options.remove_layers, count)))
        depth.removal_layers(rules, source.config, at if at is not None else ())


def refit_workspace(output: str | None) -> SpillWorkspace:
    """The temporary folder refitted tensors spill to, beside OUT (output_folder.SpillWorkspace)."""
    return SpillWorkspace(output)


def plan_refit_down(
    source_label: str, options: DownOptions, rules_path: str | None, ids, spill_folder: str, progress=None
) -> tuple[Plan, dict]:
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
        pin_head_dim(config, env)
    group = rules.depth.group if rules.depth is not None else "layer"
    engine = LayerwiseDown(
        source,
        spaces,
        new_config,
        working_config,
        match_all(source, rules, env),
        group,
        ids,
        progress=progress,
        remove_layers=options.remove_layers,
        remove_at=options.remove_at,
    )
    spill = SpillFolder(spill_folder)
    report = engine.run(
        lambda name, tensor, source_name: spill.add(name, tensor, torch_dtype(source.tensors[source_name].dtype))
    )
    if report["removed_layers"]:
        layers = depth.removal_layers(rules, source.config, report["removed_layers"])
        depth.rewrite_config(rules, source.config, new_config, layers)
    spill.finish(new_config)
    # The refitted tensors are written as they are: an up plan that changes nothing, over the spill folder.
    # The plan says down, and its source is the real one: provenance, side files and the input checks are
    # the real source's. (seed: the write has no noise to seed; the summary and manifest record 0, as before.)
    spilled = open_source(spill_folder)
    storage = dict(dtype=options.dtype, max_shard_size=options.max_shard_size)
    copy = build_plan(spilled, rules, UpOptions(**storage))
    plan = replace(
        copy,
        source=source,
        options=DownOptions(**storage, targets=options.targets),
        down=DownSection("refit", spill=spilled),
    )
    return plan, report


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
            f"(--num-key-value-heads) or ask for at most {kv * group} heads"
        )
    return {
        "hidden_size": round(current["hidden_size"] * ratios["n"]),
        "num_key_value_heads": kv,
        "num_attention_heads": kv * group,
    }


def asks_for_a_change(options: UpOptions) -> bool:
    """Whether `up` options ask for anything: growth in width (multipliers or targets) or depth, another
    storage dtype, or an untied head. Checked before a hub download; plan_changes_nothing after planning."""
    return (
        options.embed_dim_multiplier != 1
        or options.up_proj_multiplier != 1
        or bool(options.targets)
        or bool(options.add_layers)
        or options.duplicate_layers is not None
        or options.dtype != "keep"
        or options.untie_embeddings
        or options.insert_at is not None
    )  # --at without --add-layers: the depth planner says what is missing


def plan_changes_nothing(plan: Plan) -> bool:
    """True when writing the plan would reproduce the source: same config, same tensor names, shapes and
    dtypes (e.g. targets equal to the current sizes, or --dtype naming the dtype the model already has)."""
    if plan.config != plan.source.config:
        return False
    written = {t.name: (tuple(t.out_shape), t.out_dtype) for t in plan.tensors}
    present = {name: (tuple(info.shape), info.dtype) for name, info in plan.source.tensors.items()}
    return written == present


def run_up(
    source_label: str,
    output: str | None,
    options: UpOptions,
    *,
    rules_path: str | None = None,
    force: bool = False,
    show_progress: bool = True,
    verify_files: bool = False,
    manifest: bool = False,
    command: list[str] | None = None,
) -> Result:
    """`up` from Python; `command` is the command line the model card and metadata record (None: the API)."""
    plan = plan_conversion(source_label, options, rules_path)
    return execute_plan(
        plan,
        output,
        force=force,
        show_progress=show_progress,
        verify_files=verify_files,
        manifest=manifest,
        command=command,
    )
