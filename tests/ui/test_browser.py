"""End to end in a real headless browser: `multifusion ui` on a free local port, driven by
Playwright pointed at Debian's chromium (no browser download). Skipped when the `ui` extra
(gradio, playwright) is not installed, and when no chromium is found, with the reason and the fix
(so the README's test command passes on a fresh machine); under CI (the environment variable CI
set, as `.ci/run` sets it) a missing chromium is a failure instead: CI never skips these tests.

Set MULTIFUSION_UI_SCREENSHOTS=docs/img to refresh the README's screenshots (docs/img/ui-*.png).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

pytest.importorskip("gradio", reason='the ui extra is not installed (pip install -e ".[ui]")')
sync_api = pytest.importorskip("playwright.sync_api", reason='the ui extra is not installed (pip install -e ".[ui]")')

pytestmark = pytest.mark.timeout(300)
# A value the page shows after the server answered (a restored recipe's fields) may take several
# seconds while the other test process holds the CPU: expectations wait up to 30 s (they pass as
# soon as the value is there), as the explicit waits below do.
sync_api.expect.set_options(timeout=30_000)

STEPS = "4"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """The server's working folder: relative paths in a recipe (reference images) are read there."""
    return tmp_path_factory.mktemp("served")


@pytest.fixture(scope="module")
def server(tmp_path_factory, served):
    port = _free_port()
    log = tmp_path_factory.mktemp("ui") / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "multifusion.cli", "ui", "--port", str(port)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=served,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"`multifusion ui` did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def chromium() -> str:
    """The browser's executable, found before the server starts (no wasted start-up on a skip)."""
    exe = os.environ.get("MULTIFUSION_CHROMIUM") or shutil.which("chromium")
    if exe is None:
        why = "no chromium found: install Debian's (apt-get install chromium) or set MULTIFUSION_CHROMIUM to a browser"
        if _under_ci():
            pytest.fail(f"{why} (CI is set: the browser tests are required there, never skipped)")
        pytest.skip(why)
    return exe


@pytest.fixture(scope="module")
def page(chromium, server):
    exe = chromium
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        pg.set_default_timeout(60_000)
        # what the first load asks for and complains about (test_the_page_loads_nothing_from_elsewhere)
        pg.loaded, pg.complaints = [], []  # type: ignore[attr-defined]
        pg.on("request", lambda r: pg.loaded.append(r.url))
        pg.on("console", lambda m: pg.complaints.append(m.text) if m.type == "error" else None)
        pg.goto(server)
        pg.wait_for_selector("#run")
        pg.wait_for_timeout(2000)  # the first load settles (an event stream stays open: never "network idle")
        pg.first_load = list(pg.loaded)  # type: ignore[attr-defined]
        pg.first_complaints = list(pg.complaints)  # type: ignore[attr-defined]
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    where = os.environ.get("MULTIFUSION_UI_SCREENSHOTS")
    return Path(where) if where else tmp_path_factory.mktemp("shots")


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def set_text(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(value)
    box.press("Tab")


def canvas_point(page, canvas: str, row: float, col: float) -> tuple[float, float]:
    """Page coordinates of (row, col), fractions of the canvas picture's height and width (where
    the picture sits inside its <img>, which keeps its aspect ratio)."""
    return page.locator(f"#{canvas} img").first.evaluate(
        """(img, [row, col]) => {
        const r = img.getBoundingClientRect();
        let k = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
        if (getComputedStyle(img).objectFit === "scale-down") k = Math.min(k, 1);
        return [r.left + (r.width - img.naturalWidth * k) / 2 + col * img.naturalWidth * k,
                r.top + (r.height - img.naturalHeight * k) / 2 + row * img.naturalHeight * k];
    }""",
        [row, col],
    )


def steady(page, canvas: str) -> None:
    """Wait until the canvas stops moving (a table above it grows when a region is added)."""
    img = page.locator(f"#{canvas} img").first
    before, deadline = None, time.time() + 10
    while (now := img.bounding_box()) != before and time.time() < deadline:
        before = now
        time.sleep(0.3)


def click_canvas(page, canvas: str, row: float, col: float) -> None:
    steady(page, canvas)
    page.mouse.click(*canvas_point(page, canvas, row, col))


def drag_canvas(page, canvas: str, a: tuple, b: tuple, shot: Path | None = None) -> None:
    """Press at a, move to b in steps (as a hand does), release; `shot` saves the canvas mid-drag."""
    steady(page, canvas)
    page.mouse.move(*canvas_point(page, canvas, *a))
    page.mouse.down()
    page.mouse.move(*canvas_point(page, canvas, *b), steps=8)
    if shot is not None:
        page.locator(f"#{canvas}").screenshot(path=str(shot))
    page.mouse.up()


def table_rows(page, table: str) -> list[list[str]]:
    """The table's rows as shown (cells' text), blank rows left out."""
    rows = page.locator(f"#{table} .virtual-row").evaluate_all(
        "rows => rows.map(r => [...r.querySelectorAll('[role=gridcell]')].map(c => c.innerText.trim()))"
    )
    return [r for r in rows if any(r)]


def wait_rows(page, table: str, want) -> list[list[str]]:
    """The table once `want(rows)` holds (the server answers a click or drag by refilling it)."""
    deadline = time.time() + 30
    while not want(rows := table_rows(page, table)) and time.time() < deadline:
        time.sleep(0.2)
    assert want(rows), rows
    return rows


def draw_box(page, canvas: str, a: tuple, b: tuple, regions: int) -> list[list[str]]:
    """Two clicks on the canvas, each waited for (a click sends the corner state it saw)."""
    said = page.locator(f"#canvas-said-{canvas.removeprefix('canvas-')}")
    click_canvas(page, canvas, *a)
    said.filter(has_text="first corner").wait_for()
    click_canvas(page, canvas, *b)
    said.filter(has_text="added").wait_for()
    return wait_rows(page, canvas.replace("canvas-", "param-") + "-regions", lambda rows: len(rows) == regions)


def error_text(page, key: str) -> str:
    loc = page.locator(f"#err-{key}")
    loc.wait_for(state="visible")
    return loc.inner_text()


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "multifusion.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=240,
    )


