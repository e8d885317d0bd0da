"""LoRA Switch and LoRA Composite against the base alone: cost per sampling step, on the zoo.

N random LoRAs (seeded, non-zero, rank R; `multifusion.testing.lora`) are made on zoo:general's
UNet attention projections; the models are general + LoRA k, k = 1..N, on one base held once.
For N = 2 and 3, one run of S steps (the shared loop, no VAE decode) of each of

- `single` of zoo:general alone (the base, no adapters),
- `single` of general + LoRA 1 (one LoRA model: the adapter layers' own cost),
- `lora-switch` over the N LoRA models (tau 1: an adapter switch at every step, the worst case),
- `lora-composite` over the N LoRA models,

and for LoRAs 1 and 2 on one model: that model under `single` (LoRA Merge, both adapters on every
layer) and under `k-lora` (LoRA 1 the subject, LoRA 2 the style: one adapter per attention
projection, chosen before each denoiser call),

is timed in alternation (`common.interleaved_medians`), and the table prints each one's time per
step and its ratio to the base alone, side by side from one run. Expected: Switch about the cost
of one LoRA model (one model evaluated per step, plus one adapter switch), Composite about N
times it (N models evaluated per step), K-LoRA about one LoRA model (one adapter per layer; the
choice is made once per step from top-K sums computed once per run).

Composite's N models (and `average` of the base and one LoRA model) run in one denoiser call of
N x the batch (`handles.predict_many`: peft's mixed batch); the rows marked "one by one" run the
same recipes with that grouping off (one call per model, each after its adapter switch), so the
last column of those pairs is what the shared call saves.

    python benchmarks/bench_multi_lora.py [--rank 8] [--steps 10] [--repeats 15]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from pathlib import Path

PROMPT = "a red circle in a snowy field"


def plan_runner(recipe: dict, steps: int):
    """A function running the recipe's plan for one image over `steps` steps (no decode)."""
    import torch

    from multifusion.api import Run
    from multifusion.loop import Trajectory, initial_noise, sample
    from multifusion.method import Batch

    run = Run(recipe)
    generators = [torch.Generator("cpu").manual_seed(0)]
    batch = Batch([0], [0], initial_noise(run.latent_shape, generators))

    def go():
        plan = run.method.plan(run.prepared, batch)  # a fresh plan each time: Switch starts its turns again
        scheduler = run.handles[0].scheduler("ddim", run.latent_shape[1:])
        trajectories = [Trajectory(tr.denoise, scheduler, batch.noise) for tr in plan.trajectories]  # one trajectory each
        sample(trajectories, num_inference_steps=steps, progress=False)

    return go


@contextlib.contextmanager
def one_by_one():
    """Every model called on its own (`predict_many` without grouping) while the block runs."""
    from multifusion import handles
    from multifusion.noise import snb

    grouped = handles.predict_many

    def apart(guided, x_t, t, need_uncond=False):
        return [g.predict(x_t, t, need_uncond) for g in guided]

    handles.predict_many = snb.predict_many = apart
    try:
        yield
    finally:
        handles.predict_many = snb.predict_many = grouped


def unbatched(go):
    def run():
        with one_by_one():
            go()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()

    import torch
    from common import interleaved_medians

    from multifusion.loading import zoo_root
    from multifusion.testing.lora import write_random_lora

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="mf-bench-multilora-"))
    try:
        general = str(zoo_root() / "general")
        loras = [write_random_lora(general, root / f"lora{k}", seed=k, rank=args.rank, std=0.05) for k in range(1, 4)]
        models = [{"model": general, "name": f"lora{k}", "loras": [{"path": str(f)}]} for k, f in enumerate(loras, 1)]

        def recipe(method: str, ms: list[dict], params: dict | None = None) -> dict:
            sampling = {"num_inference_steps": args.steps, "seed": 0, "height": 64, "width": 64}
            return {"method": method, "prompt": PROMPT, "models": ms, "params": params or {}, "sampling": sampling}

        runs = {"base alone": recipe("single", [{"model": general}]), "one LoRA model": recipe("single", models[:1])}
        runs["average, base + one LoRA model"] = recipe("average", [{"model": general}, models[0]])
        for n in (2, 3):
            runs[f"lora-switch, {n} LoRAs (tau 1)"] = recipe("lora-switch", models[:n], {"tau": 1})
            runs[f"lora-composite, {n} LoRAs"] = recipe("lora-composite", models[:n])
        both = [{"model": general, "name": "both", "loras": [{"path": str(f)} for f in loras[:2]]}]
        runs["LoRA Merge, 2 LoRAs on one model (single)"] = recipe("single", both)
        runs["k-lora, subject + style"] = recipe("k-lora", both)
        runners = {k: plan_runner(r, args.steps) for k, r in runs.items()}
        for k in [k for k in runs if k.startswith(("lora-composite", "average"))]:
            runners[f"{k}, one by one"] = unbatched(runners[k])
        times = interleaved_medians(runners, args.repeats, warmup=2)

        print(
            f"zoo:general, 64x64, CFG, DDIM; random LoRAs of rank {args.rank} on the UNet's attention projections; "
            f"{args.steps} steps per run, median of {args.repeats} runs timed in alternation, one thread"
        )
        print("| run | ms per step | over the base alone | over one LoRA model | shared call over one by one |")
        print("|---|---|---|---|---|")
        base, one = times["base alone"], times["one LoRA model"]
        for name, t in times.items():
            if name.endswith("one by one"):
                continue
            apart = times.get(f"{name}, one by one")
            print(
                f"| {name} | {t / args.steps * 1e3:.2f} | {t / base:.2f} | {t / one:.2f} | {'' if apart is None else f'{t / apart:.2f}'} |"
            )
            if apart is not None:
                print(f"| {name}, one by one | {apart / args.steps * 1e3:.2f} | {apart / base:.2f} | {apart / one:.2f} | |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
