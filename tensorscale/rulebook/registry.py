"""Find the rules file for a model: the user's ``--rules`` file, or a shipped one chosen from config.json."""

from __future__ import annotations

from functools import lru_cache

from ..errors import TensorscaleError
from .schema import RuleSet, load_rules_file, load_rules_text, resolved_data
from .shipped import BASE_PREFIX, shipped_files


@lru_cache(maxsize=1)
def _shipped() -> dict[str, tuple[RuleSet, str]]:
    rules = {}
    for stem, text in sorted(shipped_files().items()):
        if stem.startswith(BASE_PREFIX):
            continue  # a base for `extends`, not an architecture
        rule_set = load_rules_text(text, f"rules/{stem}.yaml")
        rules[rule_set.name] = (rule_set, text)
    return rules


def shipped_rules() -> dict[str, RuleSet]:
    return {name: rule_set for name, (rule_set, _) in _shipped().items()}


def shipped_text(name: str) -> str:
    """The YAML text of a shipped rules file (or of a base such as _decoder), comments included."""
    if name not in shipped_files():
        find_shipped(name)  # the one-line error that lists where to look
    return shipped_files()[name]


def resolved_text(name: str) -> str:
    """A shipped rules file with its `extends:` base merged in, as YAML (no comments): what the engine reads,
    and a complete file to copy."""
    import yaml

    class Dumper(yaml.SafeDumper):
        """Mappings as blocks, lists of plain values ([heads, hidden.in]) on one line, as the files are written."""

        def represent_list(self, data):
            flow = all(not isinstance(item, (dict, list)) for item in data) or all(
                isinstance(item, list) for item in data
            )
            return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

        def increase_indent(self, flow=False, indentless=False):
            return super().increase_indent(flow, False)  # "tensors:\n  - match: ...", as the files are written

    Dumper.add_representer(list, Dumper.represent_list)
    data = resolved_data(shipped_text(name), f"rules/{name}.yaml")
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=120)


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
