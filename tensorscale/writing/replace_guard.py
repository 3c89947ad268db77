"""What `--force` may replace: only a folder that this tool could have written, nowhere that holds more.

`--force` deletes the old OUT once the new one is in place, so a wrong OUT is data loss: `-o .` would wipe
the current folder, `-o ~/proj` a project that holds the input. Before any work (planning, analysis,
writing), an existing OUT is refused unless
- it is not, and does not contain, the input, the current directory, a home directory or a mount point;
- it holds only model files: config.json, safetensors shards and their index, tokenizer files, generation
  config, chat template, a tensorscale manifest (and the files it lists), a README.md model card and GGUF
  files, with no subfolders.
Anything else gets one line naming the first unexpected file. A symlink OUT is never followed: only the
link is replaced, its target is left as it is.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re

from ..errors import TensorscaleError

MANIFEST_NAME = "tensorscale-manifest.json"  # as writing.integrity names it (kept light: no planning import)
MODEL_FILE_NAMES = {
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    MANIFEST_NAME,
    "README.md",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
}
MODEL_FILE_PATTERNS = ("*.safetensors", "*.gguf", "*.tiktoken", "tokenizer*.json", "tokenizer*.model")
OWN_HIDDEN_PREFIX = ".tensorscale"  # our own bookkeeping files (locks, reservations)


def is_model_file(name: str) -> bool:
    return name in MODEL_FILE_NAMES or any(fnmatch.fnmatchcase(name, pattern) for pattern in MODEL_FILE_PATTERNS)


def _manifest_files(folder: str) -> set[str]:
    """Files a tensorscale manifest in `folder` says we wrote (side files with unusual names included)."""
    try:
        with open(os.path.join(folder, MANIFEST_NAME), encoding="utf-8") as handle:
            manifest = json.load(handle)
        if isinstance(manifest, dict) and manifest.get("tool") == "tensorscale":
            files = (manifest.get("output") or {}).get("files") or {}
            if isinstance(files, dict):
                return {name for name in files if isinstance(name, str)}
    except (OSError, ValueError, RecursionError, AttributeError):
        pass
    return set()


def unexpected_entries(folder: str) -> list[str]:
    """The entries of `folder` that are not model files this tool could have written, sorted."""
    listed = _manifest_files(folder)
    odd = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(OWN_HIDDEN_PREFIX) and not os.path.isdir(path):
            continue
        if os.path.islink(path) or not os.path.isfile(path):
            odd.append(name + ("/" if os.path.isdir(path) and not os.path.islink(path) else ""))
        elif not (is_model_file(name) or name in listed):
            odd.append(name)
    return odd


def _mount_points() -> list[str]:
    points = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) > 4:
                    points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    except OSError:
        pass
    return points


def _home_dirs() -> set[str]:
    homes = {os.path.expanduser("~")}
    try:
        import pwd

        homes.update(entry.pw_dir for entry in pwd.getpwall() if entry.pw_dir)
    except (ImportError, KeyError, OSError):
        pass
    return {os.path.realpath(home) for home in homes if home and os.path.isabs(home)}


def _within(path: str, folder: str) -> bool:
    """`path` is `folder` or lies inside it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_replaceable(output: str, input_folder: str | None, extra_kept: tuple[str, ...] = ()) -> None:
    """Raise one line unless the existing folder `output` may be deleted to make way for the new model.

    `extra_kept` are files that must survive (a batch's own jobs file): OUT may not contain them."""
    check_location(output, input_folder, extra_kept)
    check_contents(output)


def check_location(output: str, input_folder: str | None, extra_kept: tuple[str, ...] = ()) -> None:
    """OUT is not, and does not hold, the input, the current directory, a home, a mount point or `extra_kept`."""
    if os.path.islink(output):
        return  # only the link is replaced; nothing it points to is deleted
    real = os.path.realpath(output)
    keep = []
    if input_folder is not None and os.path.exists(input_folder):
        keep.append((os.path.realpath(input_folder), "the input"))
    keep.append((os.path.realpath(os.getcwd()), "the current directory"))
    keep += [(home, "a home directory") for home in sorted(_home_dirs())]
    keep += [(os.path.realpath(path), "the file") for path in extra_kept]
    for path, what in keep:
        if _within(path, real):
            where = "is" if path == real else f"contains {path}, which is"
            raise TensorscaleError(
                f"--force would replace {output}, which {where} {what}; "
                "tensorscale never replaces that: choose another --output"
            )
    for point in _mount_points():
        if _within(point, real):
            raise TensorscaleError(
                f"--force would replace {output}, which is or contains the mount point {point}; choose another --output"
            )
    if real == os.path.realpath(os.sep):
        raise TensorscaleError("--force would replace the root folder; choose another --output")


def check_contents(output: str) -> None:
    """OUT holds only model files this tool could have written (one line naming the first other one)."""
    if os.path.islink(output) or not os.path.isdir(output):
        return
    odd = unexpected_entries(output)
    if odd:
        more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
        raise TensorscaleError(
            f"--force would replace {output}, but it holds {odd[0]}{more}, which is not a model file tensorscale "
            "writes; move it out, or choose another --output"
        )
