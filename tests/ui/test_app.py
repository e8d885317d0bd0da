"""The UI's handlers (`ui.app.App`) called as Gradio calls them, without a browser: what a run
reports, what Compare says, the choices the page offers. Skipped without the `ui` extra."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("gradio", reason='the ui extra is not installed (pip install -e ".[ui]")')

from multifusion.loading import zoo_models  # noqa: E402
from multifusion.ui import forms  # noqa: E402
from multifusion.ui.app import App, build_app  # noqa: E402


@pytest.fixture(scope="module")
def app() -> App:
    return build_app().multifusion_app  # type: ignore[attr-defined]


def _data(app: App, **changes) -> dict:
    """The page's values (component -> value) of the form holding a two-model zoo recipe."""
    values = forms.form_from_recipe(
        {
            "method": "average",
            "models": [
                {"model": "zoo:general", "prompt": "a red circle in a snowy field"},
                {"model": "zoo:expert", "prompt": "a red striped circle"},
            ],
            "sampling": {"num_inference_steps": 2},
        }
    )
    values.update(changes)
    return {c: values.get(k, c.value) for k, c in app.comps.items()}


def test_the_model_choices_are_every_zoo_model(app):
    assert "zoo:toon" in app.choices
    assert [c for c in app.choices if c.startswith("zoo:")] == [f"zoo:{n}" for n in zoo_models()]


def test_a_batch_advances_the_progress_by_all_its_images_and_the_clock_runs_on(app, tmp_path):
    recipe = forms.recipe_from_form(app.values(_data(app, **{"sampling.num_images": 4, "sampling.num_inference_steps": 4})))
    events = []
    images, _, _ = app.generate(recipe, tmp_path, events.append, preview_every=2)
    assert len(images) == 4
    progress = [e[1] for e in events if e[0] == "progress"]
    # four images denoised together, four steps: 4, 8, 12, 16 of 16 image steps (not 1..4 of 16)
    assert progress == [(4 * k, 16) for k in range(1, 5)]
    clock = [float(re.search(r"([\d.]+) s$", e[2]).group(1)) for e in events if e[0] == "progress"]
    assert clock == sorted(clock) and clock[-1] > 0
    kinds = [e[0] for e in events]
    assert kinds.index("preview") < len(kinds) - 1 - kinds[::-1].index("progress")  # previews come mid-run


def test_compare_names_a_failing_method_in_one_line_and_shows_scores_only_after_a_run(app):
    data = _data(app)
    data[app._cmp_methods] = ["average", "mod"]  # mod without regions fails its check
    status, gallery, scores = app.on_compare(data, progress=lambda *a, **k: None)
    failed = next(ln for ln in status.splitlines() if ln.startswith("- **mod**"))
    assert failed.startswith("- **mod**: params.regions") and ": ;" not in failed
    assert [c for _, c in gallery] == ["average seed 0"]
    assert scores["visible"] is True and list(scores["value"]["method"]) == ["average"]
    built = build_app()  # before any run the score table is hidden (empty, it shows headers 1 2 3)
    table = next(b for b in built.blocks.values() if getattr(b, "elem_id", None) == "compare-scores")
    assert table.visible is False


def test_a_merge_of_models_without_a_common_ancestor_is_said(app):
    from multifusion.recipe import parse_recipe

    data = _data(app)
    recipe = parse_recipe(forms.recipe_from_form(app.values(data), "merge"))
    note = app.lineage_note(recipe, app.handles(recipe))
    assert note is not None and "models[1] (zoo:expert" in note and "no ancestor" in note
    related = parse_recipe(forms.recipe_from_form(app.values(_data(app, **{"models[1].model": "zoo:cartoon"})), "merge"))
    assert app.lineage_note(related, app.handles(related)) is None
    assert app.lineage_note(parse_recipe(forms.recipe_from_form(app.values(data))), []) is None  # not a merge


def test_a_run_of_such_a_merge_says_so_in_its_status(app):
    data = _data(app, method="merge")
    said = [out[len(app.error_outputs())] for out in app.on_run(data, progress=lambda *a, **k: None)]
    assert any("no ancestor" in s for s in said[1:-1] if isinstance(s, str))  # while it runs
    assert said[-1].startswith("done in ") and "models[1] (zoo:expert" in said[-1]  # and when it is done
