"""The benchmark harness on tiny stand-in models: apps and prompts, confidence intervals, the
files it writes, resuming, refusing mixed settings, sharding over two processes, and the
real-model metrics (CLIP score, FID, IS) with tiny local weights.

The tiny models draw noise, so the numbers mean nothing here: these tests check mechanics
(identical numbers across runs, resumes and shards), not quality."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from multifusion.bench import APPS, Fusion, bootstrap_interval, mcnemar_p, own_prompts, run_bench, wilson_interval
from multifusion.bench import run as bench_run
from multifusion.bench.apps import LORA_ROLES, whole_image
from multifusion.bench.stats import sample_success
from multifusion.cli import main
from multifusion.errors import ModelLoadError, RecipeError
from multifusion.zoo.render import GENERAL_HELD_OUT, SCENE_PHRASES, SLOT_PHRASES, TEXTURES, parse_caption

FG_ROWS = ["single-general", "single-expert", "average", "snb"]  # the rows these tests read (the merge rows add nothing here)
SMALL = dict(seeds=2, prompts=2, num_inference_steps=2, batch_size=2, progress=False, rows=FG_ROWS)


@pytest.fixture(scope="module")
def fg_models(tiny_a, tiny_b):
    return {"general": tiny_a, "expert": tiny_b}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fg_models):
    """One uninterrupted single-process run of the fine-grained app: the reference results."""
    out = tmp_path_factory.mktemp("bench") / "ref"
    return out, run_bench("fine-grained", out, models=fg_models, **SMALL)


# ----------------------------------------------------------------------------- apps (no models)


def test_prompts_are_fixed_and_prefix_stable():
    for app in APPS.values():
        assert [p.to_json() for p in app.prompts(3)] == [p.to_json() for p in app.prompts(5)[:3]]
        for p in app.prompts(5):
            assert parse_caption(p.caption) == p.target  # the target is the full caption
            for role in app.roles:
                parse_caption(p.prompts[role])  # every prompt is in the caption grammar


def test_each_app_prompts_its_models_with_their_own_kind_of_caption():
    for p in APPS["fine-grained"].prompts(8):
        (obj,) = p.scene.objects
        assert obj.texture in TEXTURES[1:]
        assert obj.texture not in p.prompts["general"] and obj.texture in p.prompts["expert"]
        assert not any(ph in p.prompts["expert"] for ph in (*SLOT_PHRASES.values(), *SCENE_PHRASES.values()))
    cross = APPS["cross-domain"].prompts(10)
    assert {(p.scene.background, p.scene.objects[0].shape) for p in cross} == set(GENERAL_HELD_OUT)
    assert all(p.prompts["cartoon"].startswith("a cartoon of ") and "cartoon" not in p.prompts["general"] for p in cross)
    for p in APPS["regional"].prompts(4):
        assert len(p.scene.objects) == 3 and [s for s, _ in p.regions] == ["left", "centre", "right"]
        assert all(parse_caption(text).objects[0].slot == "centre" for _, text in p.regions)
    for p in APPS["aggregation"].prompts(6):
        assert all(parse_caption(p.prompts["layout"]).objects[i].colour is None for i in range(len(p.scene.objects)))
        assert all(o.slot is None for o in parse_caption(p.prompts["palette"]).objects)
    assert all(p.prompts["slice0"] == p.prompts["slice1"] == p.caption for p in APPS["ensemble"].prompts(3))


def test_aggregation_layout_tells_both_models_the_layout_each_its_own_part():
    app = APPS["aggregation-layout"]
    for p in app.prompts(6):
        layout, tint = parse_caption(p.prompts["layout"]), parse_caption(p.prompts["tint"])
        slots = [o.slot for o in p.scene.objects]
        assert [o.slot for o in layout.objects] == [o.slot for o in tint.objects] == slots
        assert [o.shape for o in layout.objects] == [o.shape for o in p.scene.objects] and all(
            o.colour is None for o in layout.objects
        )
        assert [o.colour for o in tint.objects] == [o.colour for o in p.scene.objects] and all(
            o.shape is None for o in tint.objects
        )
    rows, skipped = app.rows()
    assert [r.id for r in rows] == [
        "single-layout",
        "single-tint",
        "average",
        "snb",
        "amdm",
        "amdm-paper",
        "amdm-tint",
        "amdm-paper-tint",
    ] and not skipped
    assert rows[5].build(app.prompt(0), {"layout": "L", "tint": "T"})["params"] == {"preset": "paper"}
    assert rows[-1].build(app.prompt(0), {"layout": "L", "tint": "T"})["params"] == {"preset": "paper", "specified": "tint"}


def test_rows_skip_methods_the_registry_lacks_and_extend_by_one_entry():
    app = APPS["aggregation"]
    rows, skipped = app.rows(available={"single": 1, "average": 1})
    assert [r.id for r in rows] == ["single-layout", "single-palette", "average"] and skipped == ["snb", "amdm"]
    rows, skipped = app.rows(available={"single": 1, "average": 1, "snb": 1, "amdm": 1})
    assert rows[-1].id == "amdm" and rows[-1].models == ("layout", "palette") and not skipped
    extra = Fusion("snb", own_prompts("snb", ("layout", "palette"), {"k": 2.0}), ("layout", "palette"), id="snb-k2")
    ext = dataclasses.replace(app, fusions=app.fusions + (extra,))
    recipe = ext.rows()[0][-1].build(ext.prompt(0), {"layout": "L", "palette": "P"})
    assert recipe["method"] == "snb" and recipe["params"] == {"k": 2.0} and [m["model"] for m in recipe["models"]] == ["L", "P"]


def test_confidence_intervals():
    lo, hi = wilson_interval(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)  # the textbook value
    assert wilson_interval(0, 10)[0] == 0.0 and 0.25 < wilson_interval(0, 10)[1] < 0.3
    assert wilson_interval(10, 10)[1] == 1.0
    hits, trials = [3, 0, 2, 1, 3, 3], [3, 3, 3, 2, 3, 3]
    a = bootstrap_interval(hits, trials)
    assert a == bootstrap_interval(hits, trials)  # fixed generator
    assert a[0] <= sum(hits) / sum(trials) <= a[1]
    assert bootstrap_interval([2, 2], [2, 2]) == (1.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 0)


def test_mcnemar_p_by_hand():
    # n discordant images, each a fair coin under "no difference": P(X <= k) doubled, at most 1.
    assert mcnemar_p(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_p(3, 3) == 1.0 and mcnemar_p(0, 0) == 1.0
    with pytest.raises(ValueError, match="discordant"):
        mcnemar_p(-1, 4)


@given(a=st.integers(0, 60), b=st.integers(0, 60))
@settings(max_examples=60, deadline=None)
def test_mcnemar_p_is_the_doubled_binomial_tail(a, b):
    n, k = a + b, min(a, b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 0.5
    assert mcnemar_p(a, b) == pytest.approx(min(1.0, 2 * tail), rel=1e-9)
    assert mcnemar_p(a, b) == mcnemar_p(b, a)


# (successes, n, level) -> interval, as the hand-written Wilson formula (Wilson 1927) gave it
# before the harness moved to scipy's: pins that the scipy call computes the same interval.
WILSON_BEFORE_SCIPY = [
    ((0, 1, 0.95), (0.0, 0.7934506856227626)),
    ((1, 1, 0.95), (0.20654931437723745, 1.0)),
    ((0, 10, 0.95), (0.0, 0.27753279986288915)),
    ((5, 10, 0.95), (0.23659309051256405, 0.763406909487436)),
    ((10, 10, 0.95), (0.7224672001371109, 1.0)),
    ((1, 3, 0.95), (0.06149194472039632, 0.7923403991979523)),
    ((2, 7, 0.95), (0.08221892400405678, 0.6410655481673806)),
    ((1, 64, 0.95), (0.002763541923337512, 0.08334101600094262)),
    ((17, 64, 0.95), (0.17296379074222612, 0.38482873728565126)),
    ((63, 64, 0.95), (0.9166589839990573, 0.9972364580766624)),
    ((3, 512, 0.95), (0.0019946757921860923, 0.01708378068394411)),
    ((0, 10000, 0.95), (0.0, 0.00038399837067659557)),
    ((1, 10000, 0.95), (1.7652673601122363e-05, 0.0005662688974013379)),
    ((10000, 10000, 0.95), (0.9996160016293234, 1.0)),
    ((123456, 1000000, 0.95), (0.12281269653142285, 0.12410219641400438)),
    ((3, 10, 0.9), (0.12687658390319792, 0.5583002041301648)),
]


@pytest.mark.parametrize(("args", "expected"), WILSON_BEFORE_SCIPY)
def test_wilson_interval_matches_the_formula_it_replaced(args, expected):
    successes, n, level = args
    lo, hi = wilson_interval(successes, n, level)
    assert lo == pytest.approx(expected[0], abs=1e-12) and hi == pytest.approx(expected[1], abs=1e-12)
    assert (lo == 0.0) == (successes == 0) and (hi == 1.0) == (successes == n)  # exact at the ends
    assert type(lo) is float and type(hi) is float  # plain floats in results.json


# ----------------------------------------------------------------------------- running


def test_writes_results_csv_markdown_and_grid(reference):
    out, res = reference
    rows = res["rows"]
    assert [(r["method"], r["models"]) for r in rows] == [
        ("single", ["general"]),
        ("single", ["expert"]),
        ("average", ["general", "expert"]),
        ("snb", ["general", "expert"]),
    ]
    for r in rows:
        assert r["app"] == "fine-grained" and r["seeds"] == 2 and r["images"] == 4
        m = r["metrics"]
        assert 0 <= m["success_ci"][0] <= m["success"] <= m["success_ci"][1] <= 1
        assert {"scene", "attr/texture", "judge_fid"} <= m.keys()
    assert json.loads((out / "results.json").read_text()) == res
    assert [p["target"] for p in res["prompts"]] == [p.caption for p in APPS["fine-grained"].prompts(2)]
    assert res["settings"]["num_inference_steps"] == 2 and res["versions"]["torch"] == torch.__version__
    assert res["samples"] == {"total": 16, "computed": 16, "reused": 0} and res["wall_time_s"] > 0
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [t["method"] for t in table] == ["single", "single", "average", "snb"]
    assert float(table[3]["success"]) == rows[3]["metrics"]["success"]
    md = (out / "results.md").read_text()
    assert "| snb | general, expert |" in md and "Wilson" in md and res["prompts"][0]["target"] in md
    grid = Image.open(out / "grid.png")
    assert grid.height > 4 * 128 and grid.width > 2 * 128  # 4 rows x 2 seeds
    sample = json.loads((out / "samples/fine-grained/snb/p0001-s000001.json").read_text())
    assert sample["recipe"]["sampling"]["seed"] == 1 and sample["recipe"]["method"] == "snb"
    assert Image.open(out / "samples/fine-grained/snb/p0001-s000001.png").info["multifusion"]


def test_second_run_reuses_every_sample(reference, fg_models):
    out, res = reference
    again = run_bench("fine-grained", out, models=fg_models, **SMALL)
    assert again["samples"]["computed"] == 0 and again["rows"] == res["rows"]


def test_interrupted_run_continues_to_the_same_numbers(reference, fg_models, tmp_path, monkeypatch):
    _, ref = reference
    real, calls = bench_run._run_unit, []

    def dies_on_third_unit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_run, "_run_unit", dies_on_third_unit)
    with pytest.raises(KeyboardInterrupt):
        run_bench("fine-grained", tmp_path, models=fg_models, **SMALL)
    monkeypatch.setattr(bench_run, "_run_unit", real)
    done = list(tmp_path.glob("samples/**/*.json"))
    assert len(done) == 4 and not list(tmp_path.glob("samples/**/*.part"))  # two units of two seeds
    res = run_bench("fine-grained", tmp_path, models=fg_models, **SMALL)
    assert res["samples"]["computed"] == 12 and res["rows"] == ref["rows"]


def test_an_output_folder_of_other_settings_is_refused(reference, fg_models, tiny_dir):
    out, _ = reference
    before = (out / "settings.json").read_text()
    with pytest.raises(RecipeError, match=r"num_inference_steps is 2 there and 3 here.*another output folder"):
        run_bench("fine-grained", out, models=fg_models, **{**SMALL, "num_inference_steps": 3})
    with pytest.raises(RecipeError, match=r"batch_size is 2 there and 1 here"):  # float rounding differs
        run_bench("fine-grained", out, models=fg_models, **{**SMALL, "batch_size": 1})
    with pytest.raises(RecipeError, match="model 'general' of app 'fine-grained' has different weights"):
        run_bench("fine-grained", out, models={**fg_models, "general": str(tiny_dir / "c")}, **SMALL)
    moved = out.parent / "moved-general"  # the same weights elsewhere are the same model
    shutil.copytree(fg_models["general"], moved, dirs_exist_ok=True)
    assert run_bench("fine-grained", out, models={**fg_models, "general": str(moved)}, **SMALL)["samples"]["computed"] == 0
    assert json.loads((out / "settings.json").read_text())["common"] == json.loads(before)["common"]


def test_bad_input_is_refused_with_the_fix(tmp_path, fg_models, monkeypatch, capsys):
    with pytest.raises(RecipeError, match="unknown app 'fine-grain'.*did you mean 'fine-grained'"):
        run_bench("fine-grain", tmp_path, models=fg_models)
    for bad in ({"seeds": 0}, {"prompts": -1}, {"num_inference_steps": 0}, {"batch_size": 0}):
        with pytest.raises(RecipeError, match="must be a positive integer"):
            run_bench("fine-grained", tmp_path, models=fg_models, **{**SMALL, **bad})
    with pytest.raises(RecipeError, match="unknown model role 'genral'.*did you mean 'general'"):
        run_bench("fine-grained", tmp_path, models={"genral": fg_models["general"]}, **SMALL)
    from multifusion import loading

    monkeypatch.setattr(loading, "zoo_models", lambda: [])
    with pytest.raises(
        ModelLoadError,
        match=r"zoo model 'expert' \(needed by fine-grained\): not installed.*--models expert --install.*--model expert=PATH",
    ):
        run_bench("fine-grained", tmp_path, models={"general": fg_models["general"]}, **SMALL)
    assert main(["bench", "ensembel", "--out", str(tmp_path)]) == 2
    assert "did you mean 'ensemble'" in capsys.readouterr().err
    assert main(["bench", "fine-grained", "--out", str(tmp_path), "--model", "general"]) == 2
    assert "ROLE=MODEL" in capsys.readouterr().err
    assert main(["bench", "fine-grained", "--out", str(tmp_path), "--seeds", "0"]) == 2
    assert "seeds must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "settings.json").exists()  # nothing was started


def test_every_app_runs_its_rows_and_updates_a_doc(tmp_path, tiny_a, tiny_b):
    from multifusion.registry import METHODS

    a, b = tiny_a, tiny_b
    models = {"general": a, "expert": b, "cartoon": b, "toon": b, "layout": a, "palette": b, "tint": b, "slice0": a, "slice1": b}
    doc = tmp_path / "results-doc.md"
    doc.write_text("# Results\n\nintro\n\n<!-- bench:begin -->\nold\n<!-- bench:end -->\n\noutro\n")
    # Every row but afa's, whose shipped aggregators were trained for the zoo's slice models, not
    # these, and the rows of LoRA roles, whose zoo LoRAs fit the zoo's general only (tested below).
    lora_rows = {r.id for app in APPS.values() for r in app.rows()[0] if set(r.models) & set(LORA_ROLES)}
    every = sorted({r.id for app in APPS.values() for r in app.rows()[0]} - {"afa"} - lora_rows)
    res = run_bench(
        "all",
        tmp_path / "out",
        models=models,
        seeds=1,
        prompts=1,
        num_inference_steps=2,
        progress=False,
        update_doc=doc,
        rows=every,
    )
    got = {(r["app"], r["row"]) for r in res["rows"]}
    for app in APPS.values():
        rows, skipped = app.rows()
        assert {(app.id, r.id) for r in rows if r.id != "afa" and r.id not in lora_rows} <= got
        assert set(skipped) == {f.method for f in app.fusions if f.method not in METHODS}
    assert ("regional", "mod") in got and ("cross-domain", "snb") in got
    # With another model as `general`, the rows of LoRA roles (zoo LoRAs fit the zoo's general) are skipped and listed.
    assert {r for v in res["skipped"].values() for r in v} >= lora_rows
    assert all(0 <= r["metrics"]["success"] <= 1 for r in res["rows"])
    text = doc.read_text()
    assert "old" not in text and "intro" in text and "outro" in text and "### regional" in text
    assert (tmp_path / "results-doc-grid.png").is_file()

    # A named section: one file holds the tables of several runs.
    from multifusion.bench.report import write_doc

    named = tmp_path / "named.md"
    named.write_text("<!-- bench:begin -->\nkeep\n<!-- bench:end -->\n<!-- bench:begin amdm -->\nold\n<!-- bench:end amdm -->\n")
    write_doc(f"{named}#amdm", res, tmp_path / "out" / "grid.png")
    text = named.read_text()
    assert "keep" in text and "old" not in text and "### aggregation" in text and (tmp_path / "named-amdm-grid.png").is_file()
    with pytest.raises(RecipeError, match="bench:begin other"):
        write_doc(f"{named}#other", res)


def test_two_processes_merge_into_the_single_process_result(reference, fg_models, tmp_path):
    """`accelerate launch` with two CPU processes (its torchrun launcher; without a GPU the
    processes meet over gloo). Each takes every other unit; the main one merges."""
    _, ref = reference
    out = tmp_path / "sharded"
    args = [
        "bench",
        "fine-grained",
        "--out",
        str(out),
        "--seeds",
        "2",
        "--prompts",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--no-progress",
        "--rows",
        ",".join(FG_ROWS),
        "--model",
        f"general={fg_models['general']}",
        "--model",
        f"expert={fg_models['expert']}",
    ]
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
        "-m",
        "multifusion.cli",
        *args,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["num_processes"] == 2 and res["samples"]["computed"] == 16
    assert res["rows"] == ref["rows"]


# ----------------------------------------------------------------------------- real-model metrics


def test_metrics_need_torchmetrics_and_say_how_to_get_it(monkeypatch, tmp_path):
    from multifusion.bench import realworld

    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    with pytest.raises(RecipeError, match=r'pip install -e "\.\[bench\]"'):
        realworld.inception_score([np.zeros((8, 8, 3), np.uint8)] * 2, feature_extractor=torch.nn.Identity())


class TinyFeatures(torch.nn.Module):
    """A stand-in for Inception: uint8 (N, 3, H, W) -> (N, 6) features / class logits."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(6, 3, generator=g))

    def forward(self, x):
        pooled = torch.stack([x.float().mean((2, 3)) / 255, x.float().std((2, 3)) / 255], 0).sum(0)  # (N, 3)
        return pooled @ self.weight.T


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    pytest.importorskip("torchmetrics")
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from multifusion.testing import write_clip_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "tok"))
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder / "clip")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder / "clip")
    return folder / "clip"


