"""Two rows of one image app compared image by image: how many images each row alone gets right
and the exact McNemar p-value (`multifusion.bench.stats.mcnemar_p`). The rows may come from one
bench folder or from two made with the same settings (e.g. the same row with other weights).

    python benchmarks/paired.py --app ensemble runs/a:afa runs/b:afa
    python benchmarks/paired.py --app ensemble runs/bench:model-stock runs/bench:afa
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _side(text: str) -> tuple[Path, str]:
    folder, sep, row = text.rpartition(":")
    if not sep or not folder or not row:
        raise SystemExit(f"{text!r}: expected FOLDER:ROW (a bench --out folder and a row id, e.g. runs/bench:afa)")
    return Path(folder), row


def main() -> None:
    from multifusion.bench.apps import get_app
    from multifusion.bench.layout import sample_path
    from multifusion.bench.stats import mcnemar_p, sample_success

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="FOLDER:ROW")
    ap.add_argument("b", help="FOLDER:ROW")
    ap.add_argument("--app", required=True)
    args = ap.parse_args()
    app = get_app(args.app)
    if app.success not in ("image", "elements"):
        raise SystemExit(f"--app {app.id}: its success pools {app.success}s, not one yes or no per image; pick an image app")
    sides = [_side(args.a), _side(args.b)]
    for folder, _ in sides:
        if not (folder / "results.json").is_file():
            raise SystemExit(f"{str(folder)!r}: no results.json; finish its bench run (run the same command again) first")
    settings = [json.loads((folder / "results.json").read_text())["settings"] for folder, _ in sides]
    keys = ("seeds", "prompts_per_app", "num_inference_steps", "guidance_scale", "scheduler", "dtype", "judge")
    differ = [k for k in keys if settings[0].get(k) != settings[1].get(k)]
    if differ:
        raise SystemExit(f"the two folders were run with different {', '.join(differ)}: the images do not pair")
    rows = {r.id: r for r in app.rows()[0]}
    for _, row in sides:
        if row not in rows:
            raise SystemExit(f"row {row!r}: not a row of {app.id} (rows: {', '.join(rows)})")

    counts = {(True, True): 0, (True, False): 0, (False, True): 0, (False, False): 0}
    for p in app.prompts(settings[0]["prompts_per_app"]):
        for s in range(settings[0]["seeds"]):
            hit = []
            for folder, row in sides:
                sample = json.loads(sample_path(folder, app.id, row, p.index, s).read_text())
                hit.append(bool(sample_success(app, sample["readings"], [v.target for v in rows[row].views(p)])[0]))
            counts[tuple(hit)] += 1
    n = sum(counts.values())
    print(f"{app.id}, {n} images paired by prompt and seed")
    print(f"  A {args.a}: {(counts[True, True] + counts[True, False]) / n:.3f}")
    print(f"  B {args.b}: {(counts[True, True] + counts[False, True]) / n:.3f}")
    print(
        f"  both right {counts[True, True]}, A only {counts[True, False]}, B only {counts[False, True]}, neither {counts[False, False]}"
    )
    print(f"  exact McNemar p = {mcnemar_p(counts[True, False], counts[False, True]):.2g}")


if __name__ == "__main__":
    main()
