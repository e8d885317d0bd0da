"""Whether models share an ancestor: the cosine between their weights (`weights.lineage`)."""

from __future__ import annotations

import math

import torch

from multifusion.weights.lineage import RELATED_COSINE, unrelated, weight_cosine


def test_weight_cosine_is_the_cosine_of_the_shared_tensors_read_as_one_vector():
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g), "only_a": torch.randn(2, generator=g)}
    b = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g), "only_b": torch.randn(7, generator=g)}
    b["steps"] = torch.tensor([3])  # an integer buffer is no weight
    a["steps"] = torch.tensor([9])
    x = torch.cat([a["w"].flatten(), a["b"]]).double()
    y = torch.cat([b["w"].flatten(), b["b"]]).double()
    want = float(x @ y / (x.norm() * y.norm()))
    assert math.isclose(weight_cosine(a, b), want, rel_tol=1e-12)
    # a tensor of another shape is not compared; the same weights are at cosine 1, their negation at -1
    assert math.isclose(
        weight_cosine(a, {**b, "w": torch.randn(4, 3, generator=g)}),
        float(a["b"].double() @ b["b"].double() / (a["b"].double().norm() * b["b"].double().norm())),
        rel_tol=1e-12,
    )
    assert math.isclose(weight_cosine(a, a), 1.0, rel_tol=1e-12)
    assert math.isclose(weight_cosine(a, {k: -v for k, v in a.items()}), -1.0, rel_tol=1e-12)
    assert math.isnan(weight_cosine(a, {"other": torch.ones(3)}))  # nothing shared
    assert math.isnan(weight_cosine({"w": torch.zeros(2)}, {"w": torch.ones(2)}))


def test_a_fine_tune_is_related_and_an_independent_network_is_not():
    g = torch.Generator().manual_seed(1)
    base = {f"layer{i}": torch.randn(64, 64, generator=g) for i in range(4)}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    apart = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    far = unrelated([base, tuned, apart, {"nothing": torch.ones(1)}])
    assert [i for i, _ in far] == [2, 3]
    assert abs(far[0][1]) < RELATED_COSINE and math.isnan(far[1][1])


def test_the_zoo_models_trained_from_scratch_and_fine_tuned_are_told_apart():
    from safetensors.torch import load_file

    from multifusion.loading import zoo_root

    def denoiser(name: str) -> dict:
        return load_file(next((zoo_root() / name / "unet").glob("*.safetensors")))

    # expert was trained from scratch, cartoon fine-tuned from general (their training.json says so)
    far = unrelated([denoiser("general"), denoiser("cartoon"), denoiser("expert")])
    assert [i for i, _ in far] == [2]