def download(page, elem_id: str, dest: Path, name_part: str) -> Path:
    link = page.locator(f"#{elem_id} a[download$='{name_part}']").first
    with page.expect_download() as info:
        link.click()
    path = dest / info.value.suggested_filename
    info.value.save_as(path)
    return path


def captions_shown(page, gallery: str) -> list[str]:
    """The captions of a gallery's images, each checked to lie whole inside the gallery's box
    (stretched images pushed them out of view)."""
    frame = page.locator(f"#{gallery} .grid-wrap").bounding_box()
    out = []
    for cap in page.locator(f"#{gallery} .caption-label").all():
        box = cap.bounding_box()
        assert box["y"] >= frame["y"] and box["y"] + box["height"] <= frame["y"] + frame["height"] + 1, (box, frame)
        out.append(cap.inner_text())
    return out


def wait_status(page, text: str) -> str:
    page.locator("#status", has_text=text).wait_for()
    return page.locator("#status").inner_text()


def test_the_first_screen_says_what_to_do_and_shows_run(page):
    page.evaluate("window.scrollTo(0, 0)")
    assert "then Run" in page.locator("#how-to").inner_text()
    box = page.locator("#run").bounding_box()
    assert box is not None and box["y"] + box["height"] <= page.viewport_size["height"], box


