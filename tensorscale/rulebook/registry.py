"""Find the rules file for a model: the user's ``--rules`` file, or a shipped one chosen from config.json."""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources

from ..errors import TensorscaleError
from .schema import RuleSet, load_rules_file, load_rules_text


def _shipped_files() -> dict[str, str]:
    """Shipped rules: file stem -> YAML text. They live in top-level rules/, installed as tensorscale.rules_data."""
    found = {}
    try:
        folder = resources.files("tensorscale.rules_data")
        for entry in folder.iterdir():
            if entry.name.endswith(".yaml"):
                found[entry.name[: -len(".yaml")]] = entry.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    if not found:  # running from a source tree without installing
        here = os.path.join(os.path.dirname(__file__), "..", "..", "rules")
        if os.path.isdir(here):
            for name in os.listdir(here):
                if name.endswith(".yaml"):
                    with open(os.path.join(here, name), encoding="utf-8") as handle:
                        found[name[: -len(".yaml")]] = handle.read()
    return found


@lru_cache(maxsize=1)
def _shipped() -> dict[str, tuple[RuleSet, str]]:
    rules = {}
    for stem, text in sorted(_shipped_files().items()):
        rule_set = load_rules_text(text, f"rules/{stem}.yaml")
        rules[rule_set.name] = (rule_set, text)
    return rules


def shipped_rules() -> dict[str, RuleSet]:
    return {name: rule_set for name, (rule_set, _) in _shipped().items()}


def shipped_text(name: str) -> str:
    """The YAML text of a shipped rules file, comments included."""
    find_shipped(name)
    return _shipped()[name][1]


def find_shipped(name: str) -> RuleSet:
    rules = shipped_rules()
    if name in rules:
        return rules[name]
    raise TensorscaleError(f"no shipped rules named {name!r}; `tensorscale rules list` shows them")


def detect_rules(config: dict) -> RuleSet | None:
    """The shipped rules file for this config: by model_type first, then by architectures."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    rules = shipped_rules().values()
    for rule_set in rules:
        if model_type and model_type in rule_set.detect_model_types:
            return rule_set
    for rule_set in rules:
        if any(arch in rule_set.detect_architectures for arch in architectures):
            return rule_set
    return None


def resolve_rules(config: dict, rules_path: str | None) -> RuleSet:
    if rules_path:
        return load_rules_file(rules_path)
    rule_set = detect_rules(config)
    if rule_set is None:
        what = config.get("model_type") or (config.get("architectures") or ["unknown"])[0]
        raise TensorscaleError(
            f"no shipped rules for architecture {what!r}; scaffold a rules file with `tensorscale rules new MODEL "
            "> rules.yaml`, settle its DECIDE comments, and pass it with --rules rules.yaml"
        )
    return rule_set
