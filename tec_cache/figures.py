"""PNG files of matplotlib figures, shared by `tec-cache show` and `tec-train plot`.

Data flow: a private matplotlib Figure (no pyplot, no display) --> **prepare_png_path** (the
option's file is writable) --> **save_png** (Agg canvas, temporary sibling, atomic rename).
"""
from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tec_cache.format.fs import write_atomic

DPI = 100  # with a figure's size in inches, fixes the PNG's pixel size in advance


def prepare_png_path(out: Path, option: str = "--out") -> Path:
    """Check that ``out`` can be written as a file (creating its folder); ValueError names ``option``."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{option}: {out} is a folder; give a file name such as {out / 'picture.png'}")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{option}: cannot create the folder {parent} ({e.strerror or e})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option}: the folder {parent} is not writable")
    return out


def save_png(fig: Figure, out: Path, option: str) -> Path:
    """Write through a temporary sibling so a failed write never leaves a half PNG under ``out``."""
    FigureCanvasAgg(fig)  # attach the Agg canvas: savefig then renders without any GUI backend
    try:
        write_atomic(out, lambda f: fig.savefig(f, format="png", dpi=DPI))
    except OSError as e:
        raise ValueError(f"{option}: cannot write {out} ({e.strerror or e})") from None
    return out