def test_mod_regions_drawn_dragged_and_resized_on_the_canvas_then_run_and_regenerate(page, shots, tmp_path):
    choose(page, "method", "mod")
    set_text(page, "sampling-num_inference_steps", STEPS)
    set_text(page, "prompt-0", "a red circle on the left in a snowy field")
    canvas, table = "canvas-mod", "param-mod-regions"
    page.locator(f"#{canvas} img").wait_for()
    # The zoo canvas: 64 x 64 pixels on a 4-pixel latent grid. Region 0 by two clicks: the left
    # 60% (38.4 pixels, snapped to 40); the right stays uncovered and is reported before running.
    steady(page, canvas)
    top = page.locator(f"#{canvas} img").first.bounding_box()["y"]
    rows = draw_box(page, canvas, (0.01, 0.01), (0.99, 0.6), regions=1)
    assert rows[0][:4] == ["0", "64", "0", "40"]
    assert "covered by no region" in page.locator("#canvas-notes-mod").inner_text()
    # Region 1 by a drag on the empty right edge (to column 46.08 -> 48).
    drag_canvas(page, canvas, (0.02, 0.97), (0.98, 0.72))
    rows = wait_rows(page, table, lambda rows: len(rows) == 2)
    assert rows[1][:4] == ["0", "64", "48", "64"]
    steady(page, canvas)  # the table grew by two rows below the canvas: the canvas stayed under the pointer
    assert page.locator(f"#{canvas} img").first.bounding_box()["y"] == top
    # Dragged by its middle 16 pixels to the left, over region 0: moved on the grid, the table follows.
    drag_canvas(page, canvas, (0.5, 0.875), (0.5, 0.625), shot=shots / "ui-drag.png")
    rows = wait_rows(page, table, lambda rows: rows[1][2] != "48")
    assert rows[1][:4] == ["0", "64", "32", "48"] and rows[0][:4] == ["0", "64", "0", "40"]
    page.locator("#canvas-said-mod", has_text="regions[1] moved: rows 0-64, cols 32-48").wait_for()
    # Resized by its bottom-right corner to the canvas' edge: every pixel covered again.
    drag_canvas(page, canvas, (0.995, 0.745), (0.99, 0.999))
    rows = wait_rows(page, table, lambda rows: rows[1][3] == "64")
    assert rows[1][:4] == ["0", "64", "32", "64"]
    page.locator("#canvas-notes-mod", has_text="every pixel").wait_for()
    page.wait_for_timeout(1000)  # let the canvas finish redrawing
    page.screenshot(path=str(shots / "ui-regions.png"), full_page=True)

    page.locator("#run").click()
    wait_status(page, "with mod")
    assert page.locator("#images img").count() >= 1
    # the region-weight picture: what --export-masks writes, among the method pictures
    page.locator("#pictures", has_text="-regions").wait_for()
    page.screenshot(path=str(shots / "ui-mod.png"), full_page=True)

    recipe = download(page, "recipe-file", tmp_path, ".yaml")
    png = download(page, "png-files", tmp_path, "-s0.png")
    made = yaml.safe_load(recipe.read_text())["params"]["regions"]
    assert [[r[k] for k in ("row_init", "row_end", "col_init", "col_end")] for r in made] == [[0, 64, 0, 40], [0, 64, 32, 64]]
    out = tmp_path / "again"
    done = cli("generate", str(recipe), "--out", str(out), "--no-progress", "--export-masks", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    again = out / f"{recipe.stem}-s0.png"
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB")), np.asarray(Image.open(png).convert("RGB")))
    assert (out / f"{recipe.stem}-s0-regions.png").is_file()  # the CLI draws the same picture


def test_image_regions_and_rerolls_show_on_the_canvas_and_drag(page, shots, tmp_path, served):
    Image.new("RGB", (32, 32), (30, 60, 220)).save(served / "blue.png")
    layered = tmp_path / "layered.yaml"
    layered.write_text(
        yaml.safe_dump(
            {
                "method": "mod",
                "models": [
                    {"model": "zoo:general", "prompt": "a red circle in a snowy field"},
                    {"model": "zoo:expert", "prompt": "a red striped circle"},
                ],  # as the next tests want them
                "sampling": {"num_inference_steps": 2},
                "params": {
                    "regions": [
                        {"row_init": 0, "row_end": 64, "col_init": 0, "col_end": 64, "prompt": "a red circle in a snowy field"}
                    ],
                    "image_regions": [
                        {"row_init": 0, "row_end": 24, "col_init": 0, "col_end": 24, "image": "blue.png", "strength": 0.6}
                    ],
                    "rerolls": [{"row_init": 40, "row_end": 64, "col_init": 40, "col_end": 64, "seed": 3}],
                },
            }
        )
    )
    page.locator("#restore input[type=file]").set_input_files(str(layered))
    state = page.locator("#canvas-state-mod textarea")
    deadline = time.time() + 30
    while '"boxes": [[0, 64, 0, 64], [0, 24, 0, 24], [40, 64, 40, 64]]' not in state.input_value() and time.time() < deadline:
        time.sleep(0.2)
    assert '"boxes": [[0, 64, 0, 64], [0, 24, 0, 24], [40, 64, 40, 64]]' in state.input_value()
    # the reference image shows in its box (blue), over the region's colour

    def blue_at_the_top_left() -> bool:
        shown = np.asarray(Image.open(BytesIO(page.locator("#canvas-mod img").first.screenshot())).convert("RGB"))
        r, _, b = shown[shown.shape[0] // 5, shown.shape[1] // 5].astype(int)
        return b > 150 and r < 120

    deadline = time.time() + 30
    while not blue_at_the_top_left() and time.time() < deadline:  # the new picture may still be loading
        time.sleep(0.3)
    assert blue_at_the_top_left()
    page.screenshot(path=str(shots / "ui-canvas-layers.png"), full_page=True)
    # the image region lies on top of region 0: dragging it moves it, in its own table
    drag_canvas(page, "canvas-mod", (0.19, 0.19), (0.44, 0.5))
    rows = wait_rows(page, "param-mod-image_regions", lambda rows: rows and rows[0][0] != "0")
    assert rows[0][:4] == ["16", "40", "20", "44"]
    assert table_rows(page, "param-mod-regions")[0][:4] == ["0", "64", "0", "64"]


def test_a_background_region_covers_the_canvas_and_is_drawn_under_the_boxes(page, shots, tmp_path):
    backed = tmp_path / "backed.yaml"
    backed.write_text(
        yaml.safe_dump(
            {
                "method": "mod",
                "models": [
                    {"model": "zoo:general", "prompt": "a red circle in a snowy field"},
                    {"model": "zoo:expert", "prompt": "a red striped circle"},
                ],
                "sampling": {"num_inference_steps": 2},
                "params": {
                    "regions": [{"row_init": 0, "row_end": 64, "col_init": 0, "col_end": 32, "prompt": "a red circle"}],
                    "background": {"prompt": "a snowy field", "mask_weight": 0.05},
                },
            }
        )
    )
    page.locator("#restore input[type=file]").set_input_files(str(backed))
    notes = page.locator("#canvas-notes-mod")
    notes.filter(has_text="background covers the whole canvas").wait_for()
    assert "every pixel of the 64x64 canvas is covered" in notes.inner_text()
    assert (
        '"boxes": [[0, 64, 0, 32]]' in page.locator("#canvas-state-mod textarea").input_value()
    )  # the background is not dragged

    def right_half_tinted() -> bool:  # the middle of the right half, where only the background lies
        shown = np.asarray(Image.open(BytesIO(page.locator("#canvas-mod img").first.screenshot())).convert("RGB"))
        r, _, b = shown[shown.shape[0] // 2 + 3, shown.shape[1] * 3 // 4 + 3].astype(int)
        return b > r + 3  # the background's colour (blue: region 1), not hatched red

    deadline = time.time() + 30
    while not right_half_tinted() and time.time() < deadline:  # the new picture may still be loading
        time.sleep(0.3)
    assert right_half_tinted()
    page.locator("#canvas-mod").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "ui-canvas-background.png"))


def test_snb_shows_images_and_masks_then_a_png_restores_its_recipe(page, shots, tmp_path):
    choose(page, "method", "snb")
    set_text(page, "sampling-num_inference_steps", STEPS)
    page.locator("#run").click()
    wait_status(page, "with snb")
    page.locator("#pictures img").first.wait_for()
    assert page.locator("#images img").count() >= 1
    page.screenshot(path=str(shots / "ui-snb.png"), full_page=True)

    png = download(page, "png-files", tmp_path, "-s0.png")
    choose(page, "method", "single")
    set_text(page, "sampling-num_inference_steps", "30")
    page.locator("#param-snb-k").wait_for(state="hidden")
    page.locator("#restore input[type=file]").set_input_files(str(png))
    sync_api.expect(page.locator("#method input")).to_have_value("snb")
    page.locator("#status", has_text=f"restored the recipe of {png.name}: method snb").wait_for()
    sync_api.expect(page.locator("#sampling-num_inference_steps input")).to_have_value(STEPS)
    page.locator("#param-snb-k").wait_for(state="visible")  # the method came back, so did its form


def test_bad_input_shows_the_cli_error_at_the_field(page, shots, tmp_path):
    # a region off the canvas: restored from a recipe file, then run (the canvas is known after loading)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "method: mod\nmodels: [{model: 'zoo:general', prompt: a red circle}]\nsampling: {num_inference_steps: 2}\n"
        "params: {regions: [{row_init: 0, row_end: 64, col_init: 0, col_end: 72, prompt: a red circle}]}\n"
    )
    page.locator("#restore input[type=file]").set_input_files(str(bad))
    page.locator("#param-mod-regions").wait_for(state="visible")
    page.locator("#run").click()
    shown = error_text(page, "mod-params-regions")
    said = cli("generate", str(bad), "--out", str(tmp_path / "o"), cwd=tmp_path).stderr.strip().splitlines()[-1]
    assert said.startswith("error: params.regions[0].col_end: 72 lies outside the 64x64 canvas")
    assert said.removeprefix("error: ") in shown
    page.screenshot(path=str(shots / "ui-error-region.png"), full_page=True)

    # an unknown model path, beside that model's slot
    choose(page, "method", "snb")
    page.locator("#n-models input[type=number]").fill("2")
    page.locator("#n-models input[type=number]").press("Enter")
    page.locator("#model-1").wait_for(state="visible")
    set_text(page, "model-1", "/nonexistent/model")
    set_text(page, "prompt-1", "a red striped circle")
    set_text(page, "param-snb-k", "many")  # a second bad field, named in the same round
    page.locator("#validate").click()
    shown = error_text(page, "models-1-model")
    assert "models[1].model: cannot find model '/nonexistent/model'" in shown
    assert "params.k: Input should be a valid number" in error_text(page, "snb-params-k")
    page.screenshot(path=str(shots / "ui-error-model.png"), full_page=True)
    # a corrected field's error goes as it is edited, before the next Validate; the other stays
    k = page.locator("#param-snb-k textarea, #param-snb-k input").first
    k.fill("")
    k.press_sequentially("1")  # typed (Gradio's input event follows keys, not a scripted fill)
    page.locator("#err-snb-params-k").wait_for(state="hidden")
    assert page.locator("#err-models-1-model").is_visible()

    # a Hub model while offline (the first: nothing loads before it): the reason, not a pointer to a
    # stack trace the page does not show
    set_text(page, "model-1", "zoo:expert")
    set_text(page, "model-0", "nobody-here/no-such-model")
    page.locator("#run").click()
    wait_status(page, "not run")
    shown = error_text(page, "models-0-model")
    assert "offline mode is enabled" in shown and "stacktrace" not in shown
    set_text(page, "model-0", "zoo:general")

    # a file that is no PNG, dropped on the restore box
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    page.locator("#restore input[type=file]").set_input_files(str(fake))
    shown = error_text(page, "restore")
    said = cli("generate", "--from-image", str(fake), "--out", str(tmp_path / "o"), cwd=tmp_path).stderr.strip().splitlines()[-1]
    assert "is not a readable image" in shown and "is not a readable image" in said


