"""The installed version of the project, for ``tec-cache --version`` and ``tec-train --version``.

Data flow: the package metadata pip wrote from pyproject.toml's ``version`` --> ``installed_version``
--> the ``--version`` option of both command lines and the ``tool`` field of every cache manifest
(CHANGELOG.md lists what each version changed).
"""
from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "tec-pretrain"


def installed_version() -> str:
    """The version pip installed (``0+unknown`` when run from a tree that was never installed)."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0+unknown"


def version_callback(prog: str) -> Callable[[bool | None], None]:
    """A typer option callback printing ``<prog> <version>`` and exiting when the flag is given."""

    def show(value: bool | None) -> None:
        import typer  # only the command lines need it

        if value:
            typer.echo(f"{prog} {installed_version()}")
            raise typer.Exit()

    return show
