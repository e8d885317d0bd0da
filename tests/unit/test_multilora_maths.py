"""LoRA Switch's turn schedule and its noise function on hand-made tensors (noise/multilora.py)."""

from __future__ import annotations

import pytest
import torch

from multifusion.noise.multilora import Switch, switch_turn


def test_switch_turns_every_tau_steps_in_the_given_order():
    assert [switch_turn(k, 2, [0, 1]) for k in range(7)] == [0, 0, 1, 1, 0, 0, 1]
    assert [switch_turn(k, 1, [2, 0, 1]) for k in range(5)] == [2, 0, 1, 2, 0]
    assert [switch_turn(k, 3, [1, 0]) for k in range(7)] == [1, 1, 1, 0, 0, 0, 1]
    assert {switch_turn(k, 10, [1, 0, 2]) for k in range(10)} == {1}  # tau >= steps: the first in order throughout


def test_switch_calls_only_the_active_model_and_counts_its_steps():
    calls = []

    def model(i):
        def fn(x_t, t, record=None):
            calls.append(i)
            return x_t + i

        return fn

    switch = Switch([model(0), model(1), model(2)], tau=2, order=[1, 2, 0])
    x, record = torch.zeros(1, 4, 2, 2), {}
    outs = [switch(x, torch.tensor(999 - k), record)[0, 0, 0, 0].item() for k in range(7)]
    assert calls == [1, 1, 2, 2, 0, 0, 1]
    assert outs == [1.0, 1.0, 2.0, 2.0, 0.0, 0.0, 1.0]
    assert record["switch/model"] == 1


@pytest.mark.parametrize(
    "tau, order, says", [(0, [0, 1], "tau must be at least 1"), (1, [0, 0], "not a permutation"), (1, [0], "not a permutation")]
)
def test_switch_refuses_a_bad_period_or_order(tau, order, says):
    with pytest.raises(ValueError, match=says):
        Switch([lambda x, t, r=None: x] * 2, tau=tau, order=order)
