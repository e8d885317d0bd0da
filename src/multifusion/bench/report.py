"""Writing the results of a benchmark run: results.json, results.csv, results.md (one table per
app), grid.png (rows x the first seeds of prompt 0), and the tables spliced into a markdown doc."""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from multifusion.bench.apps import App, AppPrompt, Row
from multifusion.bench.layout import GRID_SEEDS, sample_path
from multifusion.errors import RecipeError

DOC_BEGIN, DOC_END = "<!-- bench:begin -->", "<!-- bench:end -->"

_MD_COLUMNS = (
    ("scene", "scene"),
    ("style", "style"),
    ("attr/shape", "shape"),
    ("attr/colour", "colour"),
    ("attr/texture", "texture"),
    ("attr/position", "position"),
    ("isr", "ISR"),
    ("extra", "extra"),
    ("judge_fid", "judge-FID"),
    ("seam", "seam"),
)


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def render_markdown(results: dict, grid: str | None = "grid.png") -> str:
    """The tables (one per app), settings and prompts, as markdown (no top-level title)."""
    s = results["settings"]
    v = results["versions"]
    lines = [
        f"Settings: {s['prompts_per_app']} prompts x {s['seeds']} seeds per app, {s['num_inference_steps']} "
        f"{s['scheduler']} steps, guidance scale {s['guidance_scale']}, {s['dtype']} on {s['device']} "
        f"({s['num_processes']} process(es), batch {s['batch_size']}, {s['threads']} thread(s)); wall time "
        f"{results['wall_time_s']:.0f} s, sampling time {results['compute_time_s']:.0f} s "
        f"({results['samples']['reused']} of {results['samples']['total']} images reused from earlier runs).",
        "",
        f"Versions: multifusion {v['multifusion']}, torch {v['torch']}, diffusers {v['diffusers']}, "
        f"transformers {v['transformers']}, accelerate {v['accelerate']}, Python {v['python']}.",
        "",
        f"Success intervals: {s['ci']}.",
        "",
    ]
    if grid:
        lines += [f"![comparison grid: rows are methods, columns the first seeds of prompt 0]({grid})", ""]
    by_app: dict[str, list[dict]] = {}
    for r in results["rows"]:
        by_app.setdefault(r["app"], []).append(r)
    for app, rows in by_app.items():
        cols = [(k, name) for k, name in _MD_COLUMNS if any(k in r["metrics"] for r in rows)]
        lines += [f"### {app}", "", f"Success ({results['success'][app]['kind']}): {results['success'][app]['definition']}.", ""]
        if results.get("skipped", {}).get(app):
            lines += [f"Not in this build yet (skipped): {', '.join(results['skipped'][app])}.", ""]
        lines += [
            "| row | models | success (95% CI) | " + " | ".join(n for _, n in cols) + " | s/image |",
            "|---|---|---|" + "---|" * len(cols) + "---|",
        ]
        for r in rows:
            m = r["metrics"]
            cells = [_fmt(m.get(k)) for k, _ in cols]
            lo, hi = m["success_ci"]
            lines.append(
                f"| {r['row']} | {', '.join(r['models'])} | {m['success']:.3f} [{lo:.3f}, {hi:.3f}] | "
                + " | ".join(cells)
                + f" | {results['seconds_per_image'][r['app'] + '/' + r['row']]:.3f} |"
            )
        lines.append("")
    lines += ["### Prompts", "", "| app | # | target | prompts per model |", "|---|---|---|---|"]
    for p in results["prompts"]:
        given = "; ".join(f"{role}: {text}" for role, text in p["prompts"].items())
        if "regions" in p:
            given += "; regions: " + "; ".join(f"{slot}: {text}" for slot, text in p["regions"].items())
        lines.append(f"| {p['app']} | {p['index']} | {p['target']} | {given} |")
    return "\n".join(lines) + "\n"


def _csv(results: dict) -> str:
    keys = sorted({k for r in results["rows"] for k in r["metrics"]} - {"success", "success_ci"})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "app",
            "method",
            "models",
            "row",
            "seeds",
            "prompts",
            "images",
            "success",
            "success_lo",
            "success_hi",
            *keys,
            "seconds_per_image",
        ]
    )
    timing = results["seconds_per_image"]
    for r in results["rows"]:
        m = r["metrics"]
        w.writerow(
            [
                r["app"],
                r["method"],
                "+".join(r["models"]),
                r["row"],
                r["seeds"],
                r["prompts"],
                r["images"],
                m["success"],
                *m["success_ci"],
                *[m.get(k, "") for k in keys],
                timing[f"{r['app']}/{r['row']}"],
            ]
        )
    return buf.getvalue()


def make_grid(out: Path, plan: Sequence[tuple[App, Sequence[Row], Sequence[AppPrompt]]], seeds: int):
    """Rows = every row of every app; columns = the first seeds of prompt 0."""
    from PIL import Image

    from multifusion.io import grid

    shown = list(range(min(GRID_SEEDS, seeds)))
    cells, labels = [], []
    for app, rows, _ in plan:
        for row in rows:
            images = []
            for s in shown:
                path = sample_path(out, app.id, row.id, 0, s, ".png")
                images.append(Image.open(path).convert("RGB") if path.is_file() else Image.new("RGB", (64, 64), "grey"))
            cells.append(images)
            labels.append(f"{app.id}: {row.id}")
    return grid(cells, labels, [f"seed {s}" for s in shown])


def write_results(out: str | Path, results: dict, plan: Sequence[tuple[App, Sequence[Row], Sequence[AppPrompt]]]) -> None:
    """results.json, results.csv, results.md and grid.png, each written atomically."""
    from multifusion.io import save_png, write_text

    out = Path(out)
    write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text(out / "results.csv", _csv(results))
    write_text(out / "results.md", "# multifusion benchmark\n\n" + render_markdown(results))
    save_png(make_grid(out, plan, results["settings"]["seeds"]), out / "grid.png")


def write_doc(doc: str | Path, results: dict, grid_png: str | Path | None = None) -> Path:
    """Replace the text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` of the
    markdown file ``doc`` with the tables; the grid is copied beside it as ``<stem>-grid.png``.
    ``doc`` may name a section, ``FILE#NAME``: then the markers are ``<!-- bench:begin NAME -->``
    and ``<!-- bench:end NAME -->`` and the grid ``<stem>-NAME-grid.png``, so one file can hold
    the tables of several runs (say, one app run again with more rows)."""
    from multifusion.io import atomic_path, write_text

    path, _, section = str(doc).partition("#")
    doc = Path(path)
    begin, end = (DOC_BEGIN, DOC_END) if not section else (f"<!-- bench:begin {section} -->", f"<!-- bench:end {section} -->")
    if not doc.is_file():
        raise RecipeError(f"update_doc: {str(doc)!r} does not exist")
    text = doc.read_text()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise RecipeError(f"update_doc: {str(doc)!r} needs one {begin} line followed by one {end} line around the tables")
    grid_name = None
    if grid_png is not None and Path(grid_png).is_file():
        grid_name = f"{doc.stem}-{section}-grid.png" if section else f"{doc.stem}-grid.png"
        with atomic_path(doc.parent / grid_name) as tmp:
            shutil.copyfile(grid_png, tmp)
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return write_text(doc, head + begin + "\n" + render_markdown(results, grid_name) + end + tail)
