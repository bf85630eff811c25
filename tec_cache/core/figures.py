"""PNG files of matplotlib figures, shared by `tec-cache show` and `tec-train plot`.

Data flow: a private matplotlib Figure (no pyplot, no display) --> **format.fs.prepare_output_file**
(the option's file is writable) --> **save_png** (Agg canvas, temporary sibling, atomic rename).
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tec_cache.format.fs import write_atomic

DPI = 100  # with a figure's size in inches, fixes the PNG's pixel size in advance


def save_png(fig: Figure, out: Path, option: str) -> Path:
    """Write through a temporary sibling so a failed write never leaves a half PNG under ``out``."""
    FigureCanvasAgg(fig)  # attach the Agg canvas: savefig then renders without any GUI backend
    try:
        write_atomic(out, lambda f: fig.savefig(f, format="png", dpi=DPI))
    except OSError as e:
        raise ValueError(f"{option}: cannot write {out} ({e.strerror or e})") from None
    return out
