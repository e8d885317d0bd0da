"""Weight merges of 2, 4 and 8 models: peak memory over one model's size, and time over I/O.

Eight same-architecture pipelines are built in a temporary folder: a UNet of about 84 MB in
float32 (3 levels, 96/192/192 channels) with the tiny test text encoder, and seven copies whose
UNets are perturbed. For N = 2, 4, 8, a fresh process measures:

- streaming: `merge_models` (weighted sum, equal weights). Peak resident memory above what the
  process held before (VmHWM reset via /proc/self/clear_refs, so mapped file pages count too),
  over one model's weight bytes. Target: <= 1.5 whatever N.
- naive, for contrast: every input's state dicts loaded whole (`safetensors.torch.load_file`)
  and merged in memory, as most scripts do; grows with N.
- merge of merges: the same N inputs as a tree of pairwise weighted sums (N = 4:
  merge(merge(m0, m1), merge(m2, m3)); N = 8: one more level), streamed by `merge_models`
  without writing the inner merges; its peak and time over the plain N-model merge's,
  measured side by side (the tree reads every input once per tensor, as the plain merge does).
- time: the whole streaming merge (checks, input hashes for merge.json, UNet) over an I/O
  floor measured in alternation in the same process (the UNet's reads, equality checks and
  streaming write with the arithmetic replaced by taking model 0's tensor), with the files in
  the page cache; and seconds per GB read, for scale only.

    python benchmarks/bench_merge_memory.py [--repeats 2] [--counts 2 4 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COUNTS = (2, 4, 8)
UNET = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(96, 192, 192),
    layers_per_block=2,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
    sample_size=8,
)


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def build(root: Path, n: int) -> list[str]:
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    from multifusion.testing import build_tiny_pipeline

    first = build_tiny_pipeline(root / "m0", seed=0)
    shutil.rmtree(first / "unet")
    torch.manual_seed(0)
    UNet2DConditionModel(**UNET).save_pretrained(first / "unet", safe_serialization=True)
    weights = first / "unet" / "diffusion_pytorch_model.safetensors"
    base = load_file(weights)
    folders = [first]
    for i in range(1, n):
        folder = root / f"m{i}"
        shutil.copytree(first, folder)
        g = torch.Generator().manual_seed(i)
        save_file(
            {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()},
            folder / "unet" / "diffusion_pytorch_model.safetensors",
            metadata={"format": "pt"},
        )
        folders.append(folder)
    return [str(f) for f in folders]


def model_bytes(folder: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))


def pairs(models: list):
    """(models, spec) of the merge of `models` as a tree of pairwise equal-weight merges."""
    from multifusion.weights import MergeSpec
    from multifusion.weights.models import Merge

    level = list(models)
    while len(level) > 2:
        level = [Merge(tuple(level[i : i + 2]), MergeSpec(), f"pair{i}") for i in range(0, len(level), 2)]
    return level, MergeSpec()


def child(models: list[str], mode: str, out: str, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from multifusion.weights import MergeSpec, merge_models
    from multifusion.weights import models as m

    for f in models:  # page cache warm: both timings read from memory
        for p in Path(f).rglob("*.safetensors"):
            p.read_bytes()
    if mode in ("stream", "nested"):  # one-off costs (lazy imports, the allocator's first arenas) do not count
        shutil.rmtree(merge_models(models[:2], Path(out) / "warmup", MergeSpec()))
    before = _kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    if mode == "naive":
        from safetensors.torch import load_file

        start = time.perf_counter()
        sds = [{c: load_file(next((Path(f) / c).glob("*.safetensors"))) for c in ("unet", "text_encoder")} for f in models]
        merged = {c: {k: sum(sd[c][k] for sd in sds) / len(sds) for k in sds[0][c]} for c in sds[0]}
        seconds = time.perf_counter() - start
        del merged, sds
        return {"peak_extra_kb": _kb("VmHWM") - before, "seconds": seconds}

    spec = MergeSpec()
    if mode == "nested":
        models, spec = pairs(models)
    plan = m.plan_merge(models, spec)
    unet = next(c for c in plan.components if c.name == "unet")

    def floor() -> None:
        """The merge's own reads, equality checks and streaming write, with the arithmetic
        replaced by taking the first model's tensor."""
        maths = m.MergePlan.merge
        m.MergePlan.merge = lambda self, component, name, tensors: tensors[0]
        try:
            m.write_safetensors(Path(out) / "floor.safetensors", unet.header, m.merged_tensors(plan, unet))
        finally:
            m.MergePlan.merge = maths

    times: dict[str, list[float]] = {"merge": [], "floor": []}
    peak = 0
    for r in range(repeats):
        start = time.perf_counter()
        merge_models(models, Path(out) / f"merged{r}", spec)
        times["merge"].append(time.perf_counter() - start)
        peak = max(peak, _kb("VmHWM") - before)
        shutil.rmtree(Path(out) / f"merged{r}")
        start = time.perf_counter()
        floor()
        times["floor"].append(time.perf_counter() - start)
    return {"peak_extra_kb": peak, "merge_s": statistics.median(times["merge"]), "floor_s": statistics.median(times["floor"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    ap.add_argument("--child", nargs=3, metavar=("MODELS_JSON", "MODE", "OUT"))
    args = ap.parse_args()
    if args.child:
        models_json, mode, out = args.child
        print(json.dumps(child(json.loads(models_json), mode, out, args.repeats)))
        return

    root = Path(tempfile.mkdtemp(prefix="mf-bench-merge-"))
    try:
        models = build(root, max(COUNTS))
        size = model_bytes(models[0])
        print(f"one model: {size / 2**20:.1f} MB of safetensors (UNet {model_bytes(models[0] + '/unet') / 2**20:.1f} MB)")
        print("| models | streaming peak / model | naive peak / model | merge time / I/O floor | streaming s per GB read |")
        print("|---|---|---|---|---|")
        nested_rows = []
        for n in args.counts:
            row = {}
            for mode in ("stream", "naive", "nested") if n >= 4 else ("stream", "naive"):
                out = root / f"out-{n}-{mode}"
                out.mkdir()
                res = subprocess.run(
                    [sys.executable, __file__, "--repeats", str(args.repeats), "--child", json.dumps(models[:n]), mode, str(out)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                row[mode] = json.loads(res.stdout.strip().splitlines()[-1])
            s = row["stream"]
            read_gb = n * size / 2**30
            print(
                f"| {n} | {s['peak_extra_kb'] * 1024 / size:.2f} | {row['naive']['peak_extra_kb'] * 1024 / size:.2f} | "
                f"{s['merge_s'] / s['floor_s']:.2f} | {s['merge_s'] / read_gb:.1f} |"
            )
            if "nested" in row:
                t = row["nested"]
                nested_rows.append(
                    f"| {n} | {s['peak_extra_kb'] * 1024 / size:.2f} | {t['peak_extra_kb'] * 1024 / size:.2f} | "
                    f"{t['peak_extra_kb'] / s['peak_extra_kb']:.2f} | {t['merge_s'] / s['merge_s']:.2f} |"
                )
        if nested_rows:
            print()
            print(
                "| inputs | plain merge peak / model | merge of merges peak / model | peak ratio (tree / plain) | time ratio (tree / plain) |"
            )
            print("|---|---|---|---|---|")
            print("\n".join(nested_rows))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
