"""The provenance of every output: a README.md model card, and the same facts in the safetensors metadata.

A resized model that travels without its history is a model nobody can trust or cite, so each output says
where it came from (`base_model`, the hub revision), under which licence (carried from the source's own
card), how it was made (the exact command and tensorscale version), what changed (parameters, bytes and
every config value before and after) and, when `up --verify` ran, how close its logits are to the source's.

The card opens with YAML front matter as the Hugging Face hub reads it (written with yaml.safe_dump, so it
always parses). The shards' ``__metadata__`` holds the same facts as string values (safetensors allows only
strings there), under ``tensorscale.*`` keys beside ``format: pt``; the verify numbers are in the card only,
because the shards are written before the check runs. Nothing here depends on the time of the run, so the
same command gives the same bytes.
"""

from __future__ import annotations

import json
import os
import shlex

import yaml

from .. import __version__
from ..reading.cache_layout import allowed_root, hub_repo_folder, link_allowed, snapshot_revision

CARD_NAME = "README.md"
MAX_SOURCE_CARD_BYTES = 1 << 20
# Front matter fields of the source card that still hold for the rewritten model.
CARRIED_FIELDS = ("license", "license_name", "license_link", "language", "pipeline_tag")
TAGS = {"up": ["tensorscale", "hypercloning"], "down": ["tensorscale", "downscaled"]}
WHAT = {"up": "widened by HyperCloning (function-preserving)", "down": "narrowed by cluster folding"}


class _PlainLoader(yaml.SafeLoader):
    """safe_load without aliases: a model card is plain data, and aliases can expand without bound."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("aliases are not allowed in a model card")
        return super().compose_node(parent, index)


def front_matter(text: str) -> dict:
    """The YAML front matter of a model card (between the opening and closing `---` lines), {} if none."""
    lines = text.replace("\r\n", "\n").split("\n")
    if not lines or lines[0].strip() != "---":
        return {}
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        return {}
    loader = _PlainLoader("\n".join(lines[1:end]))  # a SafeLoader: plain data only, never Python objects
    try:
        data = loader.get_single_data()
    except yaml.YAMLError:
        return {}
    finally:
        loader.dispose()
    return data if isinstance(data, dict) else {}


def read_source_card(folder: str) -> dict:
    """The source model card's front matter; {} when there is none, it is unreadable or a link leads out."""
    path = os.path.join(folder, CARD_NAME)
    if not os.path.isfile(path) or not link_allowed(path, allowed_root(folder)):
        return {}
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_SOURCE_CARD_BYTES)
        return front_matter(raw.decode("utf-8", errors="replace"))
    except OSError:
        return {}


def base_model(source) -> str:
    """The hub id where there is one (also for a snapshot folder given by path), else the folder's name."""
    if source.hub_id:
        return source.hub_id
    repo = hub_repo_folder(source.folder)
    if repo:
        return os.path.basename(repo)[len("models--") :].replace("--", "/")
    return os.path.basename(os.path.realpath(source.folder))


def card_facts(plan, command: list[str] | None) -> dict:
    """Everything the card and the metadata say, from the plan and the command that made it."""
    source = plan.source
    card = read_source_card(source.folder) if not source.folder.startswith("hub://") else {}
    mode = plan.options.mode
    changed = {
        key: [source.config.get(key), value]
        for key, value in plan.config.items()
        if source.config.get(key) != value and key != "transformers_version"
    }
    return {
        "base_model": base_model(source),
        "revision": snapshot_revision(source.folder) if source.hub_id else None,
        "carried": {key: card[key] for key in CARRIED_FIELDS if card.get(key) is not None},
        "operation": mode,
        "tags": list(TAGS[mode]),
        "command": shlex.join(command) if command else "(the tensorscale Python API)",
        "version": __version__,
        "rules": plan.rules.name,
        "parameters": [sum(info.numel for info in source.tensors.values()), plan.total_parameters],
        "bytes": [source.total_bytes, plan.total_bytes],
        "config_changes": changed,
        "notes": list(plan.notes),
    }


def safetensors_metadata(facts: dict) -> dict[str, str]:
    """The facts as the string-to-string map a safetensors header's __metadata__ allows."""
    meta = {
        "format": "pt",
        "base_model": facts["base_model"],
        "tensorscale.version": facts["version"],
        "tensorscale.operation": facts["operation"],
        "tensorscale.command": facts["command"],
        "tensorscale.rules": facts["rules"],
        "tensorscale.source_parameters": str(facts["parameters"][0]),
        "tensorscale.parameters": str(facts["parameters"][1]),
        "tensorscale.source_bytes": str(facts["bytes"][0]),
        "tensorscale.bytes": str(facts["bytes"][1]),
        "tensorscale.config_changes": json.dumps(facts["config_changes"], sort_keys=True),
        "tags": ",".join(facts["tags"]),
    }
    if facts["revision"]:
        meta["base_model_revision"] = facts["revision"]
    if "license" in facts["carried"]:
        meta["license"] = str(facts["carried"]["license"])
    return meta


def card_text(facts: dict, verify: dict | None = None) -> str:
    """The README.md: front matter for the hub, then the provenance for people."""
    header = {"base_model": facts["base_model"]}
    header.update(facts["carried"])
    header["library_name"] = "transformers"
    header["tags"] = facts["tags"]
    lines = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip("\n"), "---", ""]
    base = facts["base_model"]
    at = f" at revision `{facts['revision']}`" if facts["revision"] else ""
    lines += [
        f"# {base} ({facts['operation']})",
        "",
        f"This model is `{base}`{at}, {WHAT[facts['operation']]} by tensorscale {facts['version']} "
        f"(rules `{facts['rules']}`). It was made with:",
        "",
        "```sh",
        facts["command"],
        "```",
        "",
    ]
    if "license" not in facts["carried"]:
        lines += ["The source model card states no licence: check the source's terms before you share this model.", ""]
    lines += [
        "| | before | after |",
        "|---|---|---|",
        f"| parameters | {facts['parameters'][0]:,} | {facts['parameters'][1]:,} |",
        f"| bytes | {facts['bytes'][0]:,} | {facts['bytes'][1]:,} |",
    ]
    for key, (old, new) in facts["config_changes"].items():
        lines.append(f"| `{key}` | {json.dumps(old)} | {json.dumps(new)} |")
    lines.append("")
    for note in facts["notes"]:
        lines += [f"Note: {note}.", ""]
    if verify is not None:
        verdict = "passed" if verify["passed"] else "FAILED"
        lines += [
            "## Verification",
            "",
            f"`tensorscale verify` {verdict} at tolerance {verify['tolerance']:g} on {verify['inputs']} "
            f"({verify['positions']} positions):",
            "",
            "| measure | value |",
            "|---|---|",
            f"| relative logit error (max\\|Δlogit\\| / max\\|logit\\|) | {_number(verify['relative_logit_error'])} |",
            f"| KL(source ‖ this model), nats per position | {_number(verify['kl_mean'])} |",
            f"| top-1 agreement | {verify['top1_agreement']:.2%} |",
            f"| perplexity, source / this model | {_number(verify['perplexity_source'])} / "
            f"{_number(verify['perplexity_output'])} |",
            "",
        ]
    else:
        lines += ["Check it yourself: `tensorscale verify SOURCE THIS_FOLDER` compares the two models' logits.", ""]
    return "\n".join(lines)


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"
