"""LoRA models on one base against full models: peak memory and time per step, on the zoo.

Random rank-R LoRAs (seeded, non-zero; `multifusion.testing.lora`) are made on zoo:general's UNet
attention projections, and for each one a full copy of general with it fused in (what a user
bakes by hand without LoRA support). Each configuration then runs in a fresh process, in float32:

- `snb` over (general, general + LoRA 1) against `snb` over (general, fused 1);
- a 4-region `mod` (2x2 quarters of a 128x128 canvas) whose regions are general + LoRA k, k = 1..4,
  against the same regions painted by fused 1..4.

For each: the bytes the loaded models hold (`loading.held_bytes`: every parameter and buffer, each
storage once) and the peak resident memory of loading and sampling above what the process held
before (Linux: /proc/self/clear_refs resets the high-water mark). Then, in one process, one `snb`
sampling step of each pair timed in alternation (`common.interleaved_medians`), and the adapter
switch alone (activating the LoRA set, then the base's empty set, on the shared UNet). Ratios are
LoRA over full, side by side from one run.

    python benchmarks/bench_lora_memory.py [--rank 8] [--steps 6] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT = "a red circle in a snowy field"
QUARTERS = [(0, 0.5, 0, 0.5), (0, 0.5, 0.5, 1), (0.5, 1, 0, 0.5), (0.5, 1, 0.5, 1)]


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def recipe(kind: str, models: list[dict], steps: int) -> dict:
    if kind == "snb":
        return {
            "method": "snb",
            "prompt": PROMPT,
            "models": models,
            "sampling": {"num_inference_steps": steps, "seed": 0, "height": 64, "width": 64},
        }
    regions = [
        {"row_init": r0, "row_end": r1, "col_init": c0, "col_end": c1, "units": "fraction", "prompt": PROMPT, "model": f"m{k}"}
        for k, (r0, r1, c0, c1) in enumerate(QUARTERS)
    ]
    return {
        "method": "mod",
        "prompt": PROMPT,
        "models": models,
        "params": {"regions": regions},
        "sampling": {"num_inference_steps": steps, "seed": 0, "height": 128, "width": 128},
    }


def child(recipe_json: str, warmup_lora: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from multifusion.api import Run
    from multifusion.loading import held_bytes

    r = json.loads(recipe_json)
    # One-off costs (lazy imports of diffusers' pipelines and loaders, peft, the allocator's first
    # arenas) do not count: a one-step run of the base with a LoRA first.
    first = r["models"][0]["model"]
    warm = Run(
        {
            **r,
            "method": "single",
            "params": {},
            "models": [{"model": first, "loras": [{"path": warmup_lora}]}],
            "sampling": {**r["sampling"], "num_inference_steps": 1},
        }
    )
    warm.batch([0], progress=False)
    del warm
    before = _kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    run = Run(r)
    held = held_bytes(run.handles)
    run.batch([0], progress=False)
    return {"held": held, "peak_extra_kb": _kb("VmHWM") - before}


def build(root: Path, rank: int) -> tuple[str, list[Path], list[str]]:
    """zoo:general's folder, five LoRAs (the first warms each measuring process up) and general
    with each of the other four fused in."""
    from multifusion.loading import zoo_root
    from multifusion.testing.lora import write_fused, write_random_lora

    general = str(zoo_root() / "general")
    loras = [write_random_lora(general, root / f"lora{k}", seed=k, rank=rank, std=0.05) for k in range(5)]
    fused = [str(write_fused(general, lora, root / f"fused{k}")) for k, lora in enumerate(loras[1:], 1)]
    return general, loras, fused


def measure(r: dict, warmup_lora: Path) -> dict:
    res = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(r), str(warmup_lora)], check=True, capture_output=True, text=True
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def step_times(general: str, lora: Path, fused: str, repeats: int) -> dict[str, float]:
    import torch
    from common import interleaved_medians

    from multifusion.loading import load_models
    from multifusion.noise import SNB
    from multifusion.schedulers import make_scheduler

    base, with_lora = load_models([general, general], loras=[[], [{"path": str(lora)}]])
    plain, full = load_models([general, fused])
    pairs = {"lora": (base, with_lora), "full": (plain, full)}
    combiners = {k: SNB([a.guide(PROMPT), b.guide(PROMPT)], [1.0, 1.0]) for k, (a, b) in pairs.items()}
    scheduler = make_scheduler("ddim", base.scheduler_config)
    scheduler.set_timesteps(30)
    t = scheduler.timesteps[10]
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def step(fn):
        def go():
            fn(scheduler.scale_model_input(x, t), t)

        return go

    def switch():
        with_lora.adapters.activate(with_lora.unet)
        base.adapters.activate(base.unet)

    return interleaved_medians({"lora": step(combiners["lora"]), "full": step(combiners["full"]), "switch": switch}, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--child", nargs=2, metavar=("RECIPE_JSON", "WARMUP_LORA"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    root = Path(tempfile.mkdtemp(prefix="mf-bench-lora-"))
    try:
        general, (warmup, *loras), fused = build(root, args.rank)
        lora_mb = loras[0].stat().st_size / 2**20
        unet_mb = sum(p.stat().st_size for p in (Path(fused[0]) / "unet").glob("*.safetensors")) / 2**20
        print(
            f"zoo:general; LoRAs of rank {args.rank} on the UNet's attention projections: {lora_mb:.2f} MB each (float32), UNet {unet_mb:.2f} MB (float32)"
        )
        lora_models = [{"model": general, "name": f"m{k}", "loras": [{"path": str(f)}]} for k, f in enumerate(loras)]
        full_models = [{"model": f, "name": f"m{k}"} for k, f in enumerate(fused)]
        rows = {
            "snb, 2 models": (
                recipe("snb", [{"model": general, "name": "base"}, {**lora_models[0], "name": "m1"}], args.steps),
                recipe("snb", [{"model": general, "name": "base"}, {**full_models[0], "name": "m1"}], args.steps),
            ),
            "mod, 4 regions / 4 models": (recipe("mod", lora_models, args.steps), recipe("mod", full_models, args.steps)),
        }
        print("| run | held MB, LoRAs | held MB, full | held ratio | peak extra MB, LoRAs | peak extra MB, full | peak ratio |")
        print("|---|---|---|---|---|---|---|")
        for name, (with_loras, with_full) in rows.items():
            a, b = measure(with_loras, warmup), measure(with_full, warmup)
            pa, pb = a["peak_extra_kb"] / 1024, b["peak_extra_kb"] / 1024
            print(
                f"| {name} | {a['held'] / 2**20:.2f} | {b['held'] / 2**20:.2f} | {a['held'] / b['held']:.2f} | "
                f"{pa:.1f} | {pb:.1f} | {pa / pb:.2f} |"
            )
        t = step_times(general, loras[0], fused[0], args.repeats)
        print()
        print("| snb step, 64x64, CFG | LoRA pair ms | full pair ms | ratio | adapter switch (2 per step) ms |")
        print("|---|---|---|---|---|")
        print(
            f"| one step | {t['lora'] * 1e3:.2f} | {t['full'] * 1e3:.2f} | {t['lora'] / t['full']:.2f} | {t['switch'] * 1e3:.3f} |"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
