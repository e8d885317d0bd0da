"""Unit tests of the ShapeWorld judge (shipped weights), its training helpers and the metrics."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from multifusion.training import CHECKPOINT, CheckpointError
from multifusion.zoo import metrics
from multifusion.zoo.judge import DEFAULT_WEIGHTS, Judge, JudgeError, load_judge, reading_from_scene, reading_to_scene
from multifusion.zoo.metrics import MetricError
from multifusion.zoo.render import (
    ALL_COLOURS,
    BACKGROUNDS,
    DISTRIBUTIONS,
    SHAPES,
    SLOTS,
    STYLES,
    TEXTURES,
    Scene,
    ShapeObject,
    make_dataset,
)
from multifusion.zoo.train_judge import accuracy, augment, corrupt, gaussian_blur, train_judge

FRESH_SEED = 4242  # neither the training pool's seed nor the documented evaluation seed


@pytest.fixture(scope="module")
def judge() -> Judge:
    return load_judge()


@pytest.fixture(scope="module")
def fresh():  # 200 renders of everything the renderer draws
    return make_dataset("any", 200, FRESH_SEED)


# ----------------------------------------------------------------------------- shipped judge


def test_shipped_weights_are_small_fp16(judge: Judge) -> None:
    assert DEFAULT_WEIGHTS.stat().st_size < 2_000_000
    assert all(v.dtype == torch.float16 for v in load_file(str(DEFAULT_WEIGHTS)).values())
    assert sum(p.numel() for p in judge.parameters()) < 500_000
    assert not judge.training


def test_judge_reads_fresh_renders(judge: Judge, fresh) -> None:
    acc = accuracy(judge, corrupt(fresh.images, "clean"), fresh.scenes)
    # docs/zoo.md reports >= 95 % per attribute on 2,000 renders; 200 renders carry ~1.5 %
    # sampling error, hence the margin.
    for key in ("background", "style", "shape", "colour", "texture"):
        assert acc[key] >= 0.93, (key, acc)


def test_judge_reads_degraded_renders(judge: Judge, fresh) -> None:
    for kind in ("noisy", "blurred"):
        acc = accuracy(judge, corrupt(fresh.images, kind, seed=1), fresh.scenes)
        assert min(acc[k] for k in ("background", "style", "shape", "colour", "texture")) >= 0.85, (kind, acc)


def test_read_returns_readings_and_skips_empty_slots(judge: Judge, fresh) -> None:
    readings = judge.read(fresh.images[:16])
    assert len(readings) == 16
    for reading in readings:
        assert set(reading) == {"background", "style", "slots", "p_style"}
        assert set(reading["slots"]) == set(SLOTS)
        assert sum(reading["p_style"].values()) == pytest.approx(1.0, abs=1e-5)
        for obj in reading["slots"].values():
            assert obj is None or set(obj) == {"shape", "colour", "texture"}
    assert any(obj is None for r in readings for obj in r["slots"].values())


def decisions(readings: list[dict]) -> list[dict]:
    """Readings without their probabilities (which vary in the last float bits with batching)."""
    return [{k: v for k, v in r.items() if k != "p_style"} for r in readings]


def test_inputs_of_every_kind_read_the_same(judge: Judge, fresh) -> None:
    images = fresh.images[:4]
    expected = decisions(judge.read(images))
    assert decisions(judge.read(images[0])) == expected[:1]
    assert decisions(judge.read([Image.fromarray(im) for im in images])) == expected
    assert decisions(judge.read(torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0)) == expected
    upscaled = [Image.fromarray(im).resize((128, 128), Image.NEAREST) for im in images]
    assert decisions(judge.read(upscaled)) == expected


def test_readings_do_not_depend_on_the_batch(judge: Judge, fresh) -> None:
    both = judge.features(fresh.images[:8])
    alone = judge.features(fresh.images[:1])
    assert both.shape == (8, judge.feature_dim)
    torch.testing.assert_close(both[:1], alone, atol=1e-4, rtol=1e-4)


def test_bad_inputs_raise_value_errors(judge: Judge) -> None:
    with pytest.raises(JudgeError, match=r"\[-1, 1\] use \(x \+ 1\) / 2"):
        judge.read(torch.full((1, 3, 64, 64), -1.0))
    with pytest.raises(JudgeError, match="uint8"):
        judge.read(np.zeros((1, 64, 64, 3), dtype=np.float32))
    with pytest.raises(JudgeError, match=r"\(N, H, W, 3\)"):
        judge.read(np.zeros((1, 64, 64, 4), dtype=np.uint8))
    with pytest.raises(JudgeError, match="not found"):
        load_judge("/nonexistent/judge.safetensors")
    assert issubclass(JudgeError, ValueError)


def test_judge_fid_separates_image_sets(judge: Judge) -> None:
    # 200 images each: judge-FID, like FID, is biased upwards for small sets (docs/zoo.md).
    general_a = judge.features(make_dataset("general", 200, 1).images)
    general_b = judge.features(make_dataset("general", 200, 2).images)
    cartoon = judge.features(make_dataset("cartoon", 200, 1).images)
    same = metrics.judge_fid(general_a, general_b)
    different = metrics.judge_fid(general_a, cartoon)
    assert metrics.judge_fid(general_a, general_a) == pytest.approx(0.0, abs=1e-6)
    assert different > 3 * same


# ----------------------------------------------------------------------------- training helpers


def test_blur_with_zero_sigma_is_identity_and_keeps_the_mean() -> None:
    x = torch.rand(3, 3, 16, 16)
    torch.testing.assert_close(gaussian_blur(x, torch.zeros(3)), x)
    blurred = gaussian_blur(x, torch.tensor([0.5, 1.0, 2.0]))
    torch.testing.assert_close(blurred.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=0.02, rtol=0)
    assert (blurred[2].std() < blurred[0].std()).item()


def test_augment_is_seeded_and_stays_in_range() -> None:
    x = torch.rand(8, 3, 64, 64)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    assert a.min() >= 0 and a.max() <= 1 and not torch.equal(a, x)


@pytest.fixture
def one_thread():
    """Tiny training runs are fastest, and immune to busy cores, on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_training_resumes_to_the_same_weights(tmp_path, one_thread) -> None:
    kwargs = dict(steps=4, seed=0, progress=False, pool_size=16, batch_size=8, checkpoint_every=100)
    train_judge(tmp_path / "split", until=2, **kwargs)
    assert not (tmp_path / "split" / "judge.safetensors").exists()
    train_judge(tmp_path / "split", **kwargs)
    train_judge(tmp_path / "whole", **kwargs)
    a = load_file(str(tmp_path / "split" / "judge.safetensors"))
    b = load_file(str(tmp_path / "whole" / "judge.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="pass the same arguments"):
        train_judge(tmp_path / "whole", **(kwargs | {"steps": 5}))


class _Touch:
    """Unpickled, creates ``marker``: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_training_refuses_a_pickle_in_place_of_its_checkpoint(tmp_path, one_thread) -> None:
    marker, run = tmp_path / "code-ran", tmp_path / "run"
    run.mkdir()
    (run / CHECKPOINT).write_bytes(pickle.dumps({"model": _Touch(marker)}))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        train_judge(run, steps=4, progress=False, pool_size=16, batch_size=8)
    assert not marker.exists()


# ----------------------------------------------------------------------------- metrics


def reading(background: str = "desert", style: str = "photo", **slots: tuple[str, str, str] | None) -> dict:
    """A hand-made reading; ``slots`` map a slot to (shape, colour, texture)."""
    filled = {slot: None for slot in SLOTS}
    for slot, value in slots.items():
        if value is not None:
            filled[slot] = dict(zip(("shape", "colour", "texture"), value))
    p_style = {"photo": 0.8, "cartoon": 0.2} if style == "photo" else {"photo": 0.3, "cartoon": 0.7}
    return {"background": background, "style": style, "slots": filled, "p_style": p_style}


def objects_in(slots: list[str]) -> st.SearchStrategy[tuple[ShapeObject, ...]]:
    one = lambda slot: st.builds(  # noqa: E731
        ShapeObject, st.sampled_from(SHAPES), st.sampled_from(ALL_COLOURS), st.sampled_from(TEXTURES), st.just(slot)
    )
    return st.tuples(*[one(slot) for slot in slots])


scenes = st.builds(
    Scene,
    background=st.sampled_from(BACKGROUNDS),
    style=st.sampled_from(STYLES),
    objects=st.lists(st.sampled_from(SLOTS), unique=True, max_size=3).flatmap(objects_in),
)


@settings(max_examples=50, deadline=None)
@given(scenes)
def test_reading_round_trips_through_a_scene(scene: Scene) -> None:
    canonical = Scene(scene.background, scene.style, tuple(sorted(scene.objects, key=lambda o: SLOTS.index(o.slot))))
    assert reading_to_scene(reading_from_scene(scene)) == canonical


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_perfect_readings_score_one(name: str) -> None:
    data = make_dataset(name, 30, 0)
    perfect = [reading_from_scene(s) for s in data.scenes]
    for targets in (data.captions, data.scenes):
        summary = metrics.summary(perfect, targets)
        assert summary and all(v == 1.0 for v in summary.values()), summary


def test_metrics_on_hand_made_readings() -> None:
    prompt = "a red circle on the left and a blue striped square on the right in a desert"
    readings = [
        reading(left=("circle", "red", "plain"), right=("square", "blue", "striped")),  # all right
        reading("sea", left=("circle", "orange", "plain"), right=("square", "blue", "plain")),  # colour, texture, scene wrong
        reading(left=("circle", "red", "plain"), centre=("square", "blue", "striped")),  # square misplaced
    ]
    targets = [prompt] * 3
    assert metrics.instance_success_rate(readings, targets) == pytest.approx(3 / 6)
    assert metrics.image_success_rate(readings, targets) == pytest.approx(1 / 3)
    assert metrics.scene_accuracy(readings, targets) == pytest.approx(2 / 3)
    acc = metrics.attribute_accuracy(readings, targets)
    assert acc["shape"] == pytest.approx(5 / 6)
    assert acc["colour"] == pytest.approx(4 / 6)
    assert acc["texture"] == pytest.approx(1 / 3)  # only the square states a texture
    assert acc["position"] == pytest.approx(5 / 6)
    assert acc["count"] == 1.0
    assert "style" not in acc  # the prompt does not state a style
    assert acc["overall"] == pytest.approx((2 + 5 + 4 + 1 + 5 + 3) / (3 + 6 + 6 + 3 + 6 + 3))


def test_objects_without_position_words_may_stand_anywhere() -> None:
    prompt = "a red circle and a blue square in a forest"
    swapped = reading("forest", left=("square", "blue", "plain"), right=("circle", "red", "plain"))
    half = reading("forest", centre=("circle", "red", "plain"), right=("circle", "blue", "plain"))
    assert metrics.instance_success_rate([swapped], [prompt]) == 1.0
    assert metrics.instance_success_rate([half], [prompt]) == 0.5
    assert [slot for _, slot in metrics.match_objects(swapped, metrics.as_spec(prompt))] == ["right", "left"]


def test_style_score_hard_and_soft() -> None:
    readings = [reading(style="cartoon"), reading(style="photo")]
    targets = ["a cartoon of a red circle", "a cartoon of the sea"]
    assert metrics.style_score(readings, targets) == 0.5
    assert metrics.style_score(readings, targets, soft=True) == pytest.approx((0.7 + 0.2) / 2)
    with pytest.raises(MetricError, match="no target states a style"):
        metrics.style_score(readings, ["a red circle", "a blue square"])


def test_full_scenes_score_every_field() -> None:
    scene = Scene("plain", "photo", (ShapeObject("circle", "red", "plain", "left"),))
    wrong_texture = reading("plain", left=("circle", "red", "dotted"))
    assert metrics.instance_success_rate([wrong_texture], [scene]) == 0.0
    assert metrics.instance_success_rate([wrong_texture], ["a red circle on the left"]) == 1.0


def test_metric_input_errors() -> None:
    with pytest.raises(MetricError, match="2 readings and 1 targets"):
        metrics.scene_accuracy([reading(), reading()], ["a desert"])
    with pytest.raises(MetricError, match="no target states a background"):
        metrics.scene_accuracy([reading()], ["a red circle"])
    with pytest.raises(MetricError, match="lacks"):
        metrics.scene_accuracy([{"background": "desert"}], ["a desert"])
    with pytest.raises(ValueError, match="did you mean 'circle'"):
        metrics.scene_accuracy([reading()], ["a red circel in a desert"])


# ----------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_in_one_dimension() -> None:
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2.
    d = metrics.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert d == pytest.approx(9.0 + 1.0)


def test_frechet_distance_of_commuting_covariances() -> None:
    # Same eigenvectors: |mu1 - mu2|^2 + |sqrt(S1) - sqrt(S2)|_F^2.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.1, 4, 5), rng.uniform(0.1, 4, 5)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_non_commuting_2x2() -> None:
    # For 2x2 PSD M: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)), with M = S1^1/2 S2 S1^1/2, whose
    # trace is tr(S1 S2) and determinant det(S1) det(S2).
    s1 = np.array([[2.0, 0.3], [0.3, 0.5]])
    s2 = np.array([[1.0, -0.7], [-0.7, 3.0]])
    tr_root = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = np.trace(s1) + np.trace(s2) - 2 * tr_root
    zero = np.zeros(2)
    assert metrics.frechet_distance(zero, s1, zero, s2) == pytest.approx(expected, rel=1e-9)
    assert metrics.frechet_distance(zero, s2, zero, s1) == pytest.approx(expected, rel=1e-9)


def test_judge_fid_of_samples_approaches_the_closed_form() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20_000, 3)) * np.array([1.0, 2.0, 0.5])
    b = rng.normal(size=(20_000, 3)) * np.array([1.5, 2.0, 0.5]) + np.array([1.0, 0.0, 0.0])
    assert metrics.judge_fid(a, b) == pytest.approx(1.0 + 0.25, abs=0.05)
    assert metrics.judge_fid(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0.0, abs=1e-7)


def test_sqrt_psd_squares_back() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 4))
    s = x @ x.T  # rank 4: singular
    root = metrics.sqrt_psd(s)
    np.testing.assert_allclose(root @ root, s, atol=1e-9)


def test_fid_input_errors() -> None:
    with pytest.raises(MetricError, match="at least 2"):
        metrics.judge_fid(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(MetricError, match="dims"):
        metrics.judge_fid(np.zeros((4, 3)), np.zeros((5, 2)))
    with pytest.raises(MetricError, match="NaN"):
        metrics.judge_fid(np.full((4, 3), np.nan), np.zeros((5, 3)))


def test_reconstructed_renders_go_through_the_vae_and_are_judged_like_renders():
    """`evaluate_renders(vae=...)` judges the renders after the VAE's round trip: through an
    identity VAE that is the renders row itself (a wrong scaling to or from [-1, 1] breaks it);
    through the zoo's VAE the images change, a little (PSNR 20-40 dB)."""
    from types import SimpleNamespace

    from multifusion.loading import load_models
    from multifusion.zoo import render
    from multifusion.zoo.evaluate import EVAL_SEED, _distribution, evaluate_renders, reconstruct

    class Identity:
        dtype = torch.float32

        def encode(self, x):
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

        def decode(self, z):
            return SimpleNamespace(sample=z)

    images = render.make_dataset(_distribution("expert"), 8, EVAL_SEED).images
    assert np.array_equal(reconstruct(Identity(), images), images)
    plain, through = evaluate_renders("expert", 8), evaluate_renders("expert", 8, vae=Identity())
    assert through.pop("model") == "reconstructed" and plain.pop("model") == "renders" and through == plain
    [handle] = load_models(["zoo:general"])
    recon = reconstruct(handle.vae, images)
    psnr = 10 * np.log10(255.0**2 / np.mean((recon.astype(np.float64) - images) ** 2))
    assert recon.shape == images.shape and recon.dtype == np.uint8 and 20 < psnr < 40, psnr
