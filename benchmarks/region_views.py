"""Per-region success of the regional apps, from a finished `multifusion bench` folder (no
sampling): for each row and each region (view), the fraction of images whose region is read
entirely right (scene, stated style, its object with every stated attribute), with a 95 %
Wilson interval; and the same with the object allowed anywhere in the region ("anywhere":
the target's slot dropped), which tells placement errors from drawing errors; and the fraction
of images in which the judge reads more objects in the region than its target states ("extra").

    python benchmarks/region_views.py runs/bench-evidence regional single-canvas,mod
    python benchmarks/region_views.py runs/bench-models regional-models mod-general,mod-models --seeds 32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def view_right(reading: dict, spec) -> bool:
    from multifusion.zoo.metrics import instance_success_rate

    return (
        instance_success_rate([reading], [spec]) == 1.0
        and (spec.background is None or reading["background"] == spec.background)
        and (spec.style is None or reading["style"] == spec.style)
    )


def main() -> None:
    from multifusion.bench.apps import get_app
    from multifusion.bench.layout import sample_path
    from multifusion.bench.stats import wilson_interval

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="a bench output folder")
    ap.add_argument("app")
    ap.add_argument("rows", help="comma-separated row ids")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=64)
    args = ap.parse_args()

    app = get_app(args.app)
    rows = {r.id: r for r in app.rows()[0]}
    prompts = app.prompts(args.prompts)
    print(f"{args.prompts} prompts x {args.seeds} seeds; regions left to right\n")
    print("| row | region | right (95% CI) | object anywhere in the region (95% CI) | extra |\n|---|---|---|---|---|")
    for rid in args.rows.split(","):
        row = rows[rid]
        n_views = len(row.views(prompts[0]))
        right, anywhere, extra = [0] * n_views, [0] * n_views, [0] * n_views
        n = 0
        for p in prompts:
            views = row.views(p)
            for s in range(args.seeds):
                sample = json.loads(sample_path(Path(args.out), app.id, rid, p.index, s).read_text())
                n += 1
                for k, (reading, v) in enumerate(zip(sample["readings"], views, strict=True)):
                    spec = v.target
                    loose = dataclasses.replace(spec, objects=tuple(dataclasses.replace(o, slot=None) for o in spec.objects))
                    right[k] += view_right(reading, spec)
                    anywhere[k] += view_right(reading, loose)
                    extra[k] += sum(x is not None for x in reading["slots"].values()) > len(spec.objects)
        for k in range(n_views):
            (a, b), (c, d) = wilson_interval(right[k], n), wilson_interval(anywhere[k], n)
            print(
                f"| {rid} | {k} | {right[k] / n:.3f} [{a:.3f}, {b:.3f}] | {anywhere[k] / n:.3f} [{c:.3f}, {d:.3f}] | {extra[k] / n:.3f} |"
            )


if __name__ == "__main__":
    main()
