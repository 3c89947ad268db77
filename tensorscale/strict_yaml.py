"""Read the small text files users hand us (rules, jobs, calibration text) without letting them hang us.

- Only regular files, and at most a size limit: `--rules /dev/zero` would otherwise read forever.
- YAML is loaded safely (plain data, never Python objects), refusing a key given twice (YAML would keep the
  last value silently) and nesting beyond MAX_DEPTH (PyYAML composes recursively). Rules files also refuse
  aliases: a 500-byte alias bomb through nested `fused` parts expands to billions of nodes when walked.
"""

from __future__ import annotations

import os
import stat

import yaml

from .errors import TensorscaleError

MAX_DEPTH = 64


def read_text_file(path: str, what: str, limit: int) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes, or one line saying what is wrong."""
    try:
        status = os.stat(path)
    except OSError as exc:
        raise TensorscaleError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(status.st_mode):
        raise TensorscaleError(f"{what} {path} is not a regular file; give a text file")
    if status.st_size > limit:
        raise TensorscaleError(f"{what} {path} is {status.st_size:,} bytes, more than the {limit:,} accepted")
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise TensorscaleError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise TensorscaleError(f"{what} {path} is more than the {limit:,} bytes accepted")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TensorscaleError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


class _StrictLoader(yaml.SafeLoader):
    allow_aliases = True

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if not self.allow_aliases and self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise TensorscaleError(
                f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not "
                "accepted here; write the value out"
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise TensorscaleError(f"line {mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeLoader says so itself
                break
            if duplicate:
                raise TensorscaleError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice; keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


class _NoAliasLoader(_StrictLoader):
    allow_aliases = False


def load_yaml(text: str, path: str, *, aliases: bool = True):
    """Plain data from YAML text; every problem is one TensorscaleError line starting with `path`."""
    loader = None
    try:
        loader = (_StrictLoader if aliases else _NoAliasLoader)(text)  # the reader checks characters here
        return loader.get_single_data()
    except TensorscaleError as exc:
        raise TensorscaleError(f"{path}: {exc}") from None
    except RecursionError:
        raise TensorscaleError(f"{path}: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise TensorscaleError(f"{path}: invalid YAML{where}: {problem}") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml_file(path: str, what: str, limit: int, *, aliases: bool = True):
    """Plain data from a YAML file of at most `limit` bytes: the one reader of rules and jobs files."""
    return load_yaml(read_text_file(path, what, limit), path, aliases=aliases)
