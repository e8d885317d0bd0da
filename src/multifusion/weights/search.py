"""Automatic block-weight search (auto-MBW): block weights of a merge maximising a score.

Every candidate is a list of block weights (one per block id of the UNet, `blocks.py`; BASE is
left out, so the text encoder is the first model's and each prompt is encoded the same way for
every candidate). A block weight sets the ratio of any registered merge method that has one
(`merge_method`; default weighted_sum, (1 - w) A + w B; ties / dare: alpha, slerp: t,
add_difference: alpha), with the method's other hyper-parameters fixed (`options`). A candidate is scored by running the `mbw` method on the loaded models (a
merge in memory, sampled as `single` with the first model's prompts) and calling the scorer on
the images: any `scorer(images, prompts) -> float`, higher is better, or `app_scorer`, the zoo
judge's success rate on a benchmark app's prompts.

Two optimisers:

- ``coordinate``: the "Linear" search of the auto-MBW extension (Xerxemi/sdweb-auto-MBW,
  `scripts/mbw/auto_mbw.py`, `linear_pass`): M00 first, then IN00.. and OUT.. in order, each
  block tried at every value of a grid (0, 0.25, 0.5, 0.75, 1) with the others held, keeping
  the best. Deviations: the start is all 0.5 (the plain average; auto-MBW starts from its
  sliders, 0 by default) and a value replaces the current one only when strictly better (ties
  keep it, and the current value is not scored again); passes repeat until one improves nothing
  or the budget is spent (auto-MBW runs 1 to 3); BASE is not searched (see above).
- ``optuna``: Optuna's TPE sampler (seeded) on the same grid, warm-started with every
  candidate already in the log (of either optimiser). Needs `pip install multifusion[search]`.

Resumable: every evaluated candidate is appended to ``OUT/search.jsonl`` with its score the
moment it is known; a rerun reads the log and scores no candidate twice (the coordinate walk
replays to where it stopped). ``OUT/search.json`` holds the settings; a rerun with other
settings in the same folder is refused (its scores would not compare). ``OUT/search.png`` plots
the best score over evaluations; ``OUT/best.json`` holds the best candidate as `mbw` params.

The evaluation is cheap by default (4 prompts, 1 seed each, 10 DDIM steps): a search ranks
candidates on a small, noisy sample, so re-check the winner with the benchmark.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from multifusion.errors import RecipeError, clip, did_you_mean
from multifusion.io import atomic_path, write_text

Scorer = Callable[[list, list[str]], float]
OPTIMIZERS = ("coordinate", "optuna")
GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
LOG, SETTINGS, PLOT, BEST = "search.jsonl", "search.json", "search.png", "best.json"


@dataclass(frozen=True)
class SearchSettings:
    """What a score depends on; a log is only resumed under the same settings."""

    models: tuple[str, ...]
    prompts: tuple[str, ...]
    seeds: int = 1
    num_inference_steps: int = 10
    scheduler: str = "ddim"
    guidance_scale: float = 7.5
    seed: int = 0
    scorer: str = "custom"
    merge_method: str = "weighted_sum"
    options: tuple[tuple[str, float | int], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "options", tuple(sorted(dict(self.options).items())))
        search_method(self.merge_method, dict(self.options), len(self.models))
        if not self.prompts:
            raise RecipeError("prompts: give at least one prompt")
        for name in ("seeds", "num_inference_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise RecipeError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class SearchResult:
    blocks: tuple[float, ...]
    score: float
    evaluations: int  # candidates in the log
    computed: int  # of which scored by this call
    log: Path
    plot: Path


def search_method(name: str, options: dict | None = None, n_models: int | None = None, where: str = "merge_method"):
    """The registered merge method `name` whose ratio a search sets per block, checked with its
    other hyper-parameters `options` (and the model count) before anything loads: RecipeError
    naming `where` for an unknown name ("did you mean") or a method without a ratio, naming the
    option or `models` for the rest."""
    from multifusion.weights.models import MergeSpec
    from multifusion.weights.registry import MERGE_METHODS, MergeSpecError, get_merge_method

    try:
        method = get_merge_method(name, where)
    except MergeSpecError as err:
        raise RecipeError(f"{where}: {err.message}") from None
    if method.ratio is None:
        takes = ", ".join(f"{m.name} ({m.ratio})" for m in MERGE_METHODS.values() if m.ratio is not None)
        raise RecipeError(
            f"{where}: {name} has no ratio to set per block, so it has no block weights to search; "
            f"choose a method with one: {takes}"
        )
    try:
        spec = MergeSpec(name, blocks=(0.5,), options=dict(options or {}))
        if n_models is not None:
            spec.check_models(n_models)
    except MergeSpecError as err:
        field = "models" if err.field == "method" else err.field
        raise RecipeError(f"{field}: {err.message}") from None
    return method


def app_scorer(app: str, prompts: int = 4, *, seeds: int = 1) -> tuple[list[str], Scorer]:
    """(the merged model's prompts, a scorer) for benchmark app `app`: its first `prompts`
    prompts as its first role gives them (the prompt a merged model takes, as in the bench's
    merge rows), each repeated `seeds` times in the order the search samples them; the score is
    the zoo judge's success rate against each prompt's target scene (the bench's definition)."""
    from multifusion.bench.apps import get_app
    from multifusion.bench.stats import sample_success
    from multifusion.zoo.judge import load_judge

    a = get_app(app)
    app_prompts = a.prompts(prompts)
    texts = [p.prompts[a.roles[0]] for p in app_prompts for _ in range(seeds)]
    targets = [p for p in app_prompts for _ in range(seeds)]
    judge = load_judge()

    def score(images: list, given: list[str]) -> float:
        import numpy as np

        if list(given) != texts:
            raise RecipeError("app_scorer: the images do not follow the prompts it was made with")
        hits = trials = 0
        for image, prompt in zip(images, targets, strict=True):
            views = a.fusions[0].views(prompt) if a.fusions else [None]
            crops = [np.asarray(image.crop(v.box) if v is not None and v.box else image) for v in views]
            readings = judge.read(np.stack(crops))
            h, t = sample_success(a, readings, [v.target if v is not None else prompt.target for v in views])
            hits, trials = hits + h, trials + t
        return hits / max(trials, 1)

    return texts, score


def parse_grid(text: str, where: str = "grid") -> list[float]:
    """Block weight values from a comma-separated string ("0,0.5,1"); RecipeError naming `where`."""
    values = []
    for item in text.split(","):
        try:
            values.append(float(item))
        except ValueError:
            raise RecipeError(
                f"{where}: {clip(item.strip())!r} is not a number; give block weights in [0, 1], comma separated, "
                "e.g. 0,0.25,0.5,0.75,1"
            ) from None
    return values


def _key(blocks: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(float(v), 6) for v in blocks)


def _entry_problem(entry, n_blocks: int, rng=None) -> str | None:
    """What is wrong with a log entry of a search over `n_blocks` blocks whose weights lie in
    `rng` (a registry Range; default [0, 1]) (None when nothing)."""
    if not isinstance(entry, dict) or "blocks" not in entry or "score" not in entry:
        return "not an object with `blocks` and `score`"
    blocks, score = entry["blocks"], entry["score"]
    if not isinstance(blocks, list) or len(blocks) != n_blocks:
        count = len(blocks) if isinstance(blocks, list) else type(blocks).__name__
        return f"{count} block weights for a {n_blocks}-block model"
    if rng is None:
        from multifusion.weights.registry import Range

        rng = Range(0, 1)
    if any(isinstance(v, bool) or rng.problem(v) is not None for v in blocks):
        return f"block weights {clip(str(blocks))} are not all numbers {rng}"
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return f"score {clip(repr(score))} is not a finite number"
    return None


class _Log:
    """The JSONL log: candidate -> score, appended as each is known."""

    def __init__(self, out: Path, settings: SearchSettings, n_blocks: int, rng=None):
        """Read (or start) the log in `out` of a search over `n_blocks` block weights. Everything
        read is checked before anything is written: a settings file or log line that is not this
        search's (damaged, or another search's) is refused, naming the file and line."""
        self.path = out / LOG
        have_path = out / SETTINGS
        for path in (self.path, have_path):  # read as this search's own, and the log appended in place
            if path.is_symlink():
                raise RecipeError(
                    f"--out: {str(path)!r} is a symbolic link; a search reads and appends its own files "
                    "in its folder, never through links: remove the link, or use another --out"
                )
        want = json.loads(json.dumps(asdict(settings)))
        if have_path.is_file():
            try:
                have = json.loads(have_path.read_text())
            except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
                raise RecipeError(
                    f"--out: {str(have_path)!r} is damaged ({type(err).__name__}: {clip(str(err))}); it records "
                    f"the settings of the search logged in that folder: delete it and {LOG} to start again, "
                    "or use another --out"
                ) from None
            if not isinstance(have, dict):
                raise RecipeError(
                    f"--out: {str(have_path)!r} holds a {type(have).__name__}, not a search's settings; "
                    f"delete it and {LOG}, or use another --out"
                )
            # A settings file written before searches took a method searched a weighted sum.
            have = {"merge_method": "weighted_sum", "options": [], **have}
            if have != want:
                diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
                raise RecipeError(
                    f"{out}: a search with other settings ({', '.join(diff)}) is logged there; "
                    "use another folder, or the same settings to resume it"
                )
        self.scores: dict[tuple[float, ...], float] = {}
        self.order: list[tuple[float, ...]] = []
        if self.path.is_file():
            lines = self.path.read_bytes().decode("utf-8", errors="replace").splitlines()
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except (ValueError, RecursionError):
                    if i == len(lines) - 1:
                        continue  # the last line cut by an interruption: that candidate is scored again
                    raise RecipeError(
                        f"--out: {str(self.path)!r} line {i + 1} is not JSON; the log is damaged: delete the "
                        "line (its candidate is scored again), or use another --out"
                    ) from None
                problem = _entry_problem(entry, n_blocks, rng)
                if problem:
                    raise RecipeError(
                        f"--out: {str(self.path)!r} line {i + 1}: {problem}; that line is not of this search "
                        "(scores only compare within one): delete it, or use another --out"
                    )
                self._add(_key(entry["blocks"]), float(entry["score"]))
        if not have_path.is_file():
            write_text(have_path, json.dumps(want, indent=2) + "\n")

    def _add(self, key: tuple[float, ...], score: float) -> None:
        if key not in self.scores:
            self.order.append(key)
        self.scores[key] = score

    def append(self, key: tuple[float, ...], score: float, optimizer: str, seconds: float) -> None:
        with open(self.path, "a") as f:
            f.write(
                json.dumps({"blocks": list(key), "score": score, "optimizer": optimizer, "seconds": round(seconds, 3)}) + "\n"
            )
        self._add(key, score)


def search_block_weights(
    models: Sequence[str],
    prompts: Sequence[str],
    scorer: Scorer,
    out: str | Path,
    *,
    optimizer: str = "coordinate",
    budget: int = 30,
    grid: Sequence[float] = GRID,
    start: float = 0.5,
    seeds: int = 1,
    num_inference_steps: int = 10,
    scheduler: str = "ddim",
    guidance_scale: float = 7.5,
    seed: int = 0,
    scorer_name: str = "custom",
    merge_method: str = "weighted_sum",
    options: dict | None = None,
    runtime: dict | None = None,
    progress: bool = True,
) -> SearchResult:
    """Search the block weights of merging `models` by `merge_method` (any registered method
    with a ratio; weighted_sum: A, B, (1 - w) A + w B per block; its other hyper-parameters in
    `options`) that maximise `scorer(images, prompts)` on images of `prompts` (each sampled
    `seeds` times, image i with seed `seed + i`), spending at most `budget` evaluations (logged
    ones included). The grid must lie in the range of the method's ratio. See the module
    docstring for the optimisers, the log and the outputs."""
    if optimizer not in OPTIMIZERS:
        raise RecipeError(
            f"optimizer: unknown {optimizer!r} (known: {', '.join(OPTIMIZERS)}){did_you_mean(optimizer, OPTIMIZERS)}"
        )
    if not isinstance(budget, int) or budget < 1:
        raise RecipeError(f"budget: must be a positive integer, got {budget!r}")
    method = search_method(merge_method, options, len(models))
    rng = method.ratio_range()
    grid = sorted({float(v) for v in grid})
    if not grid or any(rng.problem(v) is not None for v in grid):
        raise RecipeError(f"grid: block weights of {merge_method} ({method.ratio}) must lie {rng}, got {grid}")
    if rng.problem(start) is not None:
        raise RecipeError(f"start: must lie {rng}, got {start!r}")
    settings = SearchSettings(
        tuple(models),
        tuple(prompts),
        seeds,
        num_inference_steps,
        scheduler,
        guidance_scale,
        seed,
        scorer_name,
        merge_method,
        tuple(sorted((options or {}).items())),
    )
    if optimizer == "optuna":
        _require_optuna()

    from tqdm.auto import tqdm

    from multifusion.api import Run
    from multifusion.loading import load_models
    from multifusion.weights.models import local_layout

    layout = local_layout(models[0])
    if layout is None:
        raise RecipeError(f"models[0]: {models[0]!r} is not a local diffusers folder or zoo model; a search merges local folders")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = _Log(out, settings, len(layout.ids), rng)
    handles = load_models(
        list(models), dtype=(runtime or {}).get("dtype", "float32"), device=(runtime or {}).get("device", "cpu")
    )
    texts = [p for p in prompts for _ in range(seeds)]
    base = {
        "method": "mbw",
        "models": [{"model": m, "prompt": texts} for m in models],
        "sampling": {
            "num_inference_steps": num_inference_steps,
            "scheduler": scheduler,
            "guidance_scale": guidance_scale,
            "seed": seed,
            "num_images": len(texts),
        },
        "runtime": dict(runtime or {}),
    }
    bar = tqdm(total=budget, desc=f"mbw search ({optimizer})", disable=not progress)
    state = {"calls": 0, "computed": 0}

    def evaluate(blocks: Sequence[float]) -> float:
        key = _key(blocks)
        state["calls"] += 1
        if key not in log.scores:
            started = time.perf_counter()
            params = {"blocks": list(key), "merge_method": merge_method, **dict(settings.options)}
            run = Run({**base, "params": params}, models=handles)
            images = [im for part in run.batches(batch_size=len(texts), progress=False) for im in part.images]
            score = float(scorer(images, list(texts)))
            if not math.isfinite(score):
                raise RecipeError(f"scorer returned {score!r} for blocks {list(key)}; it must return a finite number")
            log.append(key, score, optimizer, time.perf_counter() - started)
            state["computed"] += 1
        bar.update(1)
        bar.set_postfix(best=f"{max(log.scores.values()):.3f}")
        return log.scores[key]

    try:
        n = len(layout.ids)
        if optimizer == "coordinate":
            _coordinate(evaluate, n, grid, start, budget)
        else:
            bar.update(min(len(log.order), budget))  # the logged candidates warm-start the study
            _optuna(evaluate, log, n, grid, budget, seed)
    finally:
        bar.close()
    best = max(log.order, key=lambda k: log.scores[k])
    write_text(
        out / BEST,
        json.dumps(
            {
                "blocks": list(best),
                "score": log.scores[best],
                "blocks_ids": list(layout.ids),
                "mbw_params": {
                    "blocks": ",".join(f"{v:g}" for v in best),
                    "merge_method": merge_method,
                    **dict(settings.options),
                },
            },
            indent=2,
        )
        + "\n",
    )
    plot = plot_progress([log.scores[k] for k in log.order], out / PLOT, title=f"mbw search: best {log.scores[best]:.3f}")
    return SearchResult(best, log.scores[best], len(log.order), state["computed"], log.path, plot)


def _coordinate(evaluate: Callable[[Sequence[float]], float], n: int, grid: Sequence[float], start: float, budget: int) -> None:
    """auto-MBW's linear walk: M00 first, then the IN and OUT blocks in order; every grid value
    of one block with the others held, keep the best; passes until one changes nothing."""
    calls = 0
    current = [float(start)] * n
    best = evaluate(current)
    calls += 1
    order = [n // 2] + [b for b in range(n) if b != n // 2]  # ids are IN.., M00, OUT..: M00 is the middle
    while calls < budget:
        improved = False
        for b in order:
            for v in grid:
                if v == current[b] or calls >= budget:
                    continue
                candidate = current[:b] + [v] + current[b + 1 :]
                score = evaluate(candidate)
                calls += 1
                if score > best:  # strictly better: ties keep the earlier candidate
                    best, current, improved = score, candidate, True
        if not improved:
            return


def _require_optuna():
    try:
        import optuna
    except ImportError:
        raise RecipeError(
            "optimizer 'optuna' needs the optuna package: pip install 'multifusion[search]' (or use --optimizer coordinate)"
        ) from None
    return optuna


def _optuna(
    evaluate: Callable[[Sequence[float]], float], log: _Log, n: int, grid: Sequence[float], budget: int, seed: int
) -> None:
    """Optuna's TPE on the grid, warm-started with every logged candidate on the grid."""
    optuna = _require_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    grid = list(grid)
    distributions = {f"b{i:02d}": optuna.distributions.CategoricalDistribution(grid) for i in range(n)}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    for key in log.order:
        if len(key) == n and all(v in grid for v in key):
            params = {f"b{i:02d}": v for i, v in enumerate(key)}
            study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=log.scores[key]))
    remaining = budget - len(log.order)
    if remaining > 0:
        study.optimize(
            lambda trial: evaluate([trial.suggest_categorical(f"b{i:02d}", grid) for i in range(n)]), n_trials=remaining
        )


def plot_progress(scores: Sequence[float], path: str | Path, *, title: str = "") -> Path:
    """A PNG of the best score so far (line) and each evaluation's score (dots) over the
    evaluations, drawn with PIL (no plotting library needed)."""
    from PIL import Image, ImageDraw

    W, H, L, R, T, B = 480, 300, 48, 12, 24, 32
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    lo, hi = (min(scores), max(scores)) if scores else (0.0, 1.0)
    lo, hi = (lo - 0.5, hi + 0.5) if hi == lo else (lo, hi)
    n = max(len(scores) - 1, 1)

    def xy(i: int, s: float) -> tuple[float, float]:
        return L + (W - L - R) * i / n, H - B - (H - T - B) * (s - lo) / (hi - lo)

    d.rectangle([L, T, W - R, H - B], outline="black")
    for s in (lo, (lo + hi) / 2, hi):
        d.text((4, xy(0, s)[1] - 6), f"{s:.3g}", fill="black")
    d.text((L, H - B + 6), "1", fill="black")
    d.text((W - R - 24, H - B + 6), str(len(scores)), fill="black")
    d.text(((W - 80) // 2, H - 14), "evaluation", fill="black")
    d.text((L, 6), title or "best score over evaluations", fill="black")
    best, line = -math.inf, []
    for i, s in enumerate(scores):
        best = max(best, s)
        line.append(xy(i, best))
        x, y = xy(i, s)
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(150, 150, 150))
    if len(line) > 1:
        d.line(line, fill=(200, 30, 30), width=2)
    path = Path(path)
    with atomic_path(path) as tmp:  # never through a link planted at `path`
        img.save(tmp, format="PNG")
    return path
