"""Config fields declared once: default, bounds and help, for both command lines.

Data flow: a config dataclass whose fields are ``option(...)`` --> ``help_for`` (the CLI's help
text, default included) and ``check_fields`` (the bounds, with the option named) --> defaults <
pipeline table < stored run < flags --``resolve``--> the config --``config_table``--> what a
command prints.

A field ``foo_bar`` is the option ``--foo-bar``; a preset table sets it as ``foo_bar = ...``.
This module is shared code (no CLI): ``tec_cache`` and ``tec_train`` configs both use it.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

from rich.markup import escape
from rich.table import Table

C = TypeVar("C")
_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A value or key that a config does not take; the message names the option, file and table."""


@dataclass(frozen=True)
class Check:
    """A bound on an option's value: ``ok(value)`` or the error '--opt: <expect>, got <value>'."""

    ok: Callable[[Any], bool]
    expect: str


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


POSITIVE_INT = Check(lambda v: _is_int(v) and v >= 1, "must be a positive integer")
WORKERS = Check(lambda v: _is_int(v) and v >= 0, "must be >= 0")
SEED = Check(lambda v: _is_int(v) and v >= 0, "must be an integer >= 0")
POSITIVE = Check(lambda v: _is_num(v) and math.isfinite(v) and v > 0, "must be a positive number")
NON_NEGATIVE = Check(lambda v: _is_num(v) and math.isfinite(v) and v >= 0, "must be a number >= 0")


def in_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    """A number in [lo, hi], either end open; integers print as lo..hi."""
    if _is_int(lo) and _is_int(hi) and not lo_open and not hi_open:
        return Check(lambda v: _is_int(v) and lo <= v <= hi, f"must be in {lo}..{hi}")
    text = f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def ok(v: Any) -> bool:
        if not _is_num(v) or not math.isfinite(v):
            return False
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)

    return Check(ok, text)


# The help's name for a value that is a file or folder (typer's own for a Path): path options are
# declared as text, since a URL must pass through unmangled, yet still read as paths in --help.
PATH_METAVAR = "<path>"


def option(default: Any = _MISSING, help: str = "", *, check: Check | None = None,
           choices: Iterable[str] | None = None, default_text: str | None = None, flag: str | None = None,
           metavar: str | None = None) -> Any:
    """A config field carrying its default, its bound (``check`` or ``choices``) and its help once.

    ``None`` as a default means "not set" (derived later, e.g. from the cache); its bound then
    applies only when a value is given. ``default_text`` says in words what a None default means.
    ``flag`` spells the command-line flag when ``--foo-bar`` (``--foo-bar/--no-foo-bar`` for a bool)
    will not do, ``metavar`` names its value in the help (tec_cache.runtime.flags).
    """
    meta = {"help": help, "check": check, "choices": tuple(choices) if choices is not None else None,
            "default_text": default_text, "flag": flag, "metavar": metavar}
    if default is _MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def group(cls: type, flat: Mapping[str, tuple[str, str]] | None = None) -> Any:
    """A nested component of a config (e.g. the optimiser's options): its own dataclass of
    ``option`` fields, default-constructed. On the command line, in pipeline tables and in a run's
    stored options its fields stay flat (``--epochs``, not ``--optim.epochs``), so field names are
    unique across a config's components.

    ``flat`` takes a class declared for another command under this config (online mode takes the
    target recipe of ``tec-cache build``): ``{field: (option name here, help prefix)}``; its fields
    not named stay out of this config's options."""
    return dataclasses.field(default_factory=cls, metadata={"group": True, "flat": dict(flat) if flat else None})


def is_group(f: dataclasses.Field[Any]) -> bool:
    return bool(f.metadata.get("group"))


def component_type(f: dataclasses.Field[Any]) -> type:
    """The dataclass of a ``group`` field: its default factory."""
    factory = f.default_factory
    if not isinstance(factory, type):
        raise TypeError(f"{f.name} is not a config component")
    return factory


def flat_names(f: dataclasses.Field[Any]) -> dict[str, str]:
    """``{the component's option name: its option name here}`` of a ``group`` field."""
    renamed = f.metadata.get("flat")
    own = [g.name for g in flat_fields(component_type(f))]
    return {k: k for k in own} if renamed is None else {k: renamed[k][0] for k in own if k in renamed}


def _as_option(f: dataclasses.Field[Any], name: str, prefix: str) -> dataclasses.Field[Any]:
    """``f`` under another option name, its help prefixed: the same default, bound and choices."""
    copy: dataclasses.Field[Any] = dataclasses.field(default=f.default, metadata={**f.metadata, "help": prefix + f.metadata["help"]})
    copy.name, copy.type = name, f.type
    return copy


def flat_fields(cls: Any) -> list[dataclasses.Field[Any]]:
    """The option fields of a config class (or instance), its components' fields in place."""
    cls = cls if isinstance(cls, type) else type(cls)
    out: list[dataclasses.Field[Any]] = []
    for f in fields(cls):
        if not is_group(f):
            out.append(f)
            continue
        renamed = f.metadata.get("flat")
        for g in flat_fields(component_type(f)):
            if renamed is None:
                out.append(g)
            elif g.name in renamed:
                out.append(_as_option(g, *renamed[g.name]))
    return out


