"""Command-line flags derived from config fields, so an option is declared once (``config.option``).

Data flow: a config class's ``option`` fields (default, bound, help, flag spelling) --flags_from-->
typer parameters (``--foo-bar``, the type, the help with its default) --with_flags--> the signature
typer reads from a command function, which gets the flags as keywords (None: not given) and passes
them to ``config.resolve``. Both command lines (tec-cache, tec-train) use it.
"""
from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import typer

from .config import PATH_METAVAR, component_type, flag_name, flat_fields, flat_names, help_for, is_group

F = TypeVar("F", bound=Callable[..., Any])


def _field_types(cls: type) -> dict[str, Any]:
    """``{option name: annotation}`` of a config class, its components' fields included."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if is_group(f):
            own = _field_types(component_type(f))
            out.update({name: own[k] for k, name in flat_names(f).items()})
        else:
            out[f.name] = hints[f.name]
    return out


def _members(annotation: Any) -> list[Any]:
    """The types of ``annotation`` but None: ``X | None`` -> [X], ``Path | str`` -> [Path, str]."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _cli_type(annotation: Any) -> Any:
    """The type a flag parses to: ``X | None`` -> X; a path or a union with one -> str (a path on the
    command line may be a URL, which pathlib would mangle)."""
    args = _members(annotation)
    if len(args) != 1 or args[0] is Path:
        return str
    return args[0]


def flag_param(cls: type, name: str, *, required: bool = False, extra_help: str = "") -> inspect.Parameter:
    """The typer parameter of option ``name`` of ``cls``: its flag (a bool's ``--x/--no-x`` unless the
    field spells it), type and help; not given -> None, so a pipeline table or stored run shows through."""
    f = next(f for f in flat_fields(cls) if f.name == name)
    annotation = _field_types(cls)[name]
    kind = _cli_type(annotation)
    # A path parses as text (see _cli_type) but is still named a path in the help, as in 0.3.0.
    metavar = f.metadata.get("metavar") or (PATH_METAVAR if Path in _members(annotation) else None)
    decl = f.metadata.get("flag") or (f"{flag_name(name)}/--no-{flag_name(name)[2:]}" if kind is bool else flag_name(name))
    info = typer.Option(... if required else None, decl, help=help_for(cls, name, extra_help),
                        metavar=metavar)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info,
                             annotation=kind if required else kind | None)


def flags_from(cls: type, *, skip: Iterable[str] = (), required: Iterable[str] = (),
               extra_help: Mapping[str, str] | None = None) -> list[inspect.Parameter]:
    """One parameter per option of ``cls`` but ``skip``, in declaration order."""
    skipped, needed, extra = set(skip), set(required), dict(extra_help or {})
    return [flag_param(cls, f.name, required=f.name in needed, extra_help=extra.get(f.name, ""))
            for f in flat_fields(cls) if f.name not in skipped]


def param(name: str, annotation: Any, info: Any) -> inspect.Parameter:
    """A parameter that is no config field (an argument, --pipeline, a command's own switch)."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def with_flags(*params: inspect.Parameter | Iterable[inspect.Parameter]) -> Callable[[F], F]:
    """Give a command function (``def cmd(**flags)``) the signature typer builds its options from."""
    flat: list[inspect.Parameter] = []
    for p in params:
        flat.extend([p] if isinstance(p, inspect.Parameter) else p)

    def wrap(func: F) -> F:
        func.__signature__ = inspect.Signature(flat)  # type: ignore[attr-defined]  # typer reads inspect.signature(func)
        return func

    return wrap
