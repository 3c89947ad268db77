"""Fingerprint what the CLI writes, so that a refactor can show it changed no output byte.

A refactor of the engine is meant to leave every output file identical. Tests check that outputs are
*right* (exact logits, loadable); this checks that they are *the same bytes* as before. It builds tiny
re-randomised checkpoints of several architectures once (kept in --sources, so both sides of a comparison
read identical inputs), runs a fixed list of `up`, `down` and `plan` commands on them in fresh
processes, and records the sha256 of every file each command wrote.

    python benchmarks/output_digest.py --write before.json      # on the old commit
    python benchmarks/output_digest.py --compare before.json    # on the new one: lists every difference

Both runs must read the same sources: copy --sources from one checkout to the other, or point both at
one folder. The paths of the sources and outputs are replaced by placeholders before hashing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ARCHITECTURES = ("llama", "gemma2", "phi", "gpt2", "qwen3", "stablelm")

# (name, architectures it runs on, tensorscale arguments; {src} and {out} are filled in, {up} is the
# output of the "up" command on the same architecture.)
COMMANDS = (
    ("up", ARCHITECTURES, "up {src} -o {out} -edm 2 -upm 2 -q"),
    ("up-noise", ARCHITECTURES, "up {src} -o {out} -edm 2 -upm 3 --snr-db 20 --seed 3 -q"),
    ("up-sizes", ("llama", "qwen3"), "up {src} -o {out} --intermediate-size 100 -q"),
    ("up-pad", ("llama",), "up {src} -o {out} -edm 2 -upm 2 --strategy pad -q"),
    ("up-layers", ("llama", "gpt2"), "up {src} -o {out} --add-layers 1 -q"),
    ("up-untie", ("llama",), "up {src} -o {out} -edm 2 --untie-embeddings -q"),
    ("up-gguf", ("llama",), "up {src} -o {out}.gguf -edm 2 --format gguf -q"),
    ("down-of-up", ARCHITECTURES, "down {up} -o {out} -edd 2 -upd 2 --method fold -q"),
    ("down-fold", ("llama", "gpt2"), "down {src} -o {out} --intermediate-size 48 --method fold -q"),
    ("plan-up", ("llama",), "plan up {src} -edm 2 -upm 2 --json"),
)


def build_sources(folder: pathlib.Path) -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from fixtures import build_checkpoint

    for arch in ARCHITECTURES:
        target = folder / arch
        if not (target / "config.json").exists():
            build_checkpoint(target, arch, seed=7)


def file_digests(path: pathlib.Path, folders: dict[str, str]) -> dict[str, str]:
    """sha256 of each file, with the paths of `folders` replaced by their names: the command line is part
    of what is written, and two checkouts run from different folders. A safetensors header's length and
    padding change with the paths' length, so its JSON is hashed re-serialised, then the tensor bytes;
    a GGUF file is hashed as its fields and tensors, read back."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digests = {}
    for file in files:
        data = file.read_bytes()
        if file.suffix == ".safetensors":
            length = int.from_bytes(data[:8], "little")
            header = json.dumps(json.loads(data[8 : 8 + length]), sort_keys=True).encode()
            data = header + b"\0" + data[8 + length :]
        elif file.suffix == ".gguf":
            data = gguf_content(file)
        for folder, placeholder in folders.items():
            data = data.replace(folder.encode(), placeholder.encode())
        digests[str(file.relative_to(path.parent if path.is_file() else path))] = hashlib.sha256(data).hexdigest()
    return digests


def gguf_content(file: pathlib.Path) -> bytes:
    """A GGUF file's fields and tensors, without the offsets and padding that depend on string lengths."""
    from gguf import GGUFReader

    reader = GGUFReader(str(file))
    parts = [
        f"{name}={field.contents()!r}".encode() for name, field in reader.fields.items() if not name.startswith("GGUF.")
    ]
    for tensor in reader.tensors:
        parts.append(f"{tensor.name}:{tensor.tensor_type.name}:{list(tensor.shape)}".encode())
        parts.append(tensor.data.tobytes())
    return b"\0".join(parts)


def run_all(sources: pathlib.Path, scratch: pathlib.Path) -> dict[str, dict]:
    """Run every command into `scratch` (emptied first) and fingerprint what each one wrote."""
    results: dict[str, dict] = {}
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for name, archs, template in COMMANDS:
        for arch in archs:
            out = scratch / f"{name}-{arch}"
            args = template.format(src=sources / arch, out=out, up=scratch / f"up-{arch}").split()
            proc = subprocess.run(
                [sys.executable, "-m", "tensorscale", *args],
                capture_output=True,
                text=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            written = out if out.exists() else pathlib.Path(f"{out}.gguf")
            # the current folder too: `plan` prints a default output path built from it
            folders = {str(scratch): "SCRATCH", str(sources): "SOURCES", os.getcwd(): "CWD"}
            entry = {"rc": proc.returncode, "files": file_digests(written, folders) if written.exists() else {}}
            if name.startswith("plan"):
                stdout = proc.stdout
                for folder, placeholder in folders.items():
                    stdout = stdout.replace(folder, placeholder)
                entry["stdout"] = hashlib.sha256(stdout.encode()).hexdigest()
            if proc.returncode:
                entry["error"] = proc.stderr.strip().splitlines()[-1:] if proc.stderr else []
            results[f"{name}/{arch}"] = entry
            print(f"{name}/{arch}: rc {proc.returncode}, {len(entry['files'])} files", file=sys.stderr)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=pathlib.Path, default=HERE / "work" / "digest-sources")
    parser.add_argument(
        "--scratch",
        type=pathlib.Path,
        default=HERE / "work" / "digest-outputs",
        help="where the outputs are written (emptied first)",
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=pathlib.Path, help="record the digests into this JSON file")
    group.add_argument("--compare", type=pathlib.Path, help="compare with digests recorded earlier")
    args = parser.parse_args()
    build_sources(args.sources)
    results = run_all(args.sources, args.scratch)
    if args.write:
        args.write.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(f"{len(results)} commands recorded in {args.write}")
        return 0
    before = json.loads(args.compare.read_text())
    differences = [key for key in sorted(set(before) | set(results)) if before.get(key) != results.get(key)]
    for key in differences:
        print(f"DIFFERS {key}: before {before.get(key)} now {results.get(key)}")
    print(f"{len(results)} commands, {len(differences)} differ from {args.compare}")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
