"""Command line: a thin layer over the Python API (no maths here).

multifusion generate RECIPE.yaml --out DIR       one PNG per image, recipe + seed inside
multifusion generate --from-image IMG.png --out DIR
multifusion validate RECIPE.yaml                 check a recipe without loading models
multifusion methods                              list the methods
multifusion demo --out DIR                       the main job on the built-in models
multifusion zoo list | train | train-lora | decoder | judge | evaluate  the embedded ShapeWorld models: list, retrain, score
multifusion bench APP|all --out DIR              every method side by side on the zoo apps
multifusion merge RECIPE.yaml --out DIR          write a merge/mbw recipe's merged model
multifusion merge --base MODEL --lora FILE --out DIR   a LoRA merged into a checkpoint (block weights)
multifusion extract-lora BASE TUNED --out F.safetensors --rank R   a fine-tune's difference as a LoRA
multifusion mbw-search APP --out DIR             search block weights against the zoo judge
multifusion afa train MODEL... --data D --out DIR  train AFA's feature aggregators
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from multifusion.errors import MultifusionError, RecipeError

ALIASES = {"num_inference_steps": "--steps", "guidance_scale": "--cfg"}
"""Short flags users know (A1111, diffusers' examples), beside the field's own flag."""

HELP = {
    "sampling.guidance_scale": "sampling.guidance_scale (default of every model)",
    "sampling.seed": "sampling.seed: image i uses seed + i",
    "sampling.scheduler": "sampling.scheduler: ddim, euler, euler_a, dpm++, pndm, lms, heun, unipc, ... or a diffusers class name",
    "sampling.eta": "sampling.eta (DDIM-type schedulers)",
    "sampling.height": "sampling.height in pixels (multiple of the VAE factor)",
    "sampling.width": "sampling.width in pixels (multiple of the VAE factor)",
    "runtime.device": "runtime.device: cpu, cuda, cuda:N, mps",
    "runtime.dtype": "runtime.dtype of the weights",
    "runtime.offload": "runtime.offload: keep only the model in use on the device",
    "runtime.vae_device": "runtime.vae_device: run the VAE here (cpu: in float32), sparing accelerator memory on large canvases",
    "runtime.allow_pickle": "runtime.allow_pickle: allow .ckpt/.bin/.pt checkpoints (they can run code: trusted files only)",
}
"""Help of the flags whose field's description is not what a command line needs; any other flag
says `section.field: description`."""


def _override_sections():
    """(recipe section, its pydantic model, the flags' group title)."""
    from multifusion.recipe import Runtime, Sampling

    return (("sampling", Sampling, "overrides (take precedence over the recipe)"), ("runtime", Runtime, "runtime"))


def _add_sampling_overrides(p: argparse.ArgumentParser) -> None:
    """One flag per field of `Sampling` and `Runtime`: `--field-name` (and its alias), typed from
    the field as the web UI's widgets are (`ui.forms.widget_for`: a number, a choice of a
    Literal's values, a switch for a bool, else text), so a field added to either model is a flag
    with no code here. Values are checked by the recipe, which names the field."""
    from multifusion.ui.forms import widget_for

    for section, model, title in _override_sections():
        group = p.add_argument_group(title)
        for name, info in model.model_fields.items():
            w = widget_for(name, info)
            flags = [ALIASES[name]] if name in ALIASES else []
            flags.append("--" + name.replace("_", "-"))
            where = f"{section}.{name}"
            said = HELP.get(where) or (f"{where}: {w.description}" if w.description else where)
            kwargs: dict = {"dest": where, "help": said.replace("%", "%%")}  # argparse formats help with %
            if w.kind == "bool":  # unset (None) keeps the recipe's value
                kwargs.update(action="store_true" if w.default is False else argparse.BooleanOptionalAction, default=None)
            elif w.kind == "choice":
                kwargs["choices"] = list(w.choices)
            elif w.kind in ("int", "float", "text"):
                kwargs.update(type={"int": int, "float": float, "text": str}[w.kind], metavar=name.upper())
            else:
                raise TypeError(f"{where}: a {w.kind} field has no command-line form; give the CLI one for it")
            group.add_argument(*flags, **kwargs)


def _apply_overrides(data: dict, args: argparse.Namespace) -> dict:
    data = json.loads(json.dumps(data))
    for section, model, _ in _override_sections():
        values = data.setdefault(section, {})
        for name in model.model_fields:
            v = getattr(args, f"{section}.{name}")
            if v is not None:
                values[name] = v
    return data


def _read_recipe_dict(path: str) -> dict:
    from multifusion.recipe import parse_recipe

    return json.loads(parse_recipe(path).model_dump_json(exclude_none=True))


def _recipe_from_image(path: str) -> dict:
    from multifusion.provenance import recipe_from_image

    try:
        data, ignored = recipe_from_image(path)
    except RecipeError as err:
        raise RecipeError(f"--from-image: {err}") from None
    if ignored:
        print(
            f"note: --from-image ignores the image's runtime settings ({', '.join(ignored)[:200]}); give --device, "
            "--dtype, --allow-pickle ... yourself if you want them",
            file=sys.stderr,
        )
    return data


def _positive(flag: str, value: int | None) -> None:
    """A count option (--threads, --seeds, ...) must be a positive integer: checked before any work."""
    if value is not None and value < 1:
        raise RecipeError(f"{flag}: must be a positive integer, got {value}")


def _set_threads(threads: int) -> None:
    import torch

    _positive("--threads", threads)
    torch.set_num_threads(threads)


def _check_out(out: str) -> None:
    """--out must be (or be creatable as) a writable folder: checked before any work starts."""
    from multifusion.io import check_output_dir

    check_output_dir("--out", out)


def cmd_generate(args: argparse.Namespace) -> int:
    from multifusion.api import check_stem, generate_to_folder

    if (args.recipe is None) == (args.from_image is None):
        raise RecipeError("give a RECIPE file or --from-image IMG.png (one of them)")
    if args.batch_size <= 0:
        raise RecipeError(f"--batch-size: must be a positive integer, got {args.batch_size}")
    if args.name is not None:
        check_stem(args.name, "--name")
    data = _recipe_from_image(args.from_image) if args.from_image else _read_recipe_dict(args.recipe)
    data = _apply_overrides(data, args)
    if args.from_image and not args.yes:
        _confirm_work(data)
    stem = args.name or (Path(args.recipe).stem if args.recipe else Path(args.from_image).stem.rsplit("-s", 1)[0])
    written = generate_to_folder(
        data,
        args.out,
        stem=stem,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        export_masks=args.export_masks,
    )
    for p in written:
        print(p)
    return 0


def _confirm_work(data: dict) -> None:
    """An image received from elsewhere must not start far more work than a recipe's defaults
    unnoticed (4096 images, a 4096 px canvas for a 64 px model): refused, naming the fields,
    unless --yes (or the matching flag, e.g. --num-images, brings it back within bounds)."""
    from multifusion.recipe import parse_recipe
    from multifusion.validate import costly_fields

    costly = costly_fields(parse_recipe(data))
    if costly:
        raise RecipeError(
            f"--from-image: the image's recipe asks for {'; '.join(costly)}: far more work than a recipe's "
            "defaults. Pass --yes to run it as it is, or lower those settings with their flags "
            "(--num-images, --steps, --height, --width)"
        )


def cmd_validate(args: argparse.Namespace) -> int:
    from multifusion.recipe import parse_recipe
    from multifusion.validate import validate_recipe

    recipe, params = validate_recipe(parse_recipe(_apply_overrides(_read_recipe_dict(args.recipe), args)))
    print(f"ok: method {recipe.method!r}, {len(recipe.models)} model(s), {recipe.sampling.num_images} image(s)")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from multifusion.registry import METHODS

    for m in METHODS.values():
        params = ", ".join(m.params.model_fields) or "-"
        count = f"{m.min_models}" if m.min_models == m.max_models else f"{m.min_models}+"
        print(f"{m.name:10s} meets at {m.meets:8s} models: {count:3s} params: {params}\n           {m.summary}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from multifusion.demo import run_demo

    _check_out(args.out)
    report = run_demo(args.out, progress=not args.no_progress, tiny=args.tiny)
    print(f"wrote {report}")
    return 0


def cmd_zoo_list(args: argparse.Namespace) -> int:
    from multifusion.loading import zoo_models, zoo_root

    names = zoo_models()
    if not names:
        print("no zoo models are installed in this build (train them with `multifusion zoo train --out DIR`)")
    for name in names:
        size = sum(f.stat().st_size for f in (zoo_root() / name).rglob("*") if f.is_file())
        print(f"zoo:{name:12s} {size / 1e6:6.2f} MB")
    from multifusion.lora import zoo_lora_root, zoo_loras

    for name in zoo_loras():
        print(f"zoo:{name:12s} {(zoo_lora_root() / f'{name}.safetensors').stat().st_size / 1e6:6.2f} MB  LoRA (models[i].loras)")
    return 0


def cmd_zoo_train(args: argparse.Namespace) -> int:
    from multifusion.zoo.train import install, train_zoo
    from multifusion.zoo.train_judge import install_judge, record_accuracy, train_judge

    _positive("--threads", args.threads)
    _positive("--steps", args.steps)
    _check_out(args.out)
    models = args.models.split(",") if args.models else None
    train_zoo(
        args.out,
        models=models,
        steps=args.steps,
        seed=args.seed,
        progress=not args.no_progress,
        threads=args.threads,
        from_shipped=args.from_shipped,
        rebase=args.rebase,
    )
    if models is None and not args.from_shipped:  # everything: the judge too (it reads renders, not the models)
        judge_dir = Path(args.out) / "judge"
        train_judge(judge_dir, seed=args.seed, progress=not args.no_progress)
        record_accuracy(judge_dir / "judge.safetensors")
    if args.install:
        names = install(args.out, models)
        if models is None:
            install_judge(Path(args.out) / "judge" / "judge.safetensors")
            names.append("judge")
        print("installed: " + ", ".join(names))
    return 0


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """The seed, thread and progress options every zoo training command shares."""
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for this process (default 1)")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")


def cmd_zoo_train_lora(args: argparse.Namespace) -> int:
    from multifusion.zoo.loras import install_loras, train_loras

    _positive("--threads", args.threads)
    _positive("--steps", args.steps)
    _check_out(args.out)
    names = args.loras.split(",") if args.loras else None
    for summary in train_loras(
        args.out, names, steps=args.steps, seed=args.seed, progress=not args.no_progress, threads=args.threads
    ):
        print(f"{summary['model']}: {summary['steps']} steps, {summary['minutes']} min, final loss {summary['final_loss']}")
    if args.install:
        print("installed: " + ", ".join(install_loras(args.out, names)))
    return 0


def cmd_zoo_decoder(args: argparse.Namespace) -> int:
    from multifusion.zoo.train import TrainConfig, install_vae, train_shipped_decoder

    _positive("--threads", args.threads)
    _positive("--steps", args.steps)
    _check_out(args.out)
    config = TrainConfig() if args.steps is None else TrainConfig(decoder_steps=args.steps)
    info = train_shipped_decoder(args.out, config, seed=args.seed, progress=not args.no_progress, threads=args.threads)
    print(f"decoder: {info['decoder_steps']} steps, {info['decoder_minutes_this_run']} min, PSNR {info['vae_psnr_db']} dB")
    for d, (before, after) in info["psnr_db_before_after"].items():
        print(f"  {d:8s} {before:6.2f} -> {after:6.2f} dB")
    if args.install:
        print("installed into: " + ", ".join(install_vae(args.out)))
    return 0


def cmd_zoo_judge(args: argparse.Namespace) -> int:
    from multifusion.zoo.judge import DEFAULT_WEIGHTS
    from multifusion.zoo.train_judge import format_table, install_judge, record_accuracy, train_judge

    _set_threads(args.threads)
    _positive("--eval-n", args.eval_n)
    _positive("--steps", args.steps)
    if args.until is not None and args.until < 0:
        raise RecipeError(f"--until: must be 0 or more steps, got {args.until}")
    if args.evaluate:
        print(
            format_table(
                record_accuracy(Path(args.weights) if args.weights else DEFAULT_WEIGHTS, args.eval_n, not args.no_progress)
            )
        )
        return 0
    train_judge(args.out, steps=args.steps, seed=args.seed, progress=not args.no_progress, until=args.until)
    if args.until is not None and args.until < args.steps:
        print(f"stopped at step {args.until} of {args.steps}; run the same command without --until to finish")
        return 0
    weights = Path(args.out) / "judge.safetensors"
    print(format_table(record_accuracy(weights, args.eval_n, not args.no_progress)))
    if args.install:
        print(f"installed {install_judge(weights)}")
    return 0


def cmd_zoo_evaluate(args: argparse.Namespace) -> int:
    from multifusion.zoo.evaluate import draw_training_figures, evaluate_zoo, format_table

    if args.run and not args.out:
        raise MultifusionError("--run draws the loss curves into --out: give --out too")
    models = args.models.split(",") if args.models else None
    rows = evaluate_zoo(
        models, args.n, args.seed, guidance_scale=args.guidance_scale, out=args.out, progress=not args.no_progress
    )
    print(format_table(rows))
    if args.out:
        psnr = draw_training_figures(args.out, run=args.run, vae_of=(models or ["general"])[0])
        print(f"wrote {args.out}; VAE reconstruction PSNR on held-out renders: {psnr:.2f} dB")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    models = {}
    for item in args.model or []:
        role, sep, ref = item.partition("=")
        if not sep or not role or not ref:
            raise RecipeError(f"--model {item!r}: give ROLE=MODEL, e.g. --model general=./my-general")
        models[role] = ref
    if args.app == "real":
        from multifusion.bench.realworld import run_realworld

        if not args.recipe or not args.prompt_file:
            raise RecipeError("bench real needs --recipe RECIPE and --prompt-file FILE")
        result = run_realworld(
            args.recipe,
            args.prompt_file,
            args.out,
            seeds=1 if args.seeds is None else args.seeds,
            clip_model=args.clip_model,
            inception_weights=args.inception_weights,
            reference_dir=args.reference,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
        print(json.dumps(result["metrics"], indent=2))
        return 0
    from multifusion.bench.run import run_bench

    results = run_bench(
        args.app.split(","),
        args.out,
        seeds=64 if args.seeds is None else args.seeds,
        prompts=args.prompts,
        num_inference_steps=args.num_inference_steps,
        scheduler=args.scheduler,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        models=models or None,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        progress=not args.no_progress,
        update_doc=args.update_doc,
        rows=args.rows.split(",") if args.rows else None,
    )
    if results is not None:  # None on the other processes of a sharded run
        print(
            f"wrote {Path(args.out) / 'results.md'} ({results['samples']['computed']} images made, "
            f"{results['samples']['reused']} reused, {results['wall_time_s']:.0f} s)"
        )
    return 0


def cmd_afa_train(args: argparse.Namespace) -> int:
    from multifusion.features.train import AFATrainConfig, check_run, train_afa
    from multifusion.loading import load_models

    _set_threads(args.threads)
    _check_out(args.out)
    # Options, data and the run folder are checked before the models load (minutes, for large ones).
    config = AFATrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        width=args.width,
        layers=args.layers,
        seed=args.seed,
        dataset_size=args.dataset_size,
        checkpoint_every=args.checkpoint_every,
    )
    check_run(args.data, args.out, config)
    handles = load_models(args.models, allow_pickle=args.allow_pickle)
    summary = train_afa(handles, args.data, args.out, config, progress=not args.no_progress)
    if "heldout" in summary:
        print(
            f"trained {summary['steps']} steps; final loss {summary['final_loss']}; aggregators in {Path(args.out) / 'aggregator'}"
        )
    else:
        print(f"stopped at step {summary['steps']} of {args.steps}: run the same command again to continue")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from multifusion.weights.export import merge

    _check_out(args.out)
    folder = merge(
        args.recipe,
        args.out,
        single_file=args.single_file,
        overwrite=args.overwrite,
        base=args.base,
        lora=args.lora,
        lora_scale=args.scale,
        lora_blocks=args.lora_blocks,
    )
    print(folder)
    if args.single_file:
        print(folder.with_name(folder.name + ".safetensors"))
    return 0


def cmd_extract_lora(args: argparse.Namespace) -> int:
    from multifusion.weights.lora import extract_lora

    out = extract_lora(
        args.base,
        args.tuned,
        args.out,
        rank=args.rank,
        text_encoder=args.text_encoder,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    print(out)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    try:
        from multifusion.ui.app import launch
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in ("gradio", "pandas"):
            raise MultifusionError(f'the web UI needs the ui extra ({err.name} is missing): pip install -e ".[ui]"') from None
        raise
    launch(args.models or [], port=args.port, host=args.host)
    return 0


def _options(flag: str, items: list[str]) -> dict:
    """NAME=VALUE pairs as numbers (int when whole), RecipeError naming `flag` otherwise."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not name.strip() or number is None:
            raise RecipeError(f"{flag} {item!r}: give NAME=NUMBER, e.g. density=0.5")
        out[name.strip()] = int(number) if number.is_integer() and "." not in value else number
    return out


def cmd_mbw_search(args: argparse.Namespace) -> int:
    from multifusion.bench.apps import get_app
    from multifusion.weights.search import app_scorer, parse_grid, search_block_weights, search_method

    _set_threads(args.threads)
    options = _options("--option", args.option or [])
    method = search_method(args.merge_method, options, where="--method")
    n = method.block_models or method.min_models
    for flag, value in (
        ("--budget", args.budget),
        ("--prompts", args.prompts),
        ("--seeds", args.seeds),
        ("--steps", args.num_inference_steps),
    ):
        _positive(flag, value)
    grid = {"grid": parse_grid(args.grid, "--grid")} if args.grid else {}
    _check_out(args.out)
    app = get_app(args.app)
    refs = {r: f"zoo:{r}" for r in app.roles}
    for item in args.model or []:
        role, sep, ref = item.partition("=")
        if not sep or role not in refs:
            raise RecipeError(f"--model {item!r}: give ROLE=MODEL with ROLE one of {', '.join(app.roles)}")
        refs[role] = ref
    if len(app.roles) < n:
        has = "one model" if len(app.roles) == 1 else f"{len(app.roles)} models"
        raise RecipeError(
            f"app {app.id!r} has {has} ({', '.join(app.roles)}); a block-weight search "
            f"{'' if args.merge_method == 'weighted_sum' else f'by {args.merge_method} '}merges {'two' if n == 2 else n}"
        )
    prompts, scorer = app_scorer(app.id, args.prompts, seeds=args.seeds)
    result = search_block_weights(
        [refs[r] for r in app.roles[:n]],
        prompts[:: args.seeds],
        scorer,
        args.out,
        optimizer=args.optimizer,
        budget=args.budget,
        seeds=args.seeds,
        num_inference_steps=args.num_inference_steps,
        scorer_name=f"zoo judge: {app.id} success on {args.prompts} prompts",
        merge_method=args.merge_method,
        options=options,
        progress=not args.no_progress,
        **grid,
    )
    print(
        f"best {result.score:.3f} after {result.evaluations} evaluations ({result.computed} new): "
        f"blocks {','.join(f'{v:g}' for v in result.blocks)}"
    )
    print(result.log)
    print(result.plot)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multifusion",
        description="Combine several text-to-image diffusion models (diffusers) at sampling time.",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="run `multifusion COMMAND --help` for its options"
    )

    g = sub.add_parser(
        "generate",
        help="run a recipe and write one PNG per image",
        description="Run a recipe (YAML or JSON) and write one PNG per image into --out. Each PNG "
        "holds the full recipe and its seed, so --from-image regenerates it. Images already in "
        "--out from the same recipe are kept (an interrupted run resumes).",
    )
    g.add_argument("recipe", nargs="?", help="recipe file (.yaml, .yml or .json)")
    g.add_argument(
        "--from-image",
        dest="from_image",
        help="regenerate from the metadata of a PNG written by multifusion "
        "(its models, prompts, method, params and sampling; never its runtime settings: give --allow-pickle, "
        "--device ... yourself)",
    )
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--name", help="file name stem of the images (default: the recipe file's stem)")
    g.add_argument(
        "--batch-size", dest="batch_size", type=int, default=4, help="images per batch (default 4); results do not depend on it"
    )
    g.add_argument("--overwrite", action="store_true", help="replace images of a different recipe under the same names")
    g.add_argument(
        "--yes",
        action="store_true",
        help="with --from-image: run the image's recipe even when it asks for far more "
        "work than a recipe's defaults (more than 16 images or 150 steps, a canvas over 4x the model's native area)",
    )
    g.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--export-masks",
        dest="export_masks",
        action="store_true",
        help="also write each image's step pictures, for methods that make them: SNB's blend masks and salience maps "
        "(PNG strip + GIF), AMDM's meetings (the clean image before and after each aggregation, PNG strip), AFA's "
        "aggregation maps, Mixture of Diffusers' region weights (each region's normalised weight over the canvas)",
    )
    _add_sampling_overrides(g)
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser(
        "validate",
        help="check a recipe without loading any model",
        description="Validate a recipe: fields, method, parameters, model references, sizes.",
    )
    v.add_argument("recipe", help="recipe file (.yaml, .yml or .json)")
    _add_sampling_overrides(v)
    v.set_defaults(func=cmd_validate)

    m = sub.add_parser("methods", help="list the methods and their parameters", description="List the methods.")
    m.set_defaults(func=cmd_methods)

    d = sub.add_parser(
        "demo",
        help="the main job: every method on the built-in models, with a report",
        description="Run each available method on fixed prompts and seeds; write images, a labelled "
        "comparison grid and report.md / report.json into --out.",
    )
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    d.add_argument(
        "--tiny", action="store_true", help="use tiny random test models even when the zoo is installed (a quick smoke run)"
    )
    d.set_defaults(func=cmd_demo)

    z = sub.add_parser(
        "zoo",
        help="the embedded ShapeWorld models: list, retrain or score them",
        description="The embedded ShapeWorld zoo: small models trained and shipped by the project.",
    )
    zsub = z.add_subparsers(
        dest="zoo_command", required=True, metavar="ZOO_COMMAND", help="list, train, train-lora, decoder, judge or evaluate"
    )
    zl = zsub.add_parser(
        "list", help="list the installed zoo models", description="List the installed zoo models and their sizes."
    )
    zl.set_defaults(func=cmd_zoo_list)
    zt = zsub.add_parser(
        "train",
        help="retrain the zoo from scratch (deterministic, resumable)",
        description="Retrain the zoo from scratch into --out: the shared VAE, every UNet and (without --models) "
        "the judge; deterministic for a seed and thread count; an interrupted run resumes from its "
        "checkpoints. Takes hours on 2 CPU cores (docs/zoo-training.md).",
    )
    zt.add_argument("--out", required=True, help="run folder (checkpoints, caches, logs)")
    zt.add_argument("--models", help="comma-separated model names (default: all)")
    zt.add_argument("--steps", type=int, help="training steps per model (default: each model's own)")
    _add_run_args(zt)
    zt.add_argument(
        "--from-shipped",
        dest="from_shipped",
        action="store_true",
        help="continue the shipped models: each starts from its own shipped weights and trains --steps more "
        "(fresh optimizer and warm-up; no VAE or judge training)",
    )
    zt.add_argument(
        "--rebase",
        action="store_true",
        help="start the fine-tunes given in --models from their parent's shipped weights (the installed general) "
        "instead of a run-folder snapshot: how they follow a continued general",
    )
    zt.add_argument(
        "--install", action="store_true", help="copy the trained models (fp16) and judge into the package weights folder"
    )
    zt.set_defaults(func=cmd_zoo_train)
    zr = zsub.add_parser(
        "train-lora",
        help="train the zoo's LoRAs on the shipped general (deterministic, resumable)",
        description="Train the zoo's LoRAs (rank 8, on the shipped general, through the zoo's training loop) into "
        "--out; an interrupted run resumes from its checkpoints (docs/zoo-training.md).",
    )
    zr.add_argument("--out", required=True, help="run folder (checkpoints, caches, logs)")
    zr.add_argument("--loras", help="comma-separated LoRA names (default: all: texture, striped, dotted, cartoon)")
    zr.add_argument("--steps", type=int, help="training steps per LoRA (default: each LoRA's own)")
    _add_run_args(zr)
    zr.add_argument("--install", action="store_true", help="copy the trained LoRAs (fp16) into the package weights folder")
    zr.set_defaults(func=cmd_zoo_train_lora)
    zd = zsub.add_parser(
        "decoder",
        help="train the shipped VAE's decoder further, encoder frozen (no UNet retrain needed)",
        description="Train the decoder of the zoo's shared VAE further into --out, its encoder frozen, so every "
        "UNet's latents stay valid; with --install, write it into every zoo model (docs/zoo-training.md).",
    )
    zd.add_argument("--out", required=True, help="run folder (checkpoints, logs, the trained VAE)")
    zd.add_argument("--steps", type=int, help="decoder training steps (default 3000)")
    _add_run_args(zd)
    zd.add_argument("--install", action="store_true", help="write the VAE (fp16) into every zoo model of the package")
    zd.set_defaults(func=cmd_zoo_decoder)
    zj = zsub.add_parser(
        "judge",
        help="train the judge alone (deterministic, resumable), or --evaluate one",
        description="Train the ShapeWorld judge from scratch into --out (an interrupted run resumes from its "
        "checkpoint; deterministic for a seed and thread count), then measure its accuracy on "
        "held-out renders and record it in its judge.json. --evaluate only measures existing weights.",
    )
    zj.add_argument("--out", default="runs/judge", help="run folder (checkpoint, render cache, loss log; default runs/judge)")
    zj.add_argument("--steps", type=int, default=2000, help="training steps (default 2000, the shipped judge's)")
    zj.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    zj.add_argument(
        "--until", type=int, help="stop this invocation after this many steps (run the same command again to continue)"
    )
    zj.add_argument("--threads", type=int, default=1, help="torch threads (default 1, how the shipped judge was trained)")
    zj.add_argument("--eval-n", dest="eval_n", type=int, default=2000, help="held-out renders per evaluation set (default 2000)")
    zj.add_argument("--install", action="store_true", help="copy the trained judge (fp16) into the package weights folder")
    zj.add_argument(
        "--evaluate", action="store_true", help="train nothing: measure --weights and record the accuracy in its .json"
    )
    zj.add_argument("--weights", help="judge weights that --evaluate measures (default: the installed judge)")
    zj.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    zj.set_defaults(func=cmd_zoo_judge)
    ze = zsub.add_parser(
        "evaluate",
        help="score zoo models with the judge: the tables and figures of docs/zoo-training.md",
        description="Sample one image per held-out caption (--n per row, DDIM 30 steps) for each model on its "
        "own prompts and on another model's, read them with the judge and print the table; the "
        "renders of the same captions give the judge's ceiling. With --out, also write "
        "zoo-eval.json, zoo-eval.md, sample grids and the VAE's reconstructions there.",
    )
    ze.add_argument("--models", help="comma-separated zoo models (default: every installed one)")
    ze.add_argument("--n", type=int, default=32, help="held-out captions per row (default 32)")
    ze.add_argument("--seed", type=int, default=0, help="evaluation seed (default 0)")
    ze.add_argument("--cfg", dest="guidance_scale", type=float, default=7.5, help="guidance scale (default 7.5)")
    ze.add_argument("--out", help="folder for zoo-eval.json/.md, the sample grids, zoo-vae.png (and zoo-loss.png)")
    ze.add_argument("--run", help="zoo training run folder (of `multifusion zoo train --out`): also draw its loss curves")
    ze.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    ze.set_defaults(func=cmd_zoo_evaluate)

    a = sub.add_parser(
        "afa",
        help="AFA: train the feature aggregators of an ensemble of same-architecture models",
        description="Adaptive Feature Aggregation (features/): train the aggregators a recipe's `afa` method loads.",
    )
    asub = a.add_subparsers(dest="afa_command", required=True, metavar="AFA_COMMAND", help="train")
    at = asub.add_parser(
        "train",
        help="train aggregators over MODELs (frozen); resumable",
        description="Train AFA aggregators over the MODELs, in this order (the recipe must list them in the "
        "same order). Checkpoints in --out; run the same command again to resume. Writes "
        "--out/aggregator (use as `params: {aggregator: DIR}`), loss.csv, loss.png, afa.json (settings and held-out eps-MSE).",
    )
    at.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="model folders, Hub ids, single files or zoo:NAME (>= 2, one UNet configuration)",
    )
    at.add_argument(
        "--data",
        required=True,
        help="shapeworld:NAME (zoo renders), a JSONL of {file_name, text} rows, or a folder with metadata.jsonl",
    )
    at.add_argument("--out", required=True, help="run folder (checkpoints, logs, the trained aggregators)")
    at.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    at.add_argument("--batch-size", dest="batch_size", type=int, default=16, help="batch size (default 16)")
    at.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate after 100 warm-up steps (default 1e-4)")
    at.add_argument("--width", type=int, help="aggregator width d (default: the largest keeping them within ~6%% of one UNet)")
    at.add_argument(
        "--layers",
        type=int,
        default=1,
        help="transformer layers per aggregator (default 1; the authors' released code builds 2 for SD-1.5)",
    )
    at.add_argument(
        "--dataset-size", dest="dataset_size", type=int, default=4000, help="renders for shapeworld:NAME (default 4000)"
    )
    at.add_argument(
        "--checkpoint-every", dest="checkpoint_every", type=int, default=100, help="steps between checkpoints (default 100)"
    )
    at.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    at.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    at.add_argument(
        "--allow-pickle", dest="allow_pickle", action="store_true", help="allow .ckpt/.bin checkpoints (trusted files only)"
    )
    at.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    at.set_defaults(func=cmd_afa_train)

    b = sub.add_parser(
        "bench",
        help="benchmark: every method side by side on the zoo apps, with success rates",
        description="Run every method that applies to an app (each model alone, the weighted average, each "
        "fusion method) on the same ShapeWorld prompts and seeds, judge each image, and write results.json, "
        "results.csv, results.md and grid.png into --out. Resumable (run the same command again); shardable "
        "with `accelerate launch --multi_gpu --num_processes K -m multifusion.cli bench ...` (also on CPU-only "
        "machines, where the processes meet over gloo). `bench real` scores your "
        "own models on a prompt file with CLIP score / FID / IS (torchmetrics) from local weights.",
    )
    b.add_argument(
        "app",
        help="fine-grained, cross-domain, cross-domain-photo, regional, regional-models, aggregation, aggregation-layout, ensemble, "
        "multi-lora, multi-lora-3 (several: comma-separated); "
        "'all' for every app; 'real' for your own models (with --recipe and --prompt-file)",
    )
    b.add_argument(
        "--rows",
        help="run only these rows (comma-separated row ids, e.g. merge,mbw); the others' numbers "
        "do not change, the benchmark being deterministic",
    )
    b.add_argument(
        "--out", required=True, help="output folder (finished samples in it are reused; different settings are refused)"
    )
    b.add_argument("--seeds", type=int, help="seeds per prompt (default 64; for 'real' 1 image per prompt)")
    b.add_argument(
        "--prompts", type=int, default=8, help="prompts per app, generated from ShapeWorld with a fixed seed (default 8)"
    )
    b.add_argument("--steps", dest="num_inference_steps", type=int, default=30, help="sampling steps (default 30)")
    b.add_argument("--scheduler", default="ddim", help="scheduler name (default ddim)")
    b.add_argument("--cfg", dest="guidance_scale", type=float, default=7.5, help="guidance scale of every model (default 7.5)")
    b.add_argument("--batch-size", dest="batch_size", type=int, default=16, help="images sampled together (default 16)")
    b.add_argument(
        "--model",
        action="append",
        metavar="ROLE=MODEL",
        help="use MODEL for ROLE instead of zoo:ROLE (repeatable), e.g. --model general=./my-general",
    )
    b.add_argument("--device", help="device (default: the process's accelerate device, cpu without a GPU)")
    b.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="weights dtype (default float32)"
    )
    b.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    b.add_argument(
        "--update-doc",
        dest="update_doc",
        help="also rewrite the tables between the bench markers of this markdown file (e.g. docs/results.md; "
        "FILE#NAME: between the markers named NAME)",
    )
    b.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    rb = b.add_argument_group("bench real (your own models; nothing is downloaded)")
    rb.add_argument("--recipe", help="recipe whose models all take the prompt (each prompt line is given to every model)")
    rb.add_argument(
        "--prompt-file", dest="prompt_file", help="text file, one prompt per line (blank lines and # comments skipped)"
    )
    rb.add_argument(
        "--clip-model", dest="clip_model", help="local CLIP folder (CLIPModel + CLIPProcessor save_pretrained) for CLIP score"
    )
    rb.add_argument(
        "--inception-weights",
        dest="inception_weights",
        help="local torch-fidelity Inception-v3 weights file (pt_inception-2015-12-05-6726825d.pth) for FID and IS",
    )
    rb.add_argument("--reference", help="folder of reference images (PNG/JPEG) for FID")
    b.set_defaults(func=cmd_bench)

    mg = sub.add_parser(
        "merge",
        help="write the merged model of a merge/mbw recipe as a diffusers folder",
        description="Merge the models of a recipe whose method is merge or mbw (its params: weights, alpha, "
        "blocks, ...) into a diffusers pipeline folder with merge.json, streaming (peak memory below one "
        "model). Prompts and sampling settings are ignored. See docs/merges.md.",
    )
    mg.add_argument("recipe", nargs="?", help="recipe file (.yaml, .yml or .json) with method merge or mbw")
    mg.add_argument("--out", required=True, help="output folder (written atomically)")
    mg.add_argument("--base", help="instead of a recipe: the model (folder or zoo:NAME) a LoRA is merged into")
    mg.add_argument(
        "--lora", help="a LoRA file (.safetensors, PEFT / diffusers / kohya keys) merged into the recipe's merge or --base"
    )
    mg.add_argument("--scale", type=float, default=1.0, help="the LoRA's strength (default 1; diffusers' fuse_lora lora_scale)")
    mg.add_argument(
        "--lora-blocks",
        dest="lora_blocks",
        help="per-block weights of the LoRA: a preset or an A1111 string (the ids of mbw; BASE weighs the text encoders)",
    )
    mg.add_argument(
        "--single-file",
        dest="single_file",
        action="store_true",
        help="also write OUT.safetensors: one checkpoint in the original SD-1.x (LDM) layout, for tools that expect single files",
    )
    mg.add_argument("--overwrite", action="store_true", help="replace an existing output")
    mg.set_defaults(func=cmd_merge)

    ex = sub.add_parser(
        "extract-lora",
        help="write the difference of a fine-tune from its base as a LoRA (truncated SVD)",
        description="Extract TUNED - BASE as a LoRA of the given rank: a truncated SVD of every Linear and Conv "
        "weight of the denoiser (and with --text-encoder of the text encoders), written as one safetensors file "
        "that diffusers' load_lora_weights reads. See docs/merges.md.",
    )
    ex.add_argument("base", help="the base model (folder or zoo:NAME)")
    ex.add_argument("tuned", help="the fine-tune of it (same architecture)")
    ex.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    ex.add_argument("--rank", type=int, required=True, help="the LoRA's rank (larger: closer to the fine-tune)")
    ex.add_argument("--text-encoder", dest="text_encoder", action="store_true", help="also extract the text encoders")
    ex.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="the file's dtype")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing file")
    ex.set_defaults(func=cmd_extract_lora)

    ms = sub.add_parser(
        "mbw-search",
        help="search block weights of an app's two models against the zoo judge (auto-MBW)",
        description="Search the block weights (mbw) of merging a zoo app's first two roles that maximise the "
        "judge's success on the app's prompts (each image sampled with the first role's prompt), by a weighted "
        "sum or any registered merge method with a ratio (--method, its other hyper-parameters with --option). Cheap by "
        "default: 4 prompts, 1 seed, 10 steps. Resumable: every candidate and its score go to OUT/search.jsonl; "
        "a rerun scores none twice. Writes OUT/best.json and OUT/search.png (best score over evaluations).",
    )
    ms.add_argument("app", help="fine-grained, cross-domain, aggregation or ensemble (the app's first two roles are merged)")
    ms.add_argument("--out", required=True, help="output folder (log, best candidate, plot)")
    ms.add_argument(
        "--optimizer",
        choices=["coordinate", "optuna"],
        default="coordinate",
        help="coordinate: auto-MBW's block-by-block walk (default); optuna: TPE (pip install 'multifusion[search]')",
    )
    ms.add_argument("--budget", type=int, default=30, help="evaluations at most, logged ones included (default 30)")
    ms.add_argument("--prompts", type=int, default=4, help="prompts of the app per evaluation (default 4)")
    ms.add_argument("--seeds", type=int, default=1, help="images per prompt (default 1)")
    ms.add_argument("--steps", dest="num_inference_steps", type=int, default=10, help="sampling steps (default 10, DDIM)")
    ms.add_argument("--grid", help="block weight values tried, comma separated (default 0,0.25,0.5,0.75,1)")
    ms.add_argument("--model", action="append", metavar="ROLE=MODEL", help="replace a role's zoo model (repeatable)")
    ms.add_argument(
        "--method",
        dest="merge_method",
        default="weighted_sum",
        help="the registered merge method whose ratio the block weights set (default weighted_sum; ties, dare, "
        "dare_ties: alpha, base = the first role; slerp: t); see docs/merges.md",
    )
    ms.add_argument(
        "--option",
        action="append",
        metavar="NAME=VALUE",
        help="another hyper-parameter of the method, fixed during the search (e.g. density=0.5; repeatable)",
    )
    ms.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ms.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    ms.set_defaults(func=cmd_mbw_search)

    u = sub.add_parser(
        "ui",
        help="a local web UI (Gradio; the ui extra): compose, run and compare fusions",
        description="Start the web UI on this machine only (127.0.0.1), on the zoo models plus any --models.",
    )
    u.add_argument("--models", nargs="+", metavar="DIR", help="model folders or files offered besides the zoo")
    u.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    u.set_defaults(func=cmd_ui)
    return parser


ERROR_LIMIT = 4000


def _quiet_loading() -> None:
    """Hide diffusers' and transformers' per-component loading bars: with several models they
    bury the one bar that tracks the work (sampling, benchmarking)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_loading()
    try:
        return args.func(args)
    except MultifusionError as err:
        text = str(err)
        if len(text) > ERROR_LIMIT:  # messages quote user input; never pages of it
            text = f"{text[:ERROR_LIMIT]}... ({len(text):,} characters in all)"
        print(f"error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished images are kept, nothing half-written was left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