def test_compare_two_methods_with_judge_scores(page, shots):
    set_text(page, "model-1", "zoo:expert")
    set_text(page, "sampling-num_inference_steps", STEPS)
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-run").click()
    page.locator("#compare-status", has_text="compared 2 methods").wait_for()
    assert page.locator("#compare-images img").count() >= 2
    assert captions_shown(page, "compare-images") == ["average seed 0", "snb seed 0"]
    scores = page.locator("#compare-scores").inner_text()
    assert "average" in scores and "snb" in scores and "judge reads" in scores
    page.screenshot(path=str(shots / "ui-compare.png"), full_page=True)


def test_previews_stream_during_a_long_run_and_cancel_stops_it(page, shots):
    page.get_by_role("tab", name="Compose").click()
    choose(page, "method", "average")
    set_text(page, "sampling-num_inference_steps", "500")
    set_text(page, "preview-every", "3")
    page.locator("#run").click()
    page.locator("#status .progress-level").wait_for()  # it is running
    first = page.locator("#preview img").first
    first.wait_for()  # a preview arrived while sampling
    src = first.get_attribute("src")
    deadline = time.time() + 60
    while first.get_attribute("src") == src and time.time() < deadline:  # and the next one replaces it
        time.sleep(0.2)
    assert first.get_attribute("src") != src
    assert "done" not in page.locator("#status").inner_text()  # still sampling
    # the bar says the step and the run's own time; Gradio's clock, restarting with each preview, is hidden
    assert re.search(r"step \d+/500, [\d.]+ s", page.locator("#status .progress-level").inner_text())
    assert not page.locator("#status .progress-text").is_visible()
    page.locator("#status .progress-level").wait_for()  # the bar shows again after each preview
    page.locator("#run").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "ui-progress.png"))
    page.locator("#cancel").click()
    page.locator("#status", has_text="cancelled").wait_for(timeout=30_000)
    time.sleep(2)  # the worker stops at its next step; the page stays usable
    set_text(page, "sampling-num_inference_steps", "2")
    page.locator("#run").click()
    said = wait_status(page, "with average")
    assert re.match(r"done in [\d.]+ s: ", said), said  # the run's total time
    page.locator("#preview img").wait_for(state="detached")  # the last step's preview gives way to the images


