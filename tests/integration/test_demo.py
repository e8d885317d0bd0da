import json

import pytest

from multifusion.cli import main
from multifusion.loading import zoo_models


def test_tiny_demo_writes_images_grid_and_report(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress", "--tiny"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {(r["app"], r["method"]) for r in report["rows"]} >= {
        ("base", "single"),
        ("fine-grained", "average"),
        ("fine-grained", "snb"),
        ("regional", "mod"),
    }
    for row in report["rows"]:
        assert set(row) == {"app", "method", "models", "seeds", "metrics"} and row["seeds"] == 4
    assert "tiny randomly initialised" in (out / "report.md").read_text()
    assert (out / "grid.png").stat().st_size > 0
    assert len(list(out.glob("*-s[0-9].png"))) == 24  # 6 rows x 4 seeds
    assert (out / "snb-tiny-general+tiny-expert-s0-masks.png").is_file() and "masks" in (out / "report.md").read_text()
    assert (out / "amdm-tiny-general+tiny-expert-s0-amdm.png").is_file() and "AMDM" in (out / "report.md").read_text()
    # the region-weight picture `generate --export-masks` writes, shown in the report
    assert (out / "mod-tiny-general+tiny-expert-s0-regions.png").is_file()
    assert "](mod-tiny-general+tiny-expert-s0-regions.png)" in (out / "report.md").read_text()
    # Every row's image is what its own recipe makes: each PNG regenerates alone from the recipe
    # in its metadata (models, prompts, method and parameters as written). Alone, not in the
    # demo's batch of 4: the UNet rounds differently (latents ~2e-5 apart), which may move a
    # pixel by one level of 8 bits; a wrong model, prompt or parameter moves most of them.
    import numpy as np
    from PIL import Image

    names = sorted(p.name for p in out.glob("*-s2.png"))
    assert len(names) == 6
    for name in names:
        again = tmp_path / "again" / name
        assert main(["generate", "--from-image", str(out / name), "--out", str(again), "--no-progress"]) == 0
        assert [p.name for p in again.glob("*.png")] == [name]
        first, second = (np.asarray(Image.open(d / name).convert("RGB"), dtype=np.int16) for d in (out, again))
        assert np.abs(first - second).max() <= 1, name


@pytest.mark.skipif(not {"general", "expert"} <= set(zoo_models()), reason="zoo models general and expert are not installed")
# The whole zoo demo, long by design: about 7 minutes on 2 cores beside the other test process,
# near pyproject's 600 s limit (meant for a hung test) on a slower or busier machine.
@pytest.mark.timeout(1500)
def test_zoo_demo_reports_every_row_with_success(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    apps = {r["app"] for r in report["rows"]}
    assert "base" in apps and "fine-grained" in apps
    for row in report["rows"]:
        assert 0.0 <= row["metrics"]["success"] <= 1.0
    # What the demo shows: each model succeeds more often on its own captions than on another
    # model's. Per model the two can tie on 8 captions, so the claim is checked on the means
    # (0.58 against 0.23 when this was written): a model given the wrong captions, or judged
    # against the wrong ones, brings the two together.
    base = [r for r in report["rows"] if r["app"] == "base"]
    own = [r["metrics"]["success"] for r in base if r["prompts"] == r["models"][0]]
    cross = [r["metrics"]["success"] for r in base if r["prompts"] != r["models"][0]]
    assert len(own) == len(zoo_models()) and cross
    assert sum(own) / len(own) > sum(cross) / len(cross) + 0.15, (own, cross)
    # The app rows are the benchmark's own results, not copies of another row.
    bench = json.loads((out / "bench" / "results.json").read_text())["rows"]
    keys = ("app", "method", "models", "seeds", "metrics")
    assert [{k: r[k] for k in keys} for r in report["rows"] if r["app"] != "base"] == [{k: r[k] for k in keys} for r in bench]
    assert {("fine-grained", "snb"), ("fine-grained", "average")} <= {(r["app"], r["method"]) for r in report["rows"]}
    assert (out / "pictures" / "snb-s0-masks.png").exists() and (out / "pictures" / "panorama-s0.png").exists()
    shown = (out / "report.md").read_text()
    for picture in ("regions-s0-regions.png", "panorama-s0-regions.png"):  # beside the composition and the panorama
        assert (out / "pictures" / picture).exists() and f"](pictures/{picture})" in shown
    methods = {(r["app"], r["method"]) for r in report["rows"]}
    if {"layout", "palette"} <= set(zoo_models()):
        assert ("aggregation", "amdm") in methods and (out / "pictures" / "amdm-s0-amdm.png").exists()
    if {"slice0", "slice1"} <= set(zoo_models()):
        assert {("ensemble", "afa"), ("ensemble", "merge"), ("ensemble", "mbw")} <= methods
        assert (out / "pictures" / "afa-s0-afa.png").exists()
