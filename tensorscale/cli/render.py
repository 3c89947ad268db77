"""Text for people and dicts for `--json`: how the CLI shows descriptions, plans and summaries."""

from __future__ import annotations


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def human_count(n: int) -> str:
    for threshold, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= threshold:
            return f"{n / threshold:.2f}{suffix}"
    return str(n)


def _table(rows: list[tuple], header: tuple | None = None) -> str:
    all_rows = ([header] if header else []) + [tuple(str(c) for c in row) for row in rows]
    if not all_rows:
        return ""
    widths = [max(len(str(row[i])) for row in all_rows) for i in range(len(all_rows[0]))]
    lines = []
    for index, row in enumerate(all_rows):
        lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
        if header and index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def desc_text(data: dict) -> str:
    lines = [f"{data['input']}: {data['architecture']} ({data['model_type']})", ""]
    lines.append(_table([(key, value) for key, value in data["config"].items()]))
    lines.append("")
    total = data["total_parameters"]
    rows = [
        (component, f"{count:,}", f"{100 * count / max(1, total):.1f}%")
        for component, count in data["parameters_by_component"].items()
    ]
    rows.append(("total", f"{total:,}", f"({human_count(total)})"))
    lines.append(_table(rows, ("component", "parameters", "share")))
    if data["tied_embeddings"]:
        lines.append("head: tied to the input embeddings")
    lines.append("")
    lines.append("dtypes: " + ", ".join(f"{dtype} {human_bytes(n)}" for dtype, n in data["dtypes"].items()))
    lines.append(f"{data['tensors']} tensors in {len(data['shards'])} shard(s), {human_bytes(data['total_bytes'])}")
    return "\n".join(lines)


def plan_data(plan, output: str) -> dict:
    options = plan.options.recorded()
    return {
        "input": plan.source.label,
        "output": output,
        "rules": plan.rules.name,
        **{
            key: options[key]
            for key in ("mode", "embed_dim_multiplier", "up_proj_multiplier", "snr_db", "strategy", "targets")
        },
        "spaces": {
            name: layout.describe() for name, layout in (plan.layouts or {}).items() if layout.target != layout.size
        },
        "source_parameters": sum(info.numel for info in plan.source.tensors.values()),
        "total_parameters": plan.total_parameters,
        "source_bytes": plan.source.total_bytes,
        "total_bytes": plan.total_bytes,
        "config_changes": {
            key: {"from": plan.source.config.get(key), "to": value}
            for key, value in plan.config.items()
            if plan.source.config.get(key) != value
        },
        "tensors": [
            {
                "name": tensor.name,
                "source": tensor.source.name,
                "rule": tensor.rule,
                "ops": [op.describe() for op in tensor.ops],
                "in_shape": list(tensor.source.shape),
                "out_shape": list(tensor.out_shape),
                "in_dtype": tensor.source.dtype,
                "out_dtype": tensor.out_dtype,
                "streamed_in_row_chunks": tensor.row_map is not None,
            }
            for tensor in plan.tensors
        ],
        "dropped": plan.dropped,
        "notes": list(plan.notes),
        "depth": plan.depth.describe() if getattr(plan, "depth", None) else None,
        "shards": [
            {"file": shard.filename, "tensors": len(shard.tensors), "bytes": shard.nbytes} for shard in plan.shards
        ],
    }


def plan_text(data: dict) -> str:
    rows = []
    for tensor in data["tensors"]:
        name = tensor["name"] if tensor["name"] == tensor["source"] else f"{tensor['name']} <- {tensor['source']}"
        shape = f"{tensor['in_shape']} -> {tensor['out_shape']}"
        dtype = (
            tensor["in_dtype"]
            if tensor["in_dtype"] == tensor["out_dtype"]
            else f"{tensor['in_dtype']}->{tensor['out_dtype']}"
        )
        rows.append((name, shape, dtype, " -> ".join(tensor["ops"]) or "copy", tensor["rule"]))
    if data.get("mode") == "down":
        how = "down"
    else:
        how = _growth(data) + (f", noise {data['snr_db']:g} dB" if data["snr_db"] is not None else "")
    lines = [
        f"plan: {data['input']} -> {data['output']} (rules {data['rules']}, {how})",
        "",
        _table(rows, ("tensor", "shape", "dtype", "ops", "rule")),
        "",
    ]
    if data.get("spaces"):
        lines.append("spaces (" + ("zero-pad" if data.get("strategy") == "pad" else "clone") + "):")
        lines.extend(f"  {name}: {what}" for name, what in data["spaces"].items())
    if data["dropped"]:
        lines.append(f"dropped (not written): {', '.join(data['dropped'])}")
    if data.get("depth"):
        lines.append(f"depth: {data['depth']['text']}")
    if data["config_changes"]:
        lines.append("config: " + ", ".join(f"{k} {v['from']} -> {v['to']}" for k, v in data["config_changes"].items()))
    lines.append(
        f"parameters: {human_count(data['source_parameters'])} -> {human_count(data['total_parameters'])}; "
        f"bytes: {human_bytes(data['source_bytes'])} -> {human_bytes(data['total_bytes'])}"
    )
    lines.append(_table([(s["file"], f"{s['tensors']} tensors", human_bytes(s["bytes"])) for s in data["shards"]]))
    lines.extend(f"note: {note}" for note in data.get("notes") or [])
    if data.get("predicted_damage"):
        lines.append(predicted_damage_text(data["predicted_damage"]))
    lines.append("nothing was written (dry run)")
    return "\n".join(lines)