def flat_values(config: Any) -> dict[str, Any]:
    """``{option name: value}`` of a config, components flattened: what a run stores and compares."""
    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if is_group(f):
            names, own = flat_names(f), flat_values(value)
            out.update({names[k]: v for k, v in own.items() if k in names})
        else:
            out[f.name] = value
    return out


def _take(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of ``cls`` from flat option ``values`` (taken out of it): its own
    fields by name, each component built from its options (or passed whole by its own name)."""
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if is_group(f):
            component = component_type(f)
            own = flat_values(values.pop(f.name)) if f.name in values else {}
            own.update({k: values.pop(name) for k, name in flat_names(f).items() if name in values})
            kwargs[f.name] = component(**_take(component, own))
        elif f.name in values:
            kwargs[f.name] = values.pop(f.name)
    return kwargs


class NestedConfig:
    """Base of the classes ``nested_config`` builds: their constructor takes flat option names,
    which a type checker cannot derive from the components, so it is declared here."""

    if TYPE_CHECKING:
        def __init__(self, **values: Any) -> None: ...


def nested_config(cls: type[C]) -> type[C]:
    """A dataclass with ``group`` components, built from flat option names: ``TrainConfig(run_dir=R,
    epochs=2)`` puts ``epochs`` in the component that declares it (a whole component may be passed
    by its own name too). What reads the config names the component: ``cfg.optim.epochs``."""
    made: Any = dataclass(init=False)(cls)
    clash = {f.name for f in fields(made) if is_group(f)} & set(field_names(made))
    if clash:
        raise TypeError(f"{made.__name__}: component names {sorted(clash)} are also option names")

    def __init__(self: Any, **values: Any) -> None:
        kwargs = _take(made, values)
        if values:
            raise TypeError(f"{made.__name__} has no option {sorted(values)}")
        for f in fields(made):
            if f.name in kwargs:
                setattr(self, f.name, kwargs[f.name])
            elif f.default is not _MISSING:
                setattr(self, f.name, f.default)
            else:
                raise TypeError(f"{made.__name__}: missing option {f.name!r}")

    made.__init__ = __init__
    return made


def flag_name(name: str) -> str:
    """The command-line option of field ``name``: ``warmup_epochs`` -> ``--warmup-epochs``."""
    return "--" + name.replace("_", "-")


def _field(cls: type, name: str) -> dataclasses.Field[Any]:
    for f in flat_fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def help_for(cls: type, name: str, extra: str = "") -> str:
    """The help text of one option: the field's help, the choices, and its default, from the field."""
    f = _field(cls, name)
    text = f.metadata.get("help", "") + extra
    choices = f.metadata.get("choices")
    if choices and " | " not in text:
        text += f" ({' | '.join(choices)})"
    if f.metadata.get("default_text"):
        return f"{text.rstrip('.')} (default: {f.metadata['default_text']})."
    if f.default is not _MISSING and f.default is not None and f.default is not False:
        return f"{text.rstrip('.')} (default: {_show(f.default)})."
    return text


def check_fields(config: Any, names: Iterable[str] | None = None) -> None:
    """Every field's declared bound; ConfigError names the first option out of bounds."""
    wanted = None if names is None else set(names)
    values = flat_values(config)
    for f in flat_fields(config):
        if wanted is not None and f.name not in wanted:
            continue
        value = values[f.name]
        if value is None and (f.default is None or f.default is _MISSING):
            continue
        check, choices = f.metadata.get("check"), f.metadata.get("choices")
        if check is not None and not check.ok(value):
            raise ConfigError(f"{flag_name(f.name)}: {check.expect}, got {value!r}")
        if choices is not None and value not in choices:
            raise ConfigError(f"{flag_name(f.name)}: expected one of {', '.join(choices)}, got {value!r}")


def field_names(cls: type) -> list[str]:
    """The option names of a config class, components flattened."""
    return [f.name for f in flat_fields(cls)]


def resolve(cls: type[C], *, table: Mapping[str, Any] | None = None, stored: Mapping[str, Any] | None = None,
            flags: Mapping[str, Any] | None = None) -> C:
    """The config of one command, every command the same way: the defaults, under a pipeline's
    ``table`` (its keys already checked, see pipelines.Pipeline.table), under a run dir's ``stored``
    options when resuming or extending (those this version no longer has are dropped), under the
    ``flags`` given (None: not given)."""
    names = set(field_names(cls))
    values = dict(table or {})
    values.update({k: v for k, v in (stored or {}).items() if k in names})
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    return cls(**values)


def config_table(config: Any, title: str, skip: Iterable[str] = ()) -> Table:
    """The resolved config as a two-column table; values that differ from the default are bold."""
    t = Table(title=title)
    t.add_column("option")
    t.add_column("value")
    skipped = set(skip)
    values = flat_values(config)
    for f in flat_fields(config):
        if f.name in skipped:
            continue
        value = values[f.name]
        shown = "-" if value is None else escape(_show(value))
        if f.default is not _MISSING and value != f.default:
            shown = f"[bold]{shown}[/]"
        t.add_row(f.name, shown)
    return t


def env_seconds(var: str, default: float) -> float:
    """A positive number of seconds from environment variable ``var`` (unset or empty: ``default``);
    ValueError names the variable."""
    raw = os.environ.get(var)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{var}={raw!r}: expected a positive number of seconds")
    return value
