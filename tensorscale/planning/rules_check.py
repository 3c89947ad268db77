"""`rules check`: how a rules file fits a checkpoint, without planning shapes or touching data."""

from __future__ import annotations

from ..errors import TensorscaleError
from ..reading.source import ModelSource
from ..rulebook.evaluate import UNIT_RATIOS, evaluate_rules, match_rule, rules_env
from ..rulebook.registry import resolve_rules


def check_rules(source: ModelSource, rules_path: str | None) -> dict:
    rule_set = resolve_rules(source.config, rules_path)
    report = {
        "rules": rule_set.name,
        "path": rule_set.path,
        "tensors": len(source.tensors),
        "unmatched_tensors": [],
        "unused_rules": [],
        "matches": {},
        "error": None,
    }
    try:
        env = evaluate_rules(rule_set, rules_env(source.config, UNIT_RATIOS))  # the model at its own size
    except TensorscaleError as exc:
        report["error"] = str(exc)
        return report
    hits = {rule.index: 0 for rule in rule_set.tensors}
    for name in source.tensors:
        rule, _ = match_rule(rule_set, name, env)
        if rule is None and rule_set.unmatched != "copy":
            report["unmatched_tensors"].append(name)
        for candidate in rule_set.tensors:
            if candidate.regex.fullmatch(name):
                hits[candidate.index] += 1
    report["matches"] = {rule.label: hits[rule.index] for rule in rule_set.tensors}
    report["unused_rules"] = [rule.label for rule in rule_set.tensors if hits[rule.index] == 0]
    return report
