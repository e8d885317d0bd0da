"""The training helper on a toy regression: exact resume after a kill, the loss log, pickle-free checkpoints."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from multifusion.training import (
    CHECKPOINT,
    LOSS_LOG,
    CheckpointError,
    TrainingRun,
    load_checkpoint,
    load_tensors,
    read_log,
    save_tensors,
    step_generator,
)

STEPS = 11  # checkpoints every 4 steps, log rows every 2: a kill at step 7 loses steps 5-7


class Killed(Exception):
    """Stands in for the process dying in the middle of a step."""


def _run(folder: Path) -> TrainingRun:
    torch.manual_seed(0)  # the same initial weights in every run
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return TrainingRun(
        folder,
        "toy",
        model,
        opt,
        seed=3,
        modules={"ema": ema},
        metrics=("loss", "mae"),
        checkpoint_every=4,
        log_every=2,
        accelerator=Accelerator(cpu=True),
    )


def _train(folder: Path, stop: int | None = None, kill_at: int | None = None) -> TrainingRun:
    """Resume (or start) the toy run in ``folder`` and train it towards STEPS."""
    run = _run(folder)
    meta = run.resume()
    assert meta in (None, {"task": "toy"})
    ema, model = list(run.modules["ema"].parameters()), list(run.modules["model"].parameters())

    def step(index: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        if index == kill_at:
            raise Killed
        x = torch.randn(16, 4, generator=g)
        err = run.model(x) - x.sum(dim=1, keepdim=True).sin()
        return {"loss": err.pow(2).mean(), "mae": err.abs().mean()}

    def after_step(index: int) -> None:
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model], 0.1)

    run.train(
        step,
        STEPS,
        lr=lambda s: 1e-2 * min(1.0, (s + 1) / 3),
        max_grad_norm=0.5,
        after_step=after_step,
        stop=stop,
        meta={"task": "toy"},
        progress=False,
    )
    return run


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_checkpoints(a: Path, b: Path) -> bool:
    x, y = load_checkpoint(a / CHECKPOINT), load_checkpoint(b / CHECKPOINT)
    states = x.optimizer["state"].keys() == y.optimizer["state"].keys() and all(
        _equal(x.optimizer["state"][i], y.optimizer["state"][i]) for i in x.optimizer["state"]
    )
    return (x.step, x.meta) == (y.step, y.meta) and all(_equal(x.modules[k], y.modules[k]) for k in ("model", "ema")) and states


def _numbers(folder: Path) -> list[tuple]:
    """The log without its wall-clock column."""
    return [(r["step"], r["loss"], r["mae"], r["lr"]) for r in read_log(folder / LOSS_LOG, STEPS)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("straight")
    _train(folder)
    return folder


def test_a_killed_and_resumed_run_equals_an_uninterrupted_one(straight, tmp_path):
    with pytest.raises(Killed):
        _train(tmp_path, kill_at=7)
    assert load_checkpoint(tmp_path / CHECKPOINT).step == 4
    resumed = _train(tmp_path)
    assert resumed.step == STEPS and _same_checkpoints(straight, tmp_path)
    assert resumed.optimizer.param_groups[0]["betas"] == (0.9, 0.999)  # a tuple again after JSON
    assert _numbers(tmp_path) == _numbers(straight)  # the same rows, none twice


def test_a_run_stopped_early_continues_to_the_same_weights(straight, tmp_path):
    assert _train(tmp_path, stop=5).step == 5
    assert load_checkpoint(tmp_path / CHECKPOINT).step == 5  # a checkpoint where the call stopped
    _train(tmp_path)
    assert _same_checkpoints(straight, tmp_path)


def test_resuming_truncates_the_log_to_the_checkpoint(tmp_path):
    with pytest.raises(Killed):
        _train(tmp_path, kill_at=7)
    assert [row[0] for row in _numbers(tmp_path)] == ["2", "4", "6"]  # row 6 is past the checkpoint (step 4)
    _train(tmp_path, stop=4)  # resume, and stop at once
    assert [row[0] for row in _numbers(tmp_path)] == ["2", "4"]
    assert (tmp_path / LOSS_LOG).read_text().splitlines()[0] == "step,loss,mae,lr,seconds"


class Payload:
    """A pickle that creates ``marker`` when it is unpickled: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("planted", [CHECKPOINT, "checkpoint.pt"])
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_where_a_checkpoint_is_expected_is_refused_unread(tmp_path, planted, writer):
    marker = tmp_path / "code-ran"
    folder = tmp_path / "run"
    folder.mkdir()
    if writer == "pickle":
        (folder / planted).write_bytes(pickle.dumps({"model": Payload(marker)}))
    else:
        torch.save({"model": Payload(marker)}, folder / planted)
    message = "not a safetensors file" if planted == CHECKPOINT else "pickled checkpoint from an older multifusion"
    with pytest.raises(CheckpointError, match=f"{message}.*can run arbitrary code"):
        _train(folder)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_checkpoint(folder / planted)
    assert not marker.exists()
    pickle.loads(pickle.dumps(Payload(marker)))  # the control: unpickled, the payload does run
    assert marker.exists()


def test_the_step_generator_depends_on_seed_tag_and_step_only():
    def draw(seed: int, tag: str, step: int) -> torch.Tensor:
        return torch.randn(8, generator=step_generator(seed, tag, step))

    assert torch.equal(draw(0, "unet/general", 5), draw(0, "unet/general", 5))
    others = [draw(1, "unet/general", 5), draw(0, "unet/expert", 5), draw(0, "unet/general", 6)]
    assert not any(torch.equal(draw(0, "unet/general", 5), other) for other in others)


def test_tensors_come_back_with_values_and_channels_last_layout(tmp_path):
    latents = torch.randn(3, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    ids = torch.arange(6).view(2, 3)
    save_tensors(tmp_path / "t.safetensors", {"latents": latents, "ids": ids}, {"note": "x"})
    tensors, info = load_tensors(tmp_path / "t.safetensors")
    assert info == {"note": "x"} and torch.equal(tensors["ids"], ids) and torch.equal(tensors["latents"], latents)
    assert tensors["latents"].stride() == latents.stride() and tensors["ids"].is_contiguous()


def test_no_source_file_unpickles():
    src = Path(__file__).parents[2] / "src" / "multifusion"
    offenders = [
        p.relative_to(src) for p in src.rglob("*.py") if "weights_only=False" in p.read_text() or "pickle.load" in p.read_text()
    ]
    assert offenders == []