def test_a_restored_vae_and_true_cfg_scale_run_and_download_and_a_missing_vae_is_named_at_its_field(
    page, shots, tmp_path, served
):
    from multifusion.zoo.tiny_flow import build_tiny_flux_pipeline

    build_tiny_flux_pipeline(served / "flux")  # the server reads the recipe's relative paths in its folder
    flux = tmp_path / "flux.yaml"
    flux.write_text(
        yaml.safe_dump(
            {
                "method": "single",
                "models": [
                    {
                        "model": "flux",
                        "vae": "flux/vae",
                        "true_cfg_scale": 2.5,
                        "prompt": "a red circle",
                        "negative_prompt": "blurry",
                    }
                ],
                "sampling": {"num_inference_steps": 2, "height": 16, "width": 16},
            }
        )
    )
    page.get_by_role("tab", name="Compose").click()
    page.locator("#restore input[type=file]").set_input_files(str(flux))
    # the slot's "more" fields unfold to show what the recipe sets there
    sync_api.expect(page.locator("#vae-0 textarea, #vae-0 input").first).to_have_value("flux/vae")
    sync_api.expect(page.locator("#true_cfg_scale-0 textarea, #true_cfg_scale-0 input").first).to_have_value("2.5")
    page.locator("#run").click()
    wait_status(page, "with single")
    made = yaml.safe_load(download(page, "recipe-file", tmp_path, ".yaml").read_text())["models"][0]
    assert (made["vae"], made["true_cfg_scale"], made["negative_prompt"]) == ("flux/vae", 2.5, "blurry")

    set_text(page, "vae-0", "flux/no-such-vae")
    page.locator("#validate").click()
    shown = error_text(page, "models-0-vae")
    assert "models[0].vae: cannot find VAE 'flux/no-such-vae'" in shown
    page.locator("#vae-0").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "ui-error-vae.png"))


