"""The command lines' surface is a user contract: every command, flag and argument of 0.3.0 is still
accepted, with the same kind of value. `tests/data/cli-surface-0.3.0.json` was written by
``surface()`` below from the release at b6a2970 (the last before flags were derived from the
configs), so a flag lost or retyped by a later reshaping fails here, not in a user's job script."""
from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import pytest
import typer

SHIPPED = Path(__file__).parent / "data" / "cli-surface-0.3.0.json"

# click's type names and the annotations typer builds them from, in one vocabulary.
_KINDS = {"str": "text", "text": "text", "int": "integer", "integer": "integer", "float": "float",
          "bool": "boolean", "boolean": "boolean", "Path": "path", "path": "path", "list": "list"}


def _kind(p: Any) -> str:
    if hasattr(p, "type"):  # typer built on click (before 0.29): click's parameter type
        return _KINDS.get(p.type.name, p.type.name)
    annotation = p.type_descriptor.annotation  # typer 0.29+: the annotation it parses to
    members = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    name = getattr(members[0], "__name__", str(members[0]))
    return _KINDS.get(name, name)


def surface(app: typer.Typer) -> dict[str, dict[str, Any]]:
    """``{command: {"--flag" or "<argument>": what it takes}}`` of a typer app, subcommands included."""
    out: dict[str, dict[str, Any]] = {}

    def walk(cmd: Any, path: list[str]) -> None:
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
            return
        params: dict[str, Any] = {}
        for p in cmd.params:
            if p.param_type_name == "option":
                params["/".join(sorted(p.opts))] = {"off": sorted(p.secondary_opts), "kind": _kind(p),
                                                    "flag": bool(p.is_flag), "metavar": p.metavar}
            else:
                params[f"<{p.name}>"] = {"nargs": p.nargs}
        out[" ".join(path)] = params

    walk(typer.main.get_command(app), [])
    return out


def _now() -> dict[str, dict[str, dict[str, Any]]]:
    from tec_cache.build.cli import app as cache_app
    from tec_train.cli import app as train_app

    return {"tec-cache": surface(cache_app), "tec-train": surface(train_app)}


OLD: dict[str, dict[str, dict[str, Any]]] = json.loads(SHIPPED.read_text())
CASES = [(prog, cmd) for prog in sorted(OLD) for cmd in sorted(OLD[prog])]


@pytest.fixture(scope="module")
def now() -> dict[str, dict[str, dict[str, Any]]]:
    return _now()


def test_the_shipped_surface_is_the_whole_030_release() -> None:
    assert sum(len(params) for prog in OLD.values() for params in prog.values()) == 182
    assert set(OLD["tec-train"]) == {"pipelines", "run", "export", "plot", "finetune", "knn", "linear"}


@pytest.mark.parametrize(("prog", "cmd"), CASES, ids=[f"{p} {c}" for p, c in CASES])
def test_every_030_flag_and_argument_is_still_taken(now: dict[str, Any], prog: str, cmd: str) -> None:
    assert cmd in now[prog], f"{prog} {cmd}: the command is gone"
    current = now[prog][cmd]
    for name, was in OLD[prog][cmd].items():
        assert name in current, f"{prog} {cmd} {name}: gone"
        new = current[name]
        if name.startswith("<"):
            assert new["nargs"] == was["nargs"], f"{prog} {cmd} {name}: takes {new['nargs']} values, was {was['nargs']}"
            continue
        assert new["flag"] == was["flag"], f"{prog} {cmd} {name}: a switch in one release, a value in the other"
        assert set(was["off"]) <= set(new["off"]), f"{prog} {cmd} {name}: lost {set(was['off']) - set(new['off'])}"
        if was["kind"] == "path" and new["kind"] == "text":
            # Path flags parse as text now (a URL must not be mangled by pathlib): the same strings
            # are taken, and the help still names the value a path.
            assert new["metavar"] == "<path>", f"{prog} {cmd} {name}: the help no longer says it takes a path"
        else:
            assert new["kind"] == was["kind"], f"{prog} {cmd} {name}: takes {new['kind']}, was {was['kind']}"
