"""The direction of imports (docs/development.md): the format core imports nothing of either
application; stage 2 imports the format core and the shared image/view/target code, never the
stage-1 application; nothing imports a CLI; stage 1 never imports stage 2; the run harness imports no
loop of stage 2."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tec_cache", "tec_train")
# The stage-1 application: what only `tec-cache` runs. Everything else in tec_cache is shared.
STAGE1_APP = {"tec_cache.build", "tec_cache.verify", "tec_cache.show", "tec_cache.cli", "tec_cache.__main__"}
CLIS = {"tec_cache.cli", "tec_train.cli"}
# What the format core may use of the project besides itself: fault injection points.
FORMAT_MAY_USE = {"tec_cache.faults"}


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


def test_the_graph_is_read() -> None:
    graph = _graph()
    assert "tec_train.cache_loader" in graph and graph["tec_train.cache_loader"], "no imports found: the test reads nothing"
    assert any(m.startswith("tec_cache.format") for m in graph), "no format core package"


def test_format_core_imports_only_itself() -> None:
    def bad(m: str, i: str) -> bool:
        return m.startswith("tec_cache.format") and not i.startswith("tec_cache.format") and i not in FORMAT_MAY_USE
    assert _offences(bad) == []


def test_stage_two_never_imports_the_stage_one_application() -> None:
    assert _offences(lambda m, i: m.startswith("tec_train") and i in STAGE1_APP) == []


def test_stage_one_never_imports_stage_two() -> None:
    assert _offences(lambda m, i: m.startswith("tec_cache") and i.startswith("tec_train")) == []


def test_nothing_imports_a_cli() -> None:
    assert _offences(lambda m, i: i in CLIS and not m.endswith("__main__")) == []


def test_the_run_harness_sits_below_both_loops() -> None:
    """tec_train.harness (run dir, runtime, checkpoints, reporting) serves `run` and `finetune`: it
    imports nothing else of stage 2 (no loop, objective, model, data or CLI), only the shared core."""
    assert any(m.startswith("tec_train.harness.") for m in _graph()), "no harness package"
    assert _offences(lambda m, i: m.startswith("tec_train.harness")
                     and i.startswith("tec_train") and not i.startswith("tec_train.harness")) == []
    assert _offences(lambda m, i: m.startswith("tec_train.harness") and i in STAGE1_APP) == []
