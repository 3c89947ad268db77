"""The package layering of docs/architecture.md, enforced: each package imports only the layers below it,
and no module imports itself back through others (no cycles), counting imports deferred into functions.

A deferred import is how a cycle hides (the module loads, so nothing fails until the layering is lost), so
this reads every import statement in the tree with `ast`, not just the ones that run at import time."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tensorscale"

# Modules directly in tensorscale/ that are not the engine's orchestration: small shared services.
BASE_MODULES = {"errors", "progress", "interrupts", "heap", "strict_yaml", "__init__"}
ENGINE_MODULES = {"convert", "rewrite", "gguf_import", "gguf_export"}  # the rewrites, end to end
ENTRY_MODULES = {"__main__"}

# layer -> the layers it may import (besides itself). Mirrors the table in docs/architecture.md.
ALLOWED = {
    "base": set(),
    "ops": {"base"},
    "rulebook": {"base", "ops"},
    "reading": {"base", "ops", "rulebook"},
    "planning": {"base", "ops", "rulebook", "reading"},
    "writing": {"base", "ops", "rulebook", "reading", "planning"},
    "inference": {"base", "reading"},
    "folding": {"base", "ops", "rulebook", "reading", "planning", "writing", "inference"},
    "engine": {"base", "ops", "rulebook", "reading", "planning", "writing", "inference", "folding"},
    "batch": {"base", "ops", "rulebook", "reading", "planning", "writing", "inference", "folding", "engine"},
    "cli": {"base", "ops", "rulebook", "reading", "planning", "writing", "inference", "folding", "engine", "batch"},
    "entry": {"base", "cli"},
}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "base"
    if len(parts) == 2 and (PACKAGE / f"{parts[1]}.py").exists():
        name = parts[1]
        if name in BASE_MODULES:
            return "base"
        if name in ENGINE_MODULES:
            return "engine"
        if name in ENTRY_MODULES:
            return "entry"
        raise AssertionError(
            f"tensorscale/{name}.py belongs to no layer: add it to test_architecture.py and docs/architecture.md"
        )
    return parts[1]


def imports_of(path: pathlib.Path, modules: set[str]) -> set[str]:
    """Every tensorscale module that `path` imports, at top level or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        found.update(target for target in targets if target in modules and target != name)
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(paths)) for name, path in paths.items()}


def test_the_graph_sees_imports_inside_functions():
    edges = graph()
    assert "tensorscale.folding.analysis" in edges["tensorscale.convert"]  # imported inside plan_down only
    assert "tensorscale.gguf_import" in edges["tensorscale.cli.inference_commands"]  # inside gen and verify


def test_every_import_goes_down_the_layers():
    wrong = []
    for module, imported in sorted(graph().items()):
        here = layer_of(module)
        for target in sorted(imported):
            there = layer_of(target)
            if there != here and there not in ALLOWED[here]:
                wrong.append(f"{module} ({here}) imports {target} ({there})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_only_look_down(layer):
    """The table itself is a strict order: a layer never allows one that allows it back."""
    for other in ALLOWED[layer]:
        assert layer not in ALLOWED[other], (layer, other)