def up_summary(summary: dict) -> str:
    return (
        f"wrote {summary['output']}: {human_count(summary['source_parameters'])} -> "
        f"{human_count(summary['total_parameters'])} parameters, {human_bytes(summary['total_bytes'])} in "
        f"{len(summary['shards'])} shard(s), {summary['seconds']:.1f} s (rules {summary['rules']}, "
        f"{_growth(summary)})"
    ) + (f"\ndepth: {summary['depth']['text']}" if summary.get("depth") else "")  # notes go to stderr


def _growth(data: dict) -> str:
    """How `up` grows the model, for the plan header and the up summary: target sizes or multipliers."""
    targets = data.get("targets") or {}
    how = ", ".join(f"{key}={value}" for key, value in targets.items()) or (
        f"n={data['embed_dim_multiplier']}, m={data['up_proj_multiplier']}"
    )
    return how + (", zero-pad" if data.get("strategy") == "pad" else "")


def down_summary(summary: dict) -> str:
    exact = (
        f"{summary['exact_copies']}/{summary['clusterings']} clusterings merged exact copies"
        if summary.get("method", "fold") == "fold"
        else "units kept and readers re-solved layer by layer (refit)"
    )
    retied = f"; {summary['retied']} equals the embedding again, so the output is tied" if summary.get("retied") else ""
    removed = summary.get("removed_layers") or []
    depth = f"; layer{'s' if len(removed) > 1 else ''} {', '.join(map(str, removed))} removed" if removed else ""
    return (
        f"wrote {summary['output']}: {human_count(summary['source_parameters'])} -> "
        f"{human_count(summary['total_parameters'])} parameters, {human_bytes(summary['total_bytes'])} in "
        f"{len(summary['shards'])} shard(s), {summary['seconds']:.1f} s (rules {summary['rules']}); "
        f"{exact}{retied}{depth}"
    )


DAMAGE_WARNING_KL = 0.1  # nats per token on the calibration text: beyond this the loss is plain to see


def _estimated_on(calibration: dict) -> str:
    """The text refit's damage estimate was measured on."""
    where = "the calibration text" if calibration["source"] == "file" else "text the model sampled itself"
    return f"windows of {where} the refit did not see" if calibration.get("held_out") else where


def damage_note(calibration: dict) -> str:
    """What a refitted (not exact) down costs, estimated on the calibration text, and what to do about it."""
    line = (
        f"tensorscale: estimated damage on {_estimated_on(calibration)}: KL {calibration['kl']:.3f} nats/token, "
        f"perplexity x{calibration['ppl_ratio']:.2f} (text of another kind may show more)"
    )
    if calibration["kl"] > DAMAGE_WARNING_KL:
        line += (
            "\ntensorscale: warning: this is not an exact inverse of `up`; the smaller model needs healing "
            "(continued training) before it matches the original"
        )
    return line


def predicted_damage_text(prediction: dict) -> str:
    """plan --predict's line: none where the fold merges copies, else the refit's estimate, as down says it."""
    if prediction["exact"]:
        return "predicted damage: none (the fold merges exact copies: the logits match)"
    return (
        f"predicted damage (refit on {prediction['calibration_tokens']:,} tokens; on {_estimated_on(prediction)}): "
        f"KL {prediction['kl']:.3f} nats/token, perplexity x{prediction['ppl_ratio']:.2f} "
        "(text of another kind may show more)"
    )


def rules_list_text(rows: list[dict]) -> str:
    table = _table(
        [(row["name"], ", ".join(row["model_types"]) or "-", row["description"]) for row in rows],
        ("rules", "model_type", "description"),
    )
    return (
        table
        + "\n\nA model's config.json model_type selects its rules; `tensorscale rules new MODEL` scaffolds new ones."
    )


def check_text(report: dict) -> str:
    lines = [f"rules {report['rules']} ({report['path']}) against {report['tensors']} tensors"]
    if report.get("error"):
        lines.append(f"error: {report['error']}")
        return "\n".join(lines)
    if report["unmatched_tensors"]:
        lines.append(f"{len(report['unmatched_tensors'])} tensor(s) match no rule:")
        lines.extend(f"  {name}" for name in report["unmatched_tensors"])
    else:
        lines.append("every tensor matches a rule")
    if report["unused_rules"]:
        lines.append(
            f"{len(report['unused_rules'])} rule(s) match no tensor (fine for optional tensors such as biases):"
        )
        lines.extend(f"  {label}" for label in report["unused_rules"])
    return "\n".join(lines)
