"""The installed version of the project, for ``tec-cache --version`` and ``tec-train --version``.

Data flow: the package metadata pip wrote from pyproject.toml's ``version`` --> ``installed_version``
--> the ``--version`` option of both command lines (CHANGELOG.md lists what each version changed).
"""
from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import typer

DISTRIBUTION = "tec-pretrain"


def installed_version() -> str:
    """The version pip installed (``unknown`` when run from a tree that was never installed)."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"


def version_callback(prog: str) -> Callable[[bool | None], None]:
    """A typer option callback printing ``<prog> <version>`` and exiting when the flag is given."""

    def show(value: bool | None) -> None:
        if value:
            typer.echo(f"{prog} {installed_version()}")
            raise typer.Exit()

    return show
