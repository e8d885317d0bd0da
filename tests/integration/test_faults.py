"""Faults (issue 19): `generate`, `bench` and `afa train` killed with SIGKILL at random points,
several times, then run to the end, give final outputs identical to an uninterrupted run.

SIGKILL leaves no chance to clean up, so what this checks is that every file is written
atomically and that a resumed run trusts only finished files. Each run is a real subprocess on
the tiny test models; kills land after a random number of finished files plus a random delay,
so they fall in the middle of sampling, between batches and during writes. Bounded in time: a
few kills each, every wait capped. (`zoo train` trains through the same `multifusion.training`
loop as `afa train`; its models are too big for a test, and tests/unit/test_training.py kills
and resumes that loop.)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

KILLS = 3
WAIT_S = 120  # the longest any one run may take before the test fails


def _env() -> dict:
    # One thread (the conftest's setting): float rounding, hence bytes, must match across runs.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "multifusion.cli", *args]


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stderr[-3000:]


def _kill_at_random(argv: list[str], finished, rng: random.Random, kills: int = KILLS) -> int:
    """Start `argv` `kills` times, each time SIGKILLing it once `finished()` has grown by a
    random amount (0 to 2 files) past the last run's, plus a random delay under 0.4 s. Returns
    how many runs were really killed (a run may finish first)."""
    killed = 0
    for _ in range(kills):
        proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = finished() + rng.randint(0, 2)
        deadline = time.monotonic() + WAIT_S
        while proc.poll() is None and finished() < target and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait(timeout=WAIT_S)
    return killed


def _final_files(root: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Finished outputs by relative path (temporary `.part` files left by a SIGKILL are not outputs)."""
    return {
        str(p.relative_to(root)): p
        for p in root.rglob("*")
        if p.is_file() and p.suffix in suffixes and not p.name.startswith(".")
    }


def test_generate_killed_at_random_points_ends_identical(tmp_path, tiny_a, tiny_b):
    recipe = {
        "method": "average",
        "params": {"weights": [0.6, 0.4]},
        "models": [{"model": tiny_a, "prompt": "a red circle"}, {"model": tiny_b, "prompt": "a blue square"}],
        "sampling": {"num_inference_steps": 4, "num_images": 8, "seed": 3, "height": 32, "width": 32, "scheduler": "euler_a"},
    }
    path = tmp_path / "fault.yaml"
    path.write_text(yaml.safe_dump(recipe))
    ref, out = tmp_path / "ref", tmp_path / "out"
    _run(_cli("generate", str(path), "--out", str(ref), "--batch-size", "2", "--no-progress"))

    argv = _cli("generate", str(path), "--out", str(out), "--batch-size", "2", "--no-progress")
    killed = _kill_at_random(argv, lambda: len(_final_files(out, (".png",))) if out.exists() else 0, random.Random(19))
    _run(argv)

    want, got = _final_files(ref, (".png",)), _final_files(out, (".png",))
    assert sorted(got) == sorted(want) and len(want) == 8
    assert all(got[name].read_bytes() == want[name].read_bytes() for name in want)
    assert killed >= 1  # the test exercised at least one kill


def _bench_argv(out: Path, tiny_a: str, tiny_b: str) -> list[str]:
    return _cli(
        "bench",
        "fine-grained",
        "--out",
        str(out),
        "--model",
        f"general={tiny_a}",
        "--model",
        f"expert={tiny_b}",
        "--seeds",
        "4",
        "--prompts",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--no-progress",
    )


def _bench_outcome(root: Path) -> dict:
    """What a bench run decides: every sample image's bytes, every sample record and the result
    rows, less the timings (which differ between any two runs)."""
    samples = {}
    for name, p in _final_files(root / "samples", (".png", ".json")).items():
        if p.suffix == ".png":
            samples[name] = p.read_bytes()
        else:
            samples[name] = {k: v for k, v in json.loads(p.read_text()).items() if k != "seconds"}
    return {"samples": samples, "rows": json.loads((root / "results.json").read_text())["rows"]}


def test_bench_killed_at_random_points_ends_identical(tmp_path, tiny_a, tiny_b):
    ref, out = tmp_path / "ref", tmp_path / "out"
    _run(_bench_argv(ref, tiny_a, tiny_b))

    argv = _bench_argv(out, tiny_a, tiny_b)
    samples = out / "samples"
    killed = _kill_at_random(
        argv, lambda: len(_final_files(samples, (".png",))) // 2 if samples.exists() else 0, random.Random(63)
    )
    _run(argv)

    want, got = _bench_outcome(ref), _bench_outcome(out)
    assert sorted(got["samples"]) == sorted(want["samples"])
    assert got == want
    assert killed >= 1


def test_afa_train_killed_at_random_points_ends_identical(tmp_path, tiny_a, tiny_b):
    """`afa train` through the CLI, SIGKILLed mid-run (between and during checkpoints), resumed
    to the same aggregator weights as an uninterrupted run. (`zoo train` uses the same
    `multifusion.training` loop; its real models are too big for a test, and
    tests/unit/test_training.py kills and resumes that loop.)"""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": ["a red circle", "a blue square"][i % 2]}))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")

    def argv(out: Path) -> list[str]:
        return _cli(
            "afa",
            "train",
            tiny_a,
            tiny_b,
            "--data",
            str(data),
            "--out",
            str(out),
            "--steps",
            "8",
            "--batch-size",
            "2",
            "--width",
            "8",
            "--checkpoint-every",
            "2",
            "--no-progress",
        )

    ref, out = tmp_path / "ref", tmp_path / "out"
    _run(argv(ref))

    def logged() -> int:
        log = out / "loss.csv"
        return max(0, len(log.read_text().splitlines()) - 1) // 2 if log.exists() else 0

    killed = _kill_at_random(argv(out), logged, random.Random(13))
    _run(argv(out))

    for name in ("checkpoint.safetensors",):
        a, b = load_file(str(ref / name)), load_file(str(out / name))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    weights = sorted(p.relative_to(ref) for p in (ref / "aggregator").rglob("*.safetensors"))
    assert weights and weights == sorted(p.relative_to(out) for p in (out / "aggregator").rglob("*.safetensors"))
    for rel in weights:
        a, b = load_file(str(ref / rel)), load_file(str(out / rel))
        assert all(a[k].equal(b[k]) for k in a)
    assert killed >= 1
