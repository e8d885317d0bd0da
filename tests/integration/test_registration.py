"""A method from outside the package, added through the public registration path only: a plan
with two trajectories whose `meet` swaps them after every step, run end to end."""

import sys
import textwrap

import pytest
import torch

import multifusion
from multifusion import RecipeError, load_models
from multifusion.loop import Trajectory, initial_noise, sample
from multifusion.registry import METHODS
from multifusion.schedulers import make_scheduler

PACKAGE = '''
"""A throwaway method: two models, one trajectory each, swapped after every step."""
from multifusion import register
from multifusion.loop import Trajectory
from multifusion.method import Method, Params, Plan


class SwapParams(Params):
    output: int = 0


def plan(prep, batch):
    first, second = prep.ctx.guided(batch)
    return Plan([Trajectory(first), Trajectory(second)], meet=lambda step: step.latents[::-1], output=prep.params.output)


register(Method("swap-test", "two trajectories swapped after every step", "latents", SwapParams, plan,
                min_models=2, max_models=2))
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
    out = multifusion.swap_test([ha, hb], ["a red circle", "a blue square"], num_inference_steps=3, seed=2,
                                num_images=2, progress=False)

    # Independently: DDIM keeps no state, and both trajectories start from the same noise, so the
    # latent that ends in slot 0 is one trajectory whose model alternates B, A, B (slot k is
    # stepped by model k, then the slots swap: the last step it took was in slot 1).
    ga, gb = ha.guide("a red circle", batch_size=2), hb.guide("a blue square", batch_size=2)
    order = iter([gb, ga, gb])
    noise = initial_noise((4, 8, 8), [torch.Generator().manual_seed(s) for s in (2, 3)])
    [ref] = sample([Trajectory(lambda x, t, r=None: next(order)(x, t), make_scheduler("ddim", ha.scheduler_config), noise)],
                   num_inference_steps=3, progress=False)
    assert torch.equal(out.latents, ref)

    # The same method from a recipe file through the CLI, and its other trajectory as output.
    recipe = {"method": "swap-test", "params": {"output": 1}, "sampling": {"num_inference_steps": 3, "seed": 2},
              "models": [{"model": tiny_a, "prompt": "a red circle"}, {"model": tiny_b, "prompt": "a blue square"}]}
    other = multifusion.run(recipe, models=[ha, hb], progress=False)
    assert other.latents.shape == (1, 4, 8, 8) and not torch.equal(other.latents, out.latents[:1])
    from multifusion.cli import main

    (tmp_path / "swap.json").write_text(__import__("json").dumps(recipe))
    assert main(["generate", str(tmp_path / "swap.json"), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert (tmp_path / "out" / "swap-s2.png").is_file()


def test_registration_is_checked(swap_package):
    from multifusion import register
    from multifusion.method import Method

    with pytest.raises(ValueError, match="registered already"):
        register(Method("swap-test", "again", "latents", swap_package.SwapParams, swap_package.plan))
    with pytest.raises(ValueError, match="meets must be"):
        Method("x", "x", "somewhere", swap_package.SwapParams, swap_package.plan)
    with pytest.raises(RecipeError, match="did you mean 'swap-test'"):
        multifusion.fuse("swap-tst", ["zoo:general", "zoo:expert"], "x")