def test_the_page_has_a_component_for_every_field_a_recipe_restores():
    from multifusion.recipe import Recipe
    from multifusion.ui import forms
    from multifusion.ui.app import build_app

    app = build_app().multifusion_app  # type: ignore[attr-defined]
    for method in ("snb", "mod"):
        restored = forms.form_from_recipe({"method": method, "models": [{"model": "zoo:general"}], "runtime": {}})
        assert set(restored) <= set(app.comps), set(restored) - set(app.comps)
    # every key the form is read from is on the page: reading the page's own values gives a recipe
    assert forms.recipe_from_form({k: c.value for k, c in app.comps.items()})["method"] == "snb"
    assert {w.name for w in forms.recipe_widgets()} | set(forms.SECTIONS) == set(Recipe.model_fields)


def test_a_restored_merge_and_runtime_run_and_download_as_restored(page, shots, tmp_path):
    from multifusion.recipe import parse_recipe

    restored = {
        "method": "average",
        "params": {"weights": [0.6, 0.4]},
        "models": [
            {"model": "merge:mix", "prompt": "a red circle in a snowy field"},
            {"model": "zoo:expert", "prompt": "a red striped circle"},
        ],
        "merges": {"mix": {"models": ["zoo:general", "zoo:cartoon"], "weights": [0.7, 0.3]}},
        "sampling": {"num_inference_steps": 2, "height": 32, "width": 32, "num_images": 2, "seed": 5},
        "runtime": {"max_pixels": 4096, "vae_device": "cpu", "allow_pickle": True},
    }
    path = tmp_path / "merged.yaml"
    path.write_text(yaml.safe_dump(restored))
    restored["runtime"]["allow_pickle"] = False  # a recipe never turns pickles on by itself: restored off, and said
    page.get_by_role("tab", name="Compose").click()
    page.locator("#restore input[type=file]").set_input_files(str(path))
    # the merges and runtime accordions open on what the recipe sets there
    sync_api.expect(page.locator("#merges textarea")).to_have_value(
        "mix:\n  models: ['zoo:general', 'zoo:cartoon']\n  weights: [0.7, 0.3]"
    )
    sync_api.expect(page.locator("#runtime-max_pixels input, #runtime-max_pixels textarea").first).to_have_value("4096")
    page.locator("#param-average-weights").wait_for(state="visible")  # the method's form is shown
    assert "runtime.allow_pickle: the recipe turns it on; it is left off here" in error_text(page, "runtime")
    assert not page.locator("#runtime-allow_pickle input").is_checked()
    page.locator("#run").click()
    said = wait_status(page, "with average")
    assert "2 image(s)" in said
    assert page.locator("#images img").count() == 2
    assert captions_shown(page, "images") == ["average seed 5", "average seed 6"]
    page.screenshot(path=str(shots / "ui-merges.png"), full_page=True)
    made = yaml.safe_load(download(page, "recipe-file", tmp_path, ".yaml").read_text())
    assert parse_recipe(made) == parse_recipe(restored)


