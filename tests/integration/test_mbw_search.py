"""Automatic block-weight search: the coordinate walk, Optuna, the resumable log, the plot, the
judge scorer and the command."""

import json

import numpy as np
import pytest

from multifusion.cli import main
from multifusion.errors import RecipeError
from multifusion.weights.search import app_scorer, plot_progress, search_block_weights

SMALL = dict(num_inference_steps=2, progress=False)


class CountingScorer:
    """Mean brightness of the images (any callable(images, prompts) -> float is a scorer)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images, prompts):
        self.calls += 1
        assert len(images) == len(prompts)
        return float(np.mean([np.asarray(im, dtype=np.float64).mean() for im in images]))


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_coordinate_search_logs_every_candidate_and_resumes_without_rescoring(tiny_a, tiny_b, tmp_path):
    scorer = CountingScorer()
    first = search_block_weights(
        [tiny_a, tiny_b], ["a red circle", "a blue square"], scorer, tmp_path, budget=6, grid=(0, 1), **SMALL
    )
    log = _lines(tmp_path / "search.jsonl")
    assert len(log) == first.evaluations == first.computed == scorer.calls == 6  # start + 9 blocks x 1 other value, cut at 6
    m00 = [0.5] * 4  # IN00..IN03 before M00
    assert log[0]["blocks"] == [0.5] * 9 and log[1]["blocks"] == m00 + [0.0] + m00 and log[2]["blocks"] == m00 + [1.0] + m00
    assert log[3]["blocks"][:2] in ([0.0, 0.5], [1.0, 0.5])  # then IN00, from the better M00 (or 0.5 on a tie)
    assert first.score == max(e["score"] for e in log)
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["blocks"] == list(first.blocks) and len(best["blocks_ids"]) == 9

    again = search_block_weights(
        [tiny_a, tiny_b], ["a red circle", "a blue square"], scorer, tmp_path, budget=8, grid=(0, 1), **SMALL
    )
    assert scorer.calls == 8 and again.computed == 2 and again.evaluations == 8  # the first 6 replayed from the log
    assert (tmp_path / "search.png").is_file()


def test_the_walk_keeps_a_better_value_and_moves_on(tiny_a, tiny_b, tmp_path):
    """Scores in a fixed order: the walk keeps M00 at 1 and tries IN00 from there."""
    scores = iter([0.1, 0.0, 0.9] + [0.5] * 20)  # start, M00 -> 0, M00 -> 1 (kept), ...
    res = search_block_weights([tiny_a, tiny_b], ["p"], lambda ims, ps: next(scores), tmp_path, budget=5, grid=(0, 1), **SMALL)
    log = _lines(tmp_path / "search.jsonl")
    assert log[3]["blocks"] == [0.0] + [0.5] * 3 + [1.0] + [0.5] * 4  # IN00 tried from the improved point
    assert res.blocks == tuple([0.5] * 4 + [1.0] + [0.5] * 4) and res.score == 0.9


def test_optuna_is_warm_started_from_the_log_and_stays_on_the_grid(tiny_a, tiny_b, tmp_path):
    # optuna is in the `test` extra: a missing package fails here instead of skipping the search.
    scorer = CountingScorer()
    search_block_weights([tiny_a, tiny_b], ["p"], scorer, tmp_path, budget=3, grid=(0, 0.5, 1), **SMALL)
    res = search_block_weights([tiny_a, tiny_b], ["p"], scorer, tmp_path, optimizer="optuna", budget=6, grid=(0, 0.5, 1), **SMALL)
    log = _lines(tmp_path / "search.jsonl")
    assert res.evaluations == len(log) <= 6 and scorer.calls == len(log)
    assert [e["optimizer"] for e in log[:3]] == ["coordinate"] * 3
    assert all(v in (0, 0.5, 1) for e in log for v in e["blocks"])


def test_optuna_missing_says_how_to_install(tiny_a, tiny_b, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__
    monkeypatch.setattr(
        builtins,
        "__import__",
        lambda name, *a, **k: (_ for _ in ()).throw(ImportError()) if name == "optuna" else real(name, *a, **k),
    )
    with pytest.raises(RecipeError, match=r"pip install 'multifusion\[search\]'"):
        search_block_weights([tiny_a, tiny_b], ["p"], CountingScorer(), tmp_path, optimizer="optuna", **SMALL)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(optimizer="cordinate"), "did you mean 'coordinate'"),
        (dict(budget=0), "budget: must be a positive integer"),
        (dict(grid=(0, 1.5)), r"grid: block weights of weighted_sum \(weights\) must lie in \[0, 1\]"),
        (dict(seeds=0), "seeds: must be a positive integer"),
    ],
)
def test_bad_arguments(tiny_a, tiny_b, tmp_path, kwargs, match):
    with pytest.raises(RecipeError, match=match):
        search_block_weights([tiny_a, tiny_b], ["p"], CountingScorer(), tmp_path, **{**SMALL, **kwargs})


def test_a_folder_of_other_settings_is_refused(tiny_a, tiny_b, tmp_path):
    search_block_weights([tiny_a, tiny_b], ["p"], CountingScorer(), tmp_path, budget=1, **SMALL)
    with pytest.raises(RecipeError, match=r"other settings \(prompts\)"):
        search_block_weights([tiny_a, tiny_b], ["q"], CountingScorer(), tmp_path, budget=1, **SMALL)


def test_plot_draws_the_best_score_so_far(tmp_path):
    from PIL import Image

    path = plot_progress([0.1, 0.5, 0.3, 0.7], tmp_path / "p.png")
    assert Image.open(path).size == (480, 300)
    plot_progress([0.2], tmp_path / "one.png")  # one point, flat range: no error


def test_the_judge_scorer_reads_an_apps_targets():
    from multifusion.bench.apps import APPS
    from multifusion.zoo.render import render

    prompts, score = app_scorer("cross-domain", 2, seeds=2)
    app = APPS["cross-domain"]
    assert prompts == [p.prompts["cartoon"] for p in app.prompts(2) for _ in range(2)]
    from PIL import Image

    rng = np.random.default_rng(0)
    perfect = [Image.fromarray(render(p.scene, rng)) for p in app.prompts(2) for _ in range(2)]
    assert score(perfect, prompts) >= 0.5  # the judge reads renders of the targets
    blank = [Image.new("RGB", (64, 64), "grey")] * 4
    assert score(blank, prompts) == 0.0
    with pytest.raises(RecipeError, match="do not follow the prompts"):
        score(blank, prompts[::-1])


def test_mbw_search_command(tmp_path, capsys):
    out = tmp_path / "s"
    args = [
        "mbw-search",
        "ensemble",
        "--out",
        str(out),
        "--budget",
        "2",
        "--prompts",
        "1",
        "--steps",
        "2",
        "--grid",
        "0,1",
        "--no-progress",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "best" in text and "after 2 evaluations (2 new)" in text
    assert main(args) == 0
    assert "(0 new)" in capsys.readouterr().out
    assert json.loads((out / "search.json").read_text())["models"] == ["zoo:slice0", "zoo:slice1"]
    assert main(["mbw-search", "regional", "--out", str(tmp_path / "r")]) == 2
    assert "a block-weight search merges two" in capsys.readouterr().err


def test_a_search_by_another_method_scores_that_methods_block_merge(tiny_a, tiny_b, tmp_path):
    """The images a ties search scores are those of `mbw` with merge_method ties at the candidate."""
    from multifusion.api import Run

    seen = []
    res = search_block_weights(
        [tiny_a, tiny_b],
        ["a red circle"],
        lambda ims, ps: seen.append(ims) or 0.0,
        tmp_path,
        budget=2,
        grid=(0, 2),
        merge_method="ties",
        options={"density": 0.5},
        **SMALL,
    )
    log = _lines(tmp_path / "search.jsonl")
    assert log[1]["blocks"] == [0.5] * 4 + [0.0] + [0.5] * 4  # M00 tried at 0, then 2 (outside [0, 1]: alpha may exceed 1)
    settings = json.loads((tmp_path / "search.json").read_text())
    assert settings["merge_method"] == "ties" and settings["options"] == [["density", 0.5]]
    best = json.loads((tmp_path / "best.json").read_text())["mbw_params"]
    assert best["merge_method"] == "ties" and best["density"] == 0.5 and res.evaluations == 2
    for images, entry in zip(seen, log):
        recipe = {
            "method": "mbw",
            "models": [{"model": tiny_a, "prompt": ["a red circle"]}, {"model": tiny_b, "prompt": ["a red circle"]}],
            "params": {"blocks": entry["blocks"], "merge_method": "ties", "density": 0.5},
            "sampling": {"num_inference_steps": 2, "scheduler": "ddim", "seed": 0, "num_images": 1},
        }
        want = [im for part in Run(recipe).batches(batch_size=1, progress=False) for im in part.images]
        assert [np.asarray(i).tolist() for i in images] == [np.asarray(i).tolist() for i in want]
    plain = tmp_path / "plain"
    search_block_weights(
        [tiny_a, tiny_b], ["a red circle"], lambda ims, ps: seen.append(ims) or 0.0, plain, budget=2, grid=(0, 1), **SMALL
    )
    assert np.asarray(seen[-1][0]).tolist() != np.asarray(seen[1][0]).tolist()  # a weighted sum at M00 = 0 differs


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(merge_method="tiez"), r"merge_method: unknown merge method 'tiez'.*did you mean 'ties'"),
        (dict(merge_method="model_stock"), r"merge_method: model_stock has no ratio to set per block.*ties \(alpha\)"),
        (dict(merge_method="geometric_median"), r"merge_method: geometric_median has no ratio"),
        (dict(merge_method="ties", options={"densty": 0.5}), r"densty: .*did you mean 'density'"),
        (dict(merge_method="ties", options={"density": 0.0}), r"density: 0.0 is not a finite number in \(0, 1\]"),
        (dict(merge_method="add_difference"), r"models: .*three models"),
        (dict(merge_method="slerp", grid=(0, 1.5)), r"grid: block weights of slerp \(t\) must lie in \[0, 1\]"),
        (dict(merge_method="ties", grid=(-1, 1)), r"grid: block weights of ties \(alpha\) must lie >= 0"),
    ],
)
def test_bad_search_methods_are_named_before_loading(tiny_a, tiny_b, tmp_path, monkeypatch, kwargs, match):
    import multifusion.loading as loading

    monkeypatch.setattr(loading, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(RecipeError, match=match):
        search_block_weights([tiny_a, tiny_b], ["p"], CountingScorer(), tmp_path, **{**SMALL, **kwargs})
    assert not (tmp_path / "search.json").exists()


def test_mbw_search_command_takes_a_method(tmp_path, capsys):
    out = tmp_path / "t"
    args = ["mbw-search", "ensemble", "--out", str(out), "--budget", "1", "--prompts", "1", "--steps", "2", "--no-progress"]
    assert main([*args, "--method", "ties", "--option", "density=0.5"]) == 0
    assert json.loads((out / "best.json").read_text())["mbw_params"]["merge_method"] == "ties"
    assert main([*args, "--method", "model_stock"]) == 2
    assert "--method: model_stock has no ratio to set per block" in capsys.readouterr().err
    assert main([*args, "--method", "slerpp"]) == 2
    assert "did you mean 'slerp'" in capsys.readouterr().err
    assert main([*args, "--method", "ties", "--option", "density"]) == 2
    assert "--option 'density': give NAME=NUMBER" in capsys.readouterr().err
