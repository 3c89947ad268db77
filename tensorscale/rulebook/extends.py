"""`extends:`: a rules file that refines another, so that architectures which share most of their rules
(the Llama-like decoders) write only what differs.

``extends: NAME`` names a shipped rules file (``rules/NAME.yaml``; files whose name starts with ``_``, such
as ``_decoder``, are bases: they are only extended, never detected or listed). The base is resolved first
(it may extend another), then the refining file is merged onto it, as plain YAML data, before anything is
validated; the merged result is what ``tensorscale rules show NAME --resolved`` prints. Merge semantics:

- ``name``, ``description`` and ``detect`` are the refining file's own: never inherited.
- Mappings ``let``, ``spaces``, ``config``, ``targets`` and ``depth`` are merged key by key: a key the refining
  file gives replaces the base's value whole (a space's whole definition, a config expression, depth's
  ``lists``) and keeps the base's position (``let`` and ``config`` are evaluated in order); a new key is
  added after the base's keys; a key given as ``null`` (``~``) removes the base's key.
- ``checks`` is extended: the base's checks, then the refining file's.
- ``tensors`` and ``create`` are merged entry by entry. A tensor rule is identified by its ``match`` and
  ``when`` (a create rule by its ``name``): a refining entry with the key of a base entry replaces that
  entry whole, in place, so rule order (first match wins) and rule numbers are kept; ``omit: true`` removes
  it instead; a new entry is added at the end, or right after the base's last rule whose ``match`` is
  given by ``after:``.
- Any other key (``unmatched``) is replaced.
"""

from __future__ import annotations

from ..errors import TensorscaleError

MAX_EXTENDS_DEPTH = 8
MERGED_MAPPINGS = ("let", "spaces", "config", "depth", "targets")
OWN_KEYS = ("name", "description", "detect", "extends")


class ExtendsError(TensorscaleError):
    pass


def resolve_extends(data, path: str, bases, chain: tuple[str, ...] = ()) -> object:
    """`data` with its `extends:` base merged in (recursively). `bases(name)` returns the raw data of a
    shipped rules file, or None when there is none; errors are one line naming `path` and the fix."""
    if not isinstance(data, dict) or "extends" not in data:
        return data
    name = data["extends"]
    where = path if not chain else f"{path} (through rules/{chain[-1]}.yaml)"
    if not isinstance(name, str) or not name:
        raise ExtendsError(f"{where}: extends must name a shipped rules file, e.g. extends: _decoder")
    if name in chain:
        cycle = " -> ".join([*chain, name])
        raise ExtendsError(f"{where}: extends cycle {cycle}; remove the extends that closes it")
    if len(chain) >= MAX_EXTENDS_DEPTH:
        raise ExtendsError(
            f"{where}: extends is nested more than {MAX_EXTENDS_DEPTH} deep; extend a file nearer the base"
        )
    base = bases(name)
    if base is None:
        raise ExtendsError(
            f"{where}: extends {name!r} names no shipped rules file; `tensorscale rules list` shows "
            "them (bases such as _decoder too), or copy the base's rules into this file"
        )
    if not isinstance(base, dict):
        raise ExtendsError(f"{where}: the base rules/{name}.yaml is not a YAML mapping")
    base = resolve_extends(base, path, bases, (*chain, name))
    return merge(base, data, path if not chain else f"rules/{chain[-1]}.yaml")


def merge(base: dict, refining: dict, path: str) -> dict:
    """The refining file's data merged onto its (resolved) base, as the module docstring says."""
    merged = {key: refining[key] for key in OWN_KEYS if key in refining and key != "extends"}
    merged.update((key, value) for key, value in base.items() if key not in OWN_KEYS)
    for key, value in refining.items():
        if key == "extends":
            continue
        if key in MERGED_MAPPINGS and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_mapping(merged[key], value)
        elif key == "checks" and isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = [*merged[key], *value]
        elif key in ("tensors", "create") and isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = _merge_entries(merged[key], value, key, path)
        else:
            merged[key] = value
    return merged


def _merge_mapping(base: dict, refining: dict) -> dict:
    merged = dict(base)
    for key, value in refining.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def _entry_key(entry, section: str):
    if not isinstance(entry, dict):
        return None
    if section == "create":
        return entry.get("name")
    return (entry.get("match"), entry.get("when"))


def _merge_entries(base: list, refining: list, section: str, path: str) -> list:
    merged = list(base)
    for i, entry in enumerate(refining):
        where = f"{path}: {section}[{i}]"
        if not isinstance(entry, dict):
            raise ExtendsError(f"{where} must be a mapping")
        entry = dict(entry)
        omit, after = entry.pop("omit", False), entry.pop("after", None)
        if not isinstance(omit, bool):
            raise ExtendsError(f"{where}: omit must be true or false")
        key = _entry_key(entry, section)
        at = next((j for j, old in enumerate(merged) if _entry_key(old, section) == key), None)
        if omit:
            if at is None:
                raise ExtendsError(
                    f"{where}: omit: true removes a base rule, but the base has none with this "
                    f"{'name' if section == 'create' else 'match and when'}; check them with "
                    "`tensorscale rules show BASE --resolved`"
                )
            if set(entry) - {"match", "when", "name"}:
                raise ExtendsError(
                    f"{where}: an omitted rule is given by its match (and when) alone; drop its other keys"
                )
            del merged[at]
        elif at is not None:
            if after is not None:
                raise ExtendsError(f"{where}: 'after' places a new rule; this one replaces the base's in place")
            merged[at] = entry
        elif after is not None:
            places = [j for j, old in enumerate(merged) if isinstance(old, dict) and old.get("match") == after]
            if not places:
                raise ExtendsError(
                    f"{where}: after {after!r} matches no base rule's 'match'; copy it from "
                    "`tensorscale rules show BASE --resolved`"
                )
            merged.insert(places[-1] + 1, entry)
        else:
            merged.append(entry)
    return merged
