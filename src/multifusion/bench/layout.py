"""Where a benchmark run keeps its files: the one naming that the runner (which writes samples),
the merge (which reads them) and the report (which shows their images) share.

Layout of an output folder::

    OUT/settings.json                       what the samples were made with (refused if different)
    OUT/samples/APP/ROW/p0003-s000017.json  one finished sample: judge readings (one per view), features, recipe
    OUT/samples/APP/ROW/p0003-s000002.png   its image (kept for the first GRID_SEEDS seeds)
    OUT/results.json  results.csv  results.md  grid.png
"""

from __future__ import annotations

from pathlib import Path

GRID_SEEDS = 4
"""Images of the first GRID_SEEDS seeds of every prompt are kept as PNG (the grid shows prompt 0)."""


def sample_name(app: str, row: str, index: int, seed: int, suffix: str = ".json") -> Path:
    """The file of sample (app, row, prompt ``index``, ``seed``) inside the output folder: its
    record, or its image with ``suffix=".png"``."""
    return Path("samples") / app / row / f"p{index:04d}-s{seed:06d}{suffix}"


def sample_path(out: Path, app: str, row: str, index: int, seed: int, suffix: str = ".json") -> Path:
    """:func:`sample_name` in the output folder ``out``."""
    return out / sample_name(app, row, index, seed, suffix)