def test_the_page_loads_nothing_from_elsewhere(page, server):
    """Offline: every request of the first load goes to the UI's own server, and the console
    reports no failure."""
    here = urllib.parse.urlsplit(server).netloc
    assert page.first_load and all(urllib.parse.urlsplit(u).netloc == here for u in page.first_load if u.startswith("http")), [
        u for u in page.first_load if urllib.parse.urlsplit(u).netloc != here
    ]
    assert not page.first_complaints, page.first_complaints


def _ask(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _upload(size: int, boundary: str = "mf-boundary") -> tuple[bytes, dict]:
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + b"\0" * size
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_the_server_is_locked_down(server):
    from multifusion.ui.app import MAX_UPLOAD

    # a request naming a function the page does not have: a short answer, no traceback, no paths
    status, body = _ask(
        server + "gradio_api/queue/join",
        b'{"data": [], "fn_index": 9999, "session_hash": "x"}',
        {"Content-Type": "application/json"},
    )
    assert status >= 400 and len(body) < 200 and b"Traceback" not in body and b"/" not in body.replace(b"\\/", b""), body
    # a page of another site, reached through a DNS name re-pointed to this machine (DNS rebinding)
    port = urllib.parse.urlsplit(server).port
    assert _ask(server, headers={"Host": f"rebind.example:{port}"})[0] == 400
    assert _ask(server, headers={"Host": f"localhost:{port}"})[0] == 200
    # an upload posted by another site's page is refused, however small
    body, headers = _upload(10)
    assert _ask(server + "gradio_api/upload", body, {**headers, "Origin": "http://elsewhere.example"})[0] == 403
    assert _ask(server + "gradio_api/upload", body, {**headers, "Origin": server.rstrip("/")})[0] == 200
    # and the page's own uploads have a size limit
    limit = int(MAX_UPLOAD.removesuffix("mb")) * 1024 * 1024
    body, headers = _upload(limit + 1024)
    assert _ask(server + "gradio_api/upload", body, {**headers, "Origin": server.rstrip("/")})[0] == 413
