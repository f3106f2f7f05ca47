"""The architecture, enforced: every library import (top level and inside functions) points down the layers.

    chat/                          app layer: the only package that uses both train/ and sbert/
    sbert/                         sentence-encoder training (on train/'s loop), evaluation, calibration
    train/                         loop, optimizer, checkpoints, loss, SFT, quality report and judge
    infer/                         loading any family (through the registry), tokenizer, sampler, prefix cache
    gptneox/ gemma/ bert/          model families (bert/: the sentence encoder), LoRA, data: each imports only
    lora/ data/                    core/
    core/                          the shared leaf, with the family registry: imports nothing of ours

Above the families nothing imports a family package: they are reached through core/registry.py only; chat/
uses infer/ for models and never imports train/.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "gptneox": 1, "gemma": 1, "bert": 1, "lora": 1, "data": 1, "infer": 2, "train": 3, "sbert": 4,
          "chat": 5}
FAMILIES = ("gptneox", "gemma")  # core.registry.BUILTIN_FAMILIES (checked below)


def library_modules() -> dict[str, Path]:
    mods = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []:
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def imports_of(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement anywhere in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            # `from pkg import submodule` imports pkg.submodule
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return found


def ours(name: str, mods: dict[str, Path]) -> str | None:
    """The module of ours `name` refers to (longest known prefix), or None for third-party / stdlib."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in mods:
            return ".".join(parts[:n])
    return None


def test_no_import_points_up_or_sideways():
    mods = library_modules()
    assert {m.split(".")[0] for m in mods} >= {"core", "gptneox", "lora", "data", "infer", "train", "sbert", "chat"}
    bad = []
    for module, path in mods.items():
        pkg = module.split(".")[0]
        for name, line in imports_of(module, path):
            target = ours(name, mods)
            if target is None:
                continue
            other = target.split(".")[0]
            if other != pkg and LAYERS[other] >= LAYERS[pkg]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {pkg} (layer {LAYERS[pkg]}) imports {target} "
                           f"(layer {LAYERS[other]})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_families_are_reached_through_the_registry_only():
    """No package above the families imports one: loading, LoRA presets, FSDP and export look them up in
    core.registry, so a new family needs no edit outside its own package (and the registry's list)."""
    from core.registry import BUILTIN_FAMILIES

    assert set(FAMILIES) == set(BUILTIN_FAMILIES)
    mods = library_modules()
    bad = [f"{path.relative_to(ROOT)}:{line}: imports {target}"
           for module, path in mods.items() if LAYERS[module.split(".")[0]] > LAYERS["gptneox"]
           for name, line in imports_of(module, path)
           if (target := ours(name, mods)) and target.split(".")[0] in FAMILIES]
    assert not bad, "a family imported above the families (use core.registry):\n" + "\n".join(bad)


def test_the_app_layer_talks_to_models_through_infer():
    """chat/ (and the coming server) load and sample through infer/, never through the training package."""
    mods = library_modules()
    bad = [f"{path.relative_to(ROOT)}:{line}: imports {target}"
           for module, path in mods.items() if module.split(".")[0] == "chat"
           for name, line in imports_of(module, path)
           if (target := ours(name, mods)) and target.split(".")[0] == "train"]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules():
    mods = library_modules()
    graph = {m: sorted({t for name, _ in imports_of(m, p) if (t := ours(name, mods)) and t != m})
             for m, p in mods.items()}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_references_stay_out_of_the_library():
    """transformers / peft / sentence-transformers are references for tests and benches only."""
    bad = [f"{p.relative_to(ROOT)}:{line}: {name}" for m, p in library_modules().items()
           for name, line in imports_of(m, p)
           if name.split(".")[0] in {"transformers", "peft", "sentence_transformers"}]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    """The parser must catch function-level and relative imports (a checker that cannot fail is no test)."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from train.loop import Trainer\nfrom . import config\n", encoding="utf-8")
    names = [n for n, _ in imports_of("lora.x", f)]
    assert "train.loop" in names and "lora.config" in names
