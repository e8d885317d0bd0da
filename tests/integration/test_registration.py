"""A method from outside the package, added through the public registration path only: a plan
with two trajectories whose `meet` swaps them after every step, run end to end."""

import sys
import textwrap

import pytest
import torch
from PIL import Image

import multifusion
from multifusion import RecipeError, load_models
from multifusion.loop import Trajectory, initial_noise, sample
from multifusion.registry import METHODS
from multifusion.schedulers import make_scheduler

PACKAGE = '''
"""A throwaway method: two models, one trajectory each, swapped after every step; its picture
is one pixel per step it saw."""
from pathlib import Path

from PIL import Image

from multifusion import register
from multifusion.io import atomic_path
from multifusion.loop import Trajectory
from multifusion.method import Method, Params, Plan


class SwapParams(Params):
    output: int = 0


def plan(prep, batch):
    first, second = prep.ctx.guided(batch)
    return Plan([Trajectory(first), Trajectory(second)], meet=lambda step: step.latents[::-1], output=prep.params.output)


class StepStrip:
    def __init__(self):
        self.steps = []

    def __call__(self, step):
        self.steps.append(step.step)

    def save(self, stem, image=0, model_names=None):
        path = Path(f"{stem}-swap.png")
        with atomic_path(path) as tmp:
            Image.new("L", (len(self.steps), 1)).save(tmp, format="PNG")
        return [path]


register(Method("swap-test", "two trajectories swapped after every step", "latents", SwapParams, plan,
                min_models=2, max_models=2, recorders=lambda vae: [StepStrip()]))
'''


@pytest.fixture
def swap_package(tmp_path, monkeypatch):
    (tmp_path / "swapmethod").mkdir()
    (tmp_path / "swapmethod" / "__init__.py").write_text(textwrap.dedent(PACKAGE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield __import__("swapmethod")
    METHODS.pop("swap-test", None)
    sys.modules.pop("swapmethod", None)


def test_a_registered_method_runs_end_to_end(swap_package, tiny_a, tiny_b, tmp_path):
    ha, hb = load_models([tiny_a, tiny_b])
    out = multifusion.swap_test(
        [ha, hb], ["a red circle", "a blue square"], num_inference_steps=3, seed=2, num_images=2, progress=False
    )

    # Independently: DDIM keeps no state, and both trajectories start from the same noise, so the
    # latent that ends in slot 0 is one trajectory whose model alternates B, A, B (slot k is
    # stepped by model k, then the slots swap: the last step it took was in slot 1).
    ga, gb = ha.guide("a red circle", batch_size=2), hb.guide("a blue square", batch_size=2)
    order = iter([gb, ga, gb])
    noise = initial_noise((4, 8, 8), [torch.Generator().manual_seed(s) for s in (2, 3)])
    [ref] = sample(
        [Trajectory(lambda x, t, r=None: next(order)(x, t), make_scheduler("ddim", ha.scheduler_config), noise)],
        num_inference_steps=3,
        progress=False,
    )
    assert torch.equal(out.latents, ref)

    # The same method from a recipe file through the CLI, and its other trajectory as output.
    recipe = {
        "method": "swap-test",
        "params": {"output": 1},
        "sampling": {"num_inference_steps": 3, "seed": 2},
        "models": [{"model": tiny_a, "prompt": "a red circle"}, {"model": tiny_b, "prompt": "a blue square"}],
    }
    other = multifusion.run(recipe, models=[ha, hb], progress=False)
    assert other.latents.shape == (1, 4, 8, 8) and not torch.equal(other.latents, out.latents[:1])
    from multifusion.cli import main

    (tmp_path / "swap.json").write_text(__import__("json").dumps(recipe))
    assert main(["generate", str(tmp_path / "swap.json"), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert (tmp_path / "out" / "swap-s2.png").is_file()


def test_the_pictures_a_method_declares_are_what_the_cli_and_the_ui_write(swap_package, tiny_a, tiny_b, tmp_path):
    from multifusion.cli import main

    recipe = {
        "method": "swap-test",
        "sampling": {"num_inference_steps": 3, "num_images": 2},
        "models": [{"model": tiny_a, "prompt": "a red circle"}, {"model": tiny_b, "prompt": "a blue square"}],
    }
    (tmp_path / "swap.json").write_text(__import__("json").dumps(recipe))
    assert main(["generate", str(tmp_path / "swap.json"), "--out", str(tmp_path / "cli"), "--no-progress", "--export-masks"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == [
        "swap-s0-swap.png",
        "swap-s0.png",
        "swap-s1-swap.png",
        "swap-s1.png",
    ]
    assert Image.open(tmp_path / "cli" / "swap-s1-swap.png").size == (3, 1)  # it saw every step

    pytest.importorskip("gradio", reason="the ui extra is not installed")
    from multifusion.ui.app import App

    (tmp_path / "ui").mkdir()
    images, pictures, _ = App().generate(recipe, tmp_path / "ui")
    assert [c for _, c in images] == ["swap-test seed 0", "swap-test seed 1"]
    assert [c for _, c in pictures] == ["swap-test-s0-swap", "swap-test-s1-swap"]


def test_the_built_in_methods_declare_their_pictures():
    from multifusion.viz import AFAMapRecorder, AggregationRecorder, MaskRecorder, RegionWeightRecorder

    declared = {name: [type(r) for r in m.recorders(None)] for name, m in METHODS.items()}
    assert {name: kinds for name, kinds in declared.items() if kinds} == {
        "snb": [MaskRecorder],
        "mod": [MaskRecorder, RegionWeightRecorder],  # a region painted by SNB draws its masks
        "amdm": [AggregationRecorder],
        "afa": [AFAMapRecorder],
    }


def test_registration_is_checked(swap_package):
    from multifusion import register
    from multifusion.method import Method

    with pytest.raises(ValueError, match="registered already"):
        register(Method("swap-test", "again", "latents", swap_package.SwapParams, swap_package.plan))
    with pytest.raises(ValueError, match="meets must be"):
        Method("x", "x", "somewhere", swap_package.SwapParams, swap_package.plan)
    with pytest.raises(RecipeError, match="did you mean 'swap-test'"):
        multifusion.fuse("swap-tst", ["zoo:general", "zoo:expert"], "x")
