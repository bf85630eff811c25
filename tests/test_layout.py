"""The direction of imports (docs/development.md), stated on subpackage names only.

tec_cache is four layers, lowest first: ``runtime`` (config, pipelines, dist, faults, workers, logs)
< ``format`` (the cache on disk) < ``core`` (images, views, base models, targets, codecs) < ``build``
(stage 1's application). A module imports its own layer and those below, never one above. Stage 2
(tec_train) stands on runtime, format and core, never on build; stage 1 never imports stage 2;
nothing imports a command line (a module named ``cli``) but ``__main__``; the run harness
(tec_train.harness) imports nothing else of stage 2.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tec_cache", "tec_train")
LAYERS = ("tec_cache.runtime", "tec_cache.format", "tec_cache.core", "tec_cache.build")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Project modules imported by ``path`` (relative imports resolved; ``from pkg import mod`` counted as pkg.mod)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


@functools.cache  # the tree does not change during a test run
def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    # Keep only names that are modules or packages (``from x import name`` adds x.name for any name).
    return {m: {i for i in _imports(p) if i in modules} for m, p in modules.items()}


def _offences(rule) -> list[str]:
    return sorted(f"{m} imports {i}" for m, deps in _graph().items() for i in deps if rule(m, i))


def _layer(module: str) -> int | None:
    """Index in LAYERS of the tec_cache subpackage holding ``module``; None outside them."""
    for k, name in enumerate(LAYERS):
        if module == name or module.startswith(name + "."):
            return k
    return None


def _is_cli(module: str) -> bool:
    return module.rpartition(".")[2] == "cli"


def test_the_graph_is_read() -> None:
    graph = _graph()
    assert "tec_train.cache_loader" in graph and graph["tec_train.cache_loader"], "no imports found: the test reads nothing"
    for name in LAYERS:
        assert any(m.startswith(name + ".") for m in graph), f"no modules in {name}"


def test_every_stage_one_module_sits_in_a_layer() -> None:
    loose = [m for m in _graph() if m.startswith("tec_cache.") and _layer(m) is None and m != "tec_cache.__main__"]
    assert loose == [], f"modules of tec_cache outside {LAYERS}"


def test_a_layer_imports_only_itself_and_those_below() -> None:
    def up(m: str, i: str) -> bool:
        lm, li = _layer(m), _layer(i)
        return lm is not None and li is not None and li > lm
    assert _offences(up) == []


def test_stage_two_never_imports_the_stage_one_application() -> None:
    assert _offences(lambda m, i: m.startswith("tec_train") and _layer(i) == LAYERS.index("tec_cache.build")) == []


def test_stage_one_never_imports_stage_two() -> None:
    assert _offences(lambda m, i: m.startswith("tec_cache") and i.startswith("tec_train")) == []


def test_nothing_imports_a_cli() -> None:
    assert any(_is_cli(m) for m in _graph()), "no cli modules found"
    assert _offences(lambda m, i: _is_cli(i) and not m.endswith("__main__")) == []


def test_the_run_harness_sits_below_both_loops() -> None:
    """tec_train.harness (run dir, runtime, checkpoints, reporting) serves `run` and `finetune`: it
    imports nothing else of stage 2 (no loop, objective, model, data or CLI), only the shared layers."""
    assert any(m.startswith("tec_train.harness.") for m in _graph()), "no harness package"
    assert _offences(lambda m, i: m.startswith("tec_train.harness")
                     and i.startswith("tec_train") and not i.startswith("tec_train.harness")) == []