def _noise_images(n, seed, size=32):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)) for _ in range(n)]


def test_clip_score_fid_and_is_with_tiny_local_weights(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    from multifusion.bench.realworld import clip_score, frechet_inception_distance, inception_score

    images, prompts = _noise_images(4, 0), ["a red circle", "a blue square", "a cat", "a dog"]
    model, proc = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        x = proc(images=images, text=prompts, return_tensors="pt", padding=True)
        i, t = model.get_image_features(x["pixel_values"]), model.get_text_features(x["input_ids"], x["attention_mask"])
        i, t = (getattr(v, "pooler_output", v) for v in (i, t))
    expected = max(100 * torch.nn.functional.cosine_similarity(i, t).mean().item(), 0.0)  # torchmetrics clamps the mean
    assert clip_score(images, prompts, tiny_clip) == pytest.approx(expected, abs=1e-4)
    same = frechet_inception_distance(images, images, feature_extractor=TinyFeatures())
    other = frechet_inception_distance(images, [im.point(lambda v: v // 3) for im in images], feature_extractor=TinyFeatures())
    assert abs(same) < 1e-6 and other > 1e-3
    mean, std = inception_score(_noise_images(8, 1), feature_extractor=TinyFeatures(), splits=2)
    assert mean >= 1.0 and (mean, std) == inception_score(_noise_images(8, 1), feature_extractor=TinyFeatures(), splits=2)


def test_real_models_from_a_prompt_file(tiny_clip, tiny_a, tiny_b, tmp_path):
    from multifusion.bench.realworld import run_realworld

    (tmp_path / "prompts.txt").write_text("# two prompts\na red circle in a desert\n\na blue square\n")
    ref = tmp_path / "ref"
    ref.mkdir()
    for k, im in enumerate(_noise_images(3, 2, size=48)):
        im.save(ref / f"{k}.png")
    recipe = {"method": "average", "models": [{"model": tiny_a}, {"model": tiny_b}], "sampling": {"num_inference_steps": 2}}
    kwargs = dict(seeds=2, clip_model=tiny_clip, reference_dir=ref, feature_extractor=TinyFeatures(), progress=False)
    res = run_realworld(recipe, tmp_path / "prompts.txt", tmp_path / "out", **kwargs)
    assert res["images"] == 4 and set(res["metrics"]) == {"clip_score", "inception_score", "inception_score_std", "fid"}
    assert sorted(p.name for p in (tmp_path / "out/images").iterdir()) == [
        "p0000-s0.png",
        "p0000-s1.png",
        "p0001-s0.png",
        "p0001-s1.png",
    ]
    stamp = (tmp_path / "out/images/p0001-s1.png").stat().st_mtime_ns
    assert run_realworld(recipe, tmp_path / "prompts.txt", tmp_path / "out", **kwargs)["metrics"] == res["metrics"]
    assert (tmp_path / "out/images/p0001-s1.png").stat().st_mtime_ns == stamp  # reused, not redrawn
    with pytest.raises(RecipeError, match="clip_model: .*does not exist.*nothing is downloaded"):
        run_realworld(recipe, tmp_path / "prompts.txt", tmp_path / "out", clip_model=tmp_path / "no-clip")
    with pytest.raises(RecipeError, match="inception_weights: .*does not exist"):
        run_realworld(recipe, tmp_path / "prompts.txt", tmp_path / "out", inception_weights=tmp_path / "inception.pth")
    with pytest.raises(RecipeError, match="nothing to measure"):
        run_realworld(recipe, tmp_path / "prompts.txt", tmp_path / "out")


def test_seam_score_sees_a_step_at_the_region_edges_only():
    import numpy as np

    from multifusion.bench.apps import seam_columns, seam_score

    smooth = np.tile(np.linspace(0, 255, 64)[None, :, None], (64, 1, 3))
    assert abs(seam_score(smooth, [20, 44]) - 1.0) < 1e-6
    stepped = smooth.copy()
    stepped[:, 20:] += 40
    assert seam_score(stepped, [20, 44]) > 5
    regions = [
        {"row_init": 0, "row_end": 1, "col_init": lo, "col_end": hi, "units": "fraction", "prompt": "x"}
        for lo, hi in ((0, 0.4), (0.27, 0.73), (0.6, 1.0))
    ]
    assert seam_columns({"regions": regions}, (64, 64), 4) == [16, 24, 40, 48]
    tiles = {"prompts": [["a", "b", "c"]], "tile_height": 64, "tile_width": 64, "tile_col_overlap": 16}
    assert seam_columns({"tiles": tiles}, (64, 160), 4) == [48, 64, 96, 112]


def test_regional_tiles_are_native_size_and_each_tile_is_read_against_its_own_object():
    from multifusion.bench.apps import TILE, TILE_OVERLAP, tile_views, tiles_per_slot
    from multifusion.noise.methods import ModParams

    app = APPS["regional"]
    rows = {r.id: r for r in app.rows()[0]}
    assert list(rows) == [
        "single-general",
        "mod",
        "mod-constant",
        "mod-thirds",
        "region-attention-thirds",
        "region-attention-slots",
        "region-attention-canvas",
        "single-canvas",
    ]
    p = app.prompt(3)
    recipe = tiles_per_slot("general")(p, {"general": "G"})
    tiles = ModParams(**recipe["params"]).tiles
    assert tiles.canvas() == (TILE, 3 * TILE - 2 * TILE_OVERLAP)
    assert [r.prompt for r in tiles.regions()] == [text for _, text in p.regions]
    views = tile_views(p)
    assert [v.box for v in views] == [(0, 0, 64, 64), (48, 0, 112, 64), (96, 0, 160, 64)]
    for v, obj in zip(views, p.scene.objects):
        assert v.scene.background == p.scene.background
        assert [(o.shape, o.colour, o.slot) for o in v.scene.objects] == [(obj.shape, obj.colour, "centre")]
        assert parse_caption(dict(p.regions)[obj.slot]) == v.target  # the tile's prompt is the view's target
    assert rows["mod"].views is tile_views and rows["single-general"].views(p)[0].box is None


def test_region_attention_rows_place_the_slots_as_the_mod_rows_do():
    """Thirds on the native canvas (hard edges, no overlap) and the tiles on the tile canvas, each
    with its slot's prompt, the whole layout as the base prompt; seams scored at their own edges."""
    from multifusion.bench.apps import seam_columns, tile_canvas, tile_views
    from multifusion.bench.settings import row_recipe
    from multifusion.recipe import Recipe
    from multifusion.validate import validate

    app = APPS["regional"]
    rows = {r.id: r for r in app.rows()[0]}
    p = app.prompt(1)
    common = {"num_inference_steps": 3, "scheduler": "ddim", "guidance_scale": 7.5}
    thirds = row_recipe(rows["region-attention-thirds"], p, {"general": "zoo:general"}, common, [0])
    canvas = row_recipe(rows["region-attention-canvas"], p, {"general": "zoo:general"}, common, [0])
    for recipe in (thirds, canvas):
        validate(Recipe.model_validate(recipe))
        assert recipe["params"]["base_prompt"] == p.caption
        assert [r["prompt"] for r in recipe["params"]["regions"]] == [text for _, text in p.regions]
    assert seam_columns(thirds["params"], (64, 64), 4) == [20, 44]
    assert (canvas["sampling"]["height"], canvas["sampling"]["width"]) == tile_canvas()
    assert seam_columns(canvas["params"], tile_canvas(), 4) == [48, 64, 96, 112]
    assert rows["region-attention-canvas"].views is tile_views
    slots = row_recipe(rows["region-attention-slots"], p, {"general": "zoo:general"}, common, [0])
    assert [r["col_init"] for r in slots["params"]["regions"]] == [r["col_init"] for r in thirds["params"]["regions"]]
    for r, o in zip(slots["params"]["regions"], p.scene.objects):
        assert parse_caption(r["prompt"]).objects[0].slot == o.slot  # its object at its own slot


def test_the_single_model_on_the_tile_canvas_is_read_like_the_tiles():
    from multifusion.bench.apps import tile_canvas, tile_views
    from multifusion.bench.settings import row_recipe

    app = APPS["regional"]
    row = {r.id: r for r in app.rows()[0]}["single-canvas"]
    p = app.prompt(2)
    common = {"num_inference_steps": 3, "scheduler": "ddim", "guidance_scale": 7.5}
    recipe = row_recipe(row, p, {"general": "G"}, common, [4, 5])
    assert recipe["method"] == "single" and recipe["models"][0]["prompt"] == p.caption  # the whole layout
    assert (recipe["sampling"]["height"], recipe["sampling"]["width"]) == tile_canvas() == (64, 160)
    assert recipe["sampling"]["seed"] == 4 and recipe["sampling"]["num_images"] == 2
    assert row.views is tile_views


def test_regional_models_gives_each_region_its_model_and_reads_it_against_that_models_target():
    from multifusion.bench.apps import MIXED_STYLES
    from multifusion.noise.methods import ModParams
    from multifusion.zoo.judge import reading_from_scene

    app = APPS["regional-models"]
    rows = {r.id: r for r in app.rows()[0]}
    assert list(rows) == ["mod-general", "mod-cartoon", "mod-snb", "mod-models", "mod-models-lora"]  # no single rows
    assert rows["mod-models"].models == ("cartoon", "general", "expert") and rows["mod-general"].models == ("general",)
    # The LoRA row: the same regions, the LoRA stand-ins in the cartoon model's and the expert's places.
    assert rows["mod-models-lora"].models == ("cartoon-lora", "general", "texture-lora")
    lora_regions = ModParams(**rows["mod-models-lora"].build(app.prompt(1), {r: r for r in app.roles})["params"]).regions
    assert [r.model for r in lora_regions] == ["cartoon-lora", "general", "general"]
    assert [m.model for m in lora_regions[1].snb.models] == ["texture-lora"]
    p = app.prompt(1)
    left, centre, right = p.scene.objects
    assert centre.texture in TEXTURES[1:] and left.texture == right.texture == "plain"
    recipe = rows["mod-models"].build(p, {r: r for r in app.roles})
    regions = ModParams(**recipe["params"]).regions
    assert [r.model for r in regions] == ["cartoon", "general", "general"]
    assert regions[0].prompt.startswith("a cartoon of") and centre.texture not in regions[1].prompt
    assert [m.model for m in regions[1].snb.models] == ["expert"] and centre.texture in regions[1].snb.models[0].prompt
    assert regions[2].snb is None
    views = rows["mod-models"].views(p)
    assert [v.target.style for v in views] == list(MIXED_STYLES)
    assert [
        parse_caption(text) == dataclasses.replace(v.target, style=None if v.target.style == "photo" else v.target.style)
        for (_, text), v in zip(p.regions, views)
    ] == [True] * 3
    readings = [reading_from_scene(v.scene) for v in views]
    assert sample_success(app, readings, [v.target for v in views]) == (3, 3)
    readings[0] = reading_from_scene(dataclasses.replace(views[0].scene, style="photo"))  # the cartoon drawn as a photo
    assert sample_success(app, readings, [v.target for v in views]) == (2, 3)


def test_extra_objects_counts_readings_with_more_objects_than_stated():
    from multifusion.bench.stats import extra_objects
    from multifusion.zoo.judge import reading_from_scene
    from multifusion.zoo.render import Scene, ShapeObject

    one = Scene("desert", "photo", (ShapeObject("circle", "red", "striped", "left"),))
    two = dataclasses.replace(one, objects=one.objects + (ShapeObject("square", "red", "striped", "centre"),))
    none = dataclasses.replace(one, objects=())
    targets = [parse_caption("a red striped circle on the left in a desert")] * 3
    assert extra_objects([reading_from_scene(s) for s in (one, two, none)], targets) == pytest.approx(1 / 3)
    assert (
        extra_objects(
            [reading_from_scene(two)],
            [parse_caption("a red striped circle on the left and a red striped square in the centre in a desert")],
        )
        == 0.0
    )
    with pytest.raises(ValueError):
        extra_objects([], [])


def test_cross_domain_photo_asks_for_a_photo_of_what_only_the_toon_model_draws():
    app = APPS["cross-domain-photo"]
    for p in app.prompts(12):
        (obj,) = p.scene.objects
        assert (
            p.scene.style == "photo" and obj.texture in TEXTURES[1:] and (p.scene.background, obj.shape) not in GENERAL_HELD_OUT
        )
        assert p.prompts["toon"] == "a cartoon of " + p.prompts["general"] == "a cartoon of " + p.caption
    rows, skipped = app.rows()
    assert [(r.id, r.models) for r in rows] == [
        ("single-general", ("general",)),
        ("single-toon", ("toon",)),
        ("average", ("general", "toon")),
        ("snb", ("general", "toon")),
    ] and not skipped
    assert rows[3].build(app.prompt(0), {"general": "g", "toon": "t"})["params"] == {"blur": "none"}


@pytest.mark.parametrize("n", [3, 8, 12])
def test_cross_domain_photo_asks_every_texture_equally_often(n):
    """Any first n prompts ask each texture n // 3 or n // 3 + 1 times (8 prompts: 3, 3, 2)."""
    from collections import Counter

    counts = Counter(p.scene.objects[0].texture for p in APPS["cross-domain-photo"].prompts(n))
    assert set(counts) <= set(TEXTURES[1:]) and sum(counts.values()) == n
    assert all(n // 3 <= counts[t] <= -(-n // 3) for t in TEXTURES[1:]), counts


def test_cross_domain_photo_fails_a_cartoon_and_a_photo_without_the_texture():
    from multifusion.zoo.judge import reading_from_scene

    app = APPS["cross-domain-photo"]
    p = app.prompt(0)
    for row in app.rows()[0]:  # every row, the single models too, is read with the photo style stated
        (view,) = row.views(p)
        assert view.target.style == "photo"
        assert sample_success(app, [reading_from_scene(p.scene)], [view.target]) == (1, 1)
        as_cartoon = dataclasses.replace(p.scene, style="cartoon")
        assert sample_success(app, [reading_from_scene(as_cartoon)], [view.target]) == (0, 1)
        (obj,) = p.scene.objects
        plain = dataclasses.replace(p.scene, objects=(dataclasses.replace(obj, texture="plain"),))
        assert sample_success(app, [reading_from_scene(plain)], [view.target]) == (0, 1)


def test_success_over_views_pools_objects_for_instance_apps_and_needs_every_view_for_image_apps():
    from multifusion.bench.apps import tile_views
    from multifusion.zoo.judge import reading_from_scene

    p = APPS["regional"].prompt(0)
    views = tile_views(p)
    readings = [reading_from_scene(v.scene) for v in views]
    targets = [v.target for v in views]
    assert sample_success(APPS["regional"], readings, targets) == (3, 3)
    readings[1] = reading_from_scene(dataclasses.replace(views[1].scene, objects=()))
    assert sample_success(APPS["regional"], readings, targets) == (2, 3)
    assert sample_success(APPS["ensemble"], readings, targets) == (0, 1)
    readings[1] = reading_from_scene(views[1].scene)
    assert sample_success(APPS["ensemble"], readings, targets) == (1, 1)


def test_rows_runs_only_the_rows_named(tmp_path, tiny_a, tiny_b, capsys):
    from multifusion.cli import main

    models = {"general": tiny_a, "expert": tiny_b}
    res = run_bench(
        ["fine-grained"],
        tmp_path / "out",
        models=models,
        seeds=1,
        prompts=1,
        num_inference_steps=2,
        progress=False,
        rows=["average"],
    )
    assert [r["row"] for r in res["rows"]] == ["average"]
    with pytest.raises(RecipeError, match=r"rows: averag: not a row of fine-grained.*did you mean 'average'"):
        run_bench(
            "fine-grained",
            tmp_path / "out",
            models=models,
            seeds=1,
            prompts=1,
            num_inference_steps=2,
            progress=False,
            rows=["averag"],
        )
    args = [
        "bench",
        "fine-grained,regional",
        "--rows",
        "snb,mod",
        "--out",
        str(tmp_path / "cli"),
        "--seeds",
        "1",
        "--prompts",
        "1",
        "--steps",
        "2",
        "--no-progress",
        "--model",
        f"general={tiny_a}",
        "--model",
        f"expert={tiny_b}",
    ]
    assert main(args) == 0
    got = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert [(r["app"], r["row"]) for r in got["rows"]] == [("fine-grained", "snb"), ("regional", "mod")]


def test_lora_roles_are_the_general_model_with_zoo_loras_and_run_every_lora_row(tmp_path):
    """Every row of a LoRA role on the zoo itself (2 steps, one seed): the LoRA stand-ins of the
    expert and the cartoon model, and the multi-LoRA apps; each recipe carries its LoRAs."""
    from multifusion.bench.apps import zoo_needs
    from multifusion.bench.settings import resolve_models
    from multifusion.lora import zoo_loras

    apps = [a for a in APPS.values() if any(set(r.models) & set(LORA_ROLES) for r in a.rows()[0])]
    assert {a.id for a in apps} == {"fine-grained", "cross-domain", "regional-models", "multi-lora", "multi-lora-3"}
    assert zoo_needs([r for a in apps for r in a.roles])[1] <= set(zoo_loras())
    refs = resolve_models(apps, {"general": "elsewhere"})
    assert refs["multi-lora"]["two-loras"] == refs["multi-lora"]["general"] == "elsewhere"  # LoRA roles follow their base
    with pytest.raises(RecipeError, match="role 'striped' is the 'general' model with zoo LoRAs"):
        resolve_models(apps, {"striped": "elsewhere"})
    p = APPS["multi-lora"].prompt(0)
    kl = next(r for r in APPS["multi-lora"].rows()[0] if r.id == "k-lora").build(p, resolve_models(apps, None)["multi-lora"])
    assert kl["models"][0]["loras"] == [{"path": "zoo:striped", "scale": 1.0}, {"path": "zoo:cartoon", "scale": 1.0}]
    rows = sorted({r.id for a in apps for r in a.rows()[0] if set(r.models) & set(LORA_ROLES)})
    res = run_bench([a.id for a in apps], tmp_path, seeds=1, prompts=1, num_inference_steps=2, progress=False, rows=rows)
    got = {(r["app"], r["row"]) for r in res["rows"]}
    for a in apps:
        assert {(a.id, r.id) for r in a.rows()[0] if set(r.models) & set(LORA_ROLES)} <= got


def test_multi_lora_apps_ask_for_one_element_of_each_lora_and_read_each():
    from multifusion.zoo.judge import reading_from_scene

    for app_id, textures in (("multi-lora", [("striped",)]), ("multi-lora-3", [("striped", "dotted"), ("dotted", "striped")])):
        app = APPS[app_id]
        seen = set()
        for p in app.prompts(16):
            assert p.scene.style == "cartoon" and set(p.prompts.values()) == {p.caption}
            seen.add(tuple(o.texture for o in p.scene.objects))
            target = whole_image(p)[0].target
            assert sample_success(app, [reading_from_scene(p.scene)], [target]) == (1, 1)
            photo = dataclasses.replace(p.scene, style="photo")
            assert sample_success(app, [reading_from_scene(photo)], [target]) == (0, 1)
            for k, o in enumerate(p.scene.objects):  # any one texture missing fails the image
                objects = list(p.scene.objects)
                objects[k] = dataclasses.replace(o, texture="plain")
                assert sample_success(
                    app, [reading_from_scene(dataclasses.replace(p.scene, objects=tuple(objects)))], [target]
                ) == (0, 1)
            other = dataclasses.replace(p.scene, background="sea" if p.scene.background != "sea" else "desert")
            assert sample_success(app, [reading_from_scene(other)], [target]) == (1, 1)  # the scene is not a LoRA's element
        assert seen == set(textures)
