"""`multifusion ui`: a local Gradio app over the typed API (recipe -> `Run`), holding no maths.

The method form is generated from the registry (`forms.method_widgets`), so a method registered
later appears here with no code. Errors of the library start with the field they name
(`params.regions[0].col_end: ...`) and are shown beside that field (`forms.route_errors`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine

import gradio as gr  # noqa: E402
import yaml  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402

from multifusion.errors import MultifusionError  # noqa: E402
from multifusion.registry import METHODS  # noqa: E402
from multifusion.ui import forms  # noqa: E402
from multifusion.ui.forms import MAX_MODELS, SAMPLING_FORM  # noqa: E402

BOX = ("row_init", "row_end", "col_init", "col_end")
DEFAULT_MODELS = [("zoo:general", "a red circle in a snowy field"), ("zoo:expert", "a red striped circle")]


class Cancelled(Exception):
    pass


class App:
    """The components of the page, by key, and the handlers that read and fill them."""

    def __init__(self, model_dirs: list[str] | tuple = ()):
        self.choices = [f"zoo:{n}" for n in forms.ZOO_NAMES] + [str(d) for d in model_dirs]
        self.comps: dict[str, gr.components.Component] = {}  # form key -> component
        self.errors: dict[str, gr.Markdown] = {}  # error key -> box beside the field
        self.groups: dict[str, gr.Group] = {}  # method -> its form
        self.slots: list[gr.Group] = []
        self.widgets = {name: forms.method_widgets(m) for name, m in METHODS.items()}
        # Runs are numbered; Cancel stops every run started so far. (Gradio's `cancels` drops the
        # event, but the worker thread runs on: it stops at its next step when it sees this.)
        self.run_id, self.cancelled_upto = 0, 0
        self.out_root = Path(tempfile.mkdtemp(prefix="multifusion-ui-"))
        self._handles: dict[str, list] = {}  # loaded models, by the recipe's model list

    # ---- layout ------------------------------------------------------------------------------

    def error_box(self, key: str) -> gr.Markdown:
        box = gr.Markdown(visible=False, elem_id="err-" + key.replace("[", "-").replace("]", "").replace(".", "-").replace(":", "-"),
                          elem_classes=["field-error"])
        self.errors[key] = box
        return box

    def param_component(self, method: str, w: forms.Widget) -> gr.components.Component:
        key, eid = f"params:{method}:{w.name}", f"param-{method}-{w.name}"
        kw = dict(label=w.label, info=w.description or None, elem_id=eid)
        if w.kind == "choice":
            c = gr.Dropdown(list(w.choices), value=w.initial(), **kw)
        elif w.kind == "bool":
            c = gr.Checkbox(value=bool(w.initial()), **kw)
        elif w.kind in ("int", "float"):
            c = gr.Number(value=w.initial() if not w.required else None, precision=0 if w.kind == "int" else None, **kw)
        elif w.kind == "table":
            c = gr.Dataframe(value=w.initial(), headers=list(w.columns), type="array", col_count=(len(w.columns), "fixed"),
                             row_count=(1, "dynamic"), interactive=True, label=f"{w.label}: one row per item", elem_id=eid)
        else:
            c = gr.Textbox(value=w.initial(), **kw)
        self.comps[key] = c
        return c

    def build(self) -> gr.Blocks:
        theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
        css = ".field-error { color: #b00020; font-weight: 600; } .field-error p { color: #b00020; }"
        with gr.Blocks(title="multifusion", theme=theme, css=css, analytics_enabled=False) as demo:
            gr.Markdown("# multifusion\nCompose a fusion of diffusion models: models, a method and its parameters, sampling.")
            self.general = self.error_box("general")
            with gr.Tab("Compose", id="compose"):
                with gr.Row():
                    with gr.Column(scale=1):
                        gr.Markdown("### Models")
                        self.comps["n_models"] = n_models = gr.Slider(1, MAX_MODELS, value=2, step=1, label="number of models", elem_id="n-models")
                        self.error_box("models")
                        for i in range(MAX_MODELS):
                            model, prompt = DEFAULT_MODELS[i] if i < len(DEFAULT_MODELS) else ("", "")
                            with gr.Group(visible=i < 2) as g:
                                self.comps[f"models[{i}].model"] = gr.Dropdown(self.choices, value=model or None, allow_custom_value=True,
                                                                               label=f"model {i}: zoo:NAME, a diffusers folder, a .safetensors file or a Hub id",
                                                                               elem_id=f"model-{i}")
                                self.comps[f"models[{i}].name"] = gr.Textbox(label="name (for regions and amdm's specified)", elem_id=f"name-{i}")
                                self.comps[f"models[{i}].prompt"] = gr.Textbox(value=prompt, label="prompt", elem_id=f"prompt-{i}")
                                with gr.Row():
                                    self.comps[f"models[{i}].guidance_scale"] = gr.Textbox(label="guidance scale (blank: sampling's)", elem_id=f"guidance-{i}")
                                    self.comps[f"models[{i}].negative_prompt"] = gr.Textbox(label="negative prompt", elem_id=f"negative-{i}")
                                self.error_box(f"models[{i}]")
                            self.slots.append(g)
                    with gr.Column(scale=1):
                        gr.Markdown("### Method")
                        self.comps["method"] = method = gr.Dropdown(list(METHODS), value="snb", label="method", elem_id="method")
                        self.summary = gr.Markdown(self.method_summary("snb"))
                        for name in METHODS:
                            with gr.Group(visible=name == "snb") as g:
                                for w in self.widgets[name]:
                                    c = self.param_component(name, w)
                                    self.error_box(f"{name}:params.{w.name}")
                                    if w.kind == "table" and set(BOX) | {"prompt"} <= set(w.columns):  # regions that paint
                                        self.canvas_tools(name, w, c)
                                if not self.widgets[name]:
                                    gr.Markdown("no parameters")
                            self.groups[name] = g
                    with gr.Column(scale=1):
                        gr.Markdown("### Sampling")
                        from multifusion.recipe import Sampling
                        from multifusion.schedulers import SCHEDULERS

                        f = Sampling.model_fields
                        for k in SAMPLING_FORM:
                            eid, label = f"sampling-{k}", f"{k}" + (" (blank: the model's size)" if k in ("height", "width") else "")
                            default = f[k].default if k != "num_inference_steps" else 10
                            if k == "scheduler":
                                c = gr.Dropdown(list(SCHEDULERS), value=default, label=label, elem_id=eid)
                            elif k in ("height", "width"):
                                c = gr.Textbox(value="", label=label, elem_id=eid)
                            else:
                                c = gr.Number(value=default, label=label, precision=None if k in ("guidance_scale", "eta") else 0, elem_id=eid)
                            self.comps[f"sampling.{k}"] = c
                        self.error_box("sampling")
                with gr.Row():
                    validate_btn = gr.Button("Validate", elem_id="validate")
                    run_btn = gr.Button("Run", variant="primary", elem_id="run")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
                self.status = gr.Markdown(elem_id="status")
                with gr.Row():
                    self.images = gr.Gallery(label="images", columns=4, height="auto", object_fit="contain", elem_id="images")
                    self.pictures = gr.Gallery(label="method pictures (SNB masks, AMDM strip, AFA maps)", columns=1, height=320, object_fit="contain", elem_id="pictures")
                with gr.Row():
                    self.recipe_file = gr.File(label="recipe (YAML)", elem_id="recipe-file")
                    self.png_files = gr.File(label="PNGs (each carries its recipe)", file_count="multiple", elem_id="png-files")
                with gr.Row():
                    restore = gr.File(label="Drop a PNG made by multifusion (or a recipe .yaml) to restore its recipe", type="filepath",
                                      elem_id="restore")
                    self.error_box("restore")
            with gr.Tab("Compare", id="compare"):
                gr.Markdown("The models, prompts, sampling settings and seeds of the Compose tab, through several methods side by "
                            "side (each with its parameters from the Compose tab); zoo models are scored by the zoo's judge.")
                cmp_methods = gr.CheckboxGroup(list(METHODS), value=["average", "snb"], label="methods", elem_id="compare-methods")
                cmp_btn = gr.Button("Compare", variant="primary", elem_id="compare-run")
                cmp_status = gr.Markdown(elem_id="compare-status")
                cmp_gallery = gr.Gallery(label="side by side", columns=6, height="auto", object_fit="contain", elem_id="compare-images")
                cmp_scores = gr.Dataframe(label="judge scores (zoo models)", elem_id="compare-scores", interactive=False)

            inputs = set(self.comps.values())
            errs = list(self.errors.values())
            n_models.change(lambda n: [gr.update(visible=i < int(n)) for i in range(MAX_MODELS)], n_models, self.slots)
            method.change(lambda m: [gr.update(visible=k == m) for k in self.groups] + [self.method_summary(m)], method,
                          list(self.groups.values()) + [self.summary])
            validate_btn.click(self.on_validate, inputs, errs + [self.status])
            run_event = run_btn.click(self.on_run, inputs, errs + [self.status, self.images, self.pictures, self.recipe_file, self.png_files])
            cmp_event = cmp_btn.click(self.on_compare, inputs | {cmp_methods}, [cmp_status, cmp_gallery, cmp_scores])
            cancel_btn.click(self.on_cancel, None, self.status, cancels=[run_event, cmp_event], concurrency_limit=None, queue=False)
            # the drop box empties itself after reading, ready for the next file
            restore.upload(self.on_restore, restore, [self.comps[k] for k in self.comps] + errs + [restore])
            self._cmp_methods = cmp_methods
        return demo

    def canvas_tools(self, method: str, w: forms.Widget, table: gr.Dataframe) -> None:
        """The canvas of a table of boxes: a live preview (snapped to the latent grid, uncovered
        pixels hatched), boxes drawn by two clicks on it, and a tiles helper."""
        gr.Markdown("Click two corners on the canvas to add a region (snapped to the latent grid); edit or delete rows in the table.")
        corner = gr.State(None)
        preview = gr.Image(label="canvas", interactive=False, type="pil", elem_id=f"canvas-{method}-{w.name}", show_download_button=False)
        notes = gr.Markdown(elem_id=f"canvas-notes-{method}-{w.name}")
        with gr.Accordion("tiles helper", open=False):
            with gr.Row():
                t_rows, t_cols = gr.Number(1, label="rows", precision=0), gr.Number(2, label="columns", precision=0)
                t_h, t_w = gr.Number(64, label="tile height", precision=0), gr.Number(40, label="tile width", precision=0)
                t_ov = gr.Number(16, label="overlap", precision=0)
            tiles_btn = gr.Button("Fill the table with tiles (and set the canvas size)")
        size = [self.comps.get("sampling.height"), self.comps.get("sampling.width")]
        model0 = self.comps["models[0].model"]

        def draw(rows, h, wd, m0):
            fac, (H, W) = self.canvas_size(m0, h, wd)
            return forms.regions_preview(self.table_items(w, rows), H, W, fac)

        def click(evt: gr.SelectData, first, rows, h, wd, m0, p0):
            fac, (H, W) = self.canvas_size(m0, h, wd)
            scale = max(1, 384 // max(H, W))
            x, y = evt.index[0], evt.index[1]
            if first is None:
                im, text = forms.regions_preview(self.table_items(w, rows), H, W, fac)
                return (x, y), rows, im, text + f"\n- first corner at row {y // scale}, col {x // scale}: click the opposite corner"
            box = forms.box_from_clicks(first, (x, y), fac, H, W, scale)
            items = self.table_items(w, rows) + [{**box, "prompt": p0 or "", "model": 0}]
            new = forms.to_widget(w, items)
            im, text = forms.regions_preview(items, H, W, fac)
            return None, new, im, text + f"\n- region {len(items) - 1} added (model 0's prompt): edit its prompt and model in the table"

        def tiles(r, c, th, tw, ov, p0):
            items = forms.tile_rows(int(r), int(c), int(th), int(tw), int(ov), p0 or "")
            from multifusion.noise.methods import TilesParams

            H, W = TilesParams(prompts=[[""] * int(c)] * int(r), tile_height=int(th), tile_width=int(tw),
                               tile_row_overlap=int(ov), tile_col_overlap=int(ov)).canvas()
            return forms.to_widget(w, items), H, W

        # Sampling components exist only after the sampling column is built: wire these on load.
        self._canvas_wiring = getattr(self, "_canvas_wiring", [])
        self._canvas_wiring.append((table, preview, notes, corner, draw, click, tiles, tiles_btn, [t_rows, t_cols, t_h, t_w, t_ov], model0))

    def wire_canvases(self, demo: gr.Blocks) -> None:
        h, wd = self.comps["sampling.height"], self.comps["sampling.width"]
        p0 = self.comps["models[0].prompt"]
        with demo:
            for table, preview, notes, corner, draw, click, tiles, tiles_btn, tile_inputs, model0 in getattr(self, "_canvas_wiring", []):
                ins = [table, h, wd, model0]
                for c in (table, h, wd, model0):
                    c.change(draw, ins, [preview, notes])
                demo.load(draw, ins, [preview, notes])
                preview.select(click, [corner] + ins + [p0], [corner, table, preview, notes])
                tiles_btn.click(tiles, tile_inputs + [p0], [table, h, wd])

    # ---- reading the form ----------------------------------------------------------------------

    @staticmethod
    def method_summary(name: str) -> str:
        m = METHODS[name]
        return f"**{name}** ({m.meets}): {m.summary}"

    @staticmethod
    def table_items(w: forms.Widget, rows) -> list[dict]:
        v = forms.from_widget(w, rows)
        return [] if v is PydanticUndefined else v

    def canvas_size(self, model0: str | None, h, wd) -> tuple[int, tuple[int, int]]:
        fac, native = forms.canvas_facts(model0)
        H = int(h) if h not in (None, "") and int(h) > 0 else native
        W = int(wd) if wd not in (None, "") and int(wd) > 0 else native
        return fac, (min(H, 4096), min(W, 4096))

    def values(self, data: dict) -> dict[str, Any]:
        return {k: data.get(c) for k, c in self.comps.items()}

    def recipe(self, v: dict[str, Any], method: str | None = None) -> dict:
        method = method or v["method"]
        params = forms.params_from_widgets(METHODS[method], {w.name: v[f"params:{method}:{w.name}"] for w in self.widgets[method]})
        slots = [{k: v[f"models[{i}].{k}"] for k in forms.MODEL_KEYS} for i in range(MAX_MODELS)]
        sampling = {k: v[f"sampling.{k}"] for k in SAMPLING_FORM}
        return forms.recipe_from_form(method, int(v["n_models"]), slots, params, sampling)

    def error_updates(self, routed: dict[str, list[str]] | None, method: str) -> list:
        routed = dict(routed or {})
        shown: dict[str, list[str]] = {}
        for key, lines in routed.items():
            target = f"{method}:{key}" if key.startswith("params.") else key
            shown.setdefault(target if target in self.errors else "general", []).extend(lines)
        return [gr.update(value="\n\n".join(f"⚠ {ln}" for ln in shown[k]), visible=True) if k in shown else gr.update(value="", visible=False)
                for k in self.errors]

    # ---- handlers ------------------------------------------------------------------------------

    def checked(self, v: dict) -> dict:
        """The form's recipe, validated as `multifusion validate` does; raises the library's errors."""
        recipe = self.recipe(v)
        forms.check_recipe(recipe)
        return recipe

    def on_validate(self, data: dict):
        v = self.values(data)
        try:
            self.checked(v)
        except MultifusionError as err:
            return self.error_updates(forms.route_errors(err), v["method"]) + ["**invalid**: see the fields marked ⚠"]
        return self.error_updates(None, v["method"]) + ["valid: ready to run"]

    def on_cancel(self):
        self.cancelled_upto = self.run_id
        return "cancelled"

    def handles(self, recipe):
        from multifusion.api import load_recipe_models

        key = recipe.model_dump_json(include={"models", "merges", "runtime"}, exclude={"models": {"__all__": {"prompt", "negative_prompt", "guidance_scale"}}})
        if key not in self._handles:
            self._handles = {key: load_recipe_models(recipe)}  # one set of models kept at a time
        return self._handles[key]

    def generate(self, recipe_dict: dict, out: Path, progress=None, run_id: int | None = None) -> tuple[list, list, Path]:
        """Run a recipe: images (path, caption), method pictures (path, caption), the recipe file."""
        from multifusion.api import Run, image_name
        from multifusion.io import image_metadata, save_png, write_text
        from multifusion.recipe import parse_recipe
        from multifusion.viz import method_recorders

        recipe = parse_recipe(recipe_dict)
        session = Run(recipe, models=self.handles(recipe))
        stem = recipe.method
        recipe_path = write_text(out / f"{stem}.yaml", yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False))
        recipe_json, labels = recipe.to_json(), [m.label for m in recipe.models]
        steps, seeds = recipe.sampling.num_inference_steps, recipe.seeds()
        images, pictures = [], []
        done = 0
        for start in range(0, len(seeds), 4):
            chunk = seeds[start : start + 4]
            recorders = method_recorders(session.handles[0].ready_vae(recipe.runtime.vae_device))

            def callback(step, chunk=chunk):
                if run_id is not None and run_id <= self.cancelled_upto:
                    raise Cancelled()
                for r in recorders:
                    r(step)
                if progress is not None:
                    progress((done * steps + step.step + 1, len(seeds) * steps), desc=f"{stem}: seeds {chunk[0]}-{chunk[-1]}, step {step.step + 1}/{steps}")

            part = session.batch(chunk, callback=callback, progress=False)
            for i, (image, seed) in enumerate(zip(part.images, part.seeds)):
                path = save_png(image, out / image_name(stem, seed), image_metadata(recipe_json, seed))
                images.append((str(path), f"{stem} seed {seed}"))
                for r in recorders:
                    pictures += [(str(p), f"{p.stem}") for p in r.save(out / image_name(stem, seed).removesuffix(".png"), i, labels) if p.suffix == ".png"]
            done += len(chunk)
        return images, pictures, recipe_path

    def on_run(self, data: dict, progress=gr.Progress()):
        v = self.values(data)
        self.run_id += 1
        run_id = self.run_id
        nothing = [None, None, None, None]
        try:
            recipe = self.checked(v)
            out = Path(tempfile.mkdtemp(prefix="run-", dir=self.out_root))
            images, pictures, recipe_path = self.generate(recipe, out, progress, run_id)
        except MultifusionError as err:
            return self.error_updates(forms.route_errors(err), v["method"]) + ["**not run**: see the fields marked ⚠"] + nothing
        except Cancelled:
            return self.error_updates(None, v["method"]) + ["cancelled"] + nothing
        except Exception as err:  # not the user's input: say what failed, without a traceback
            return self.error_updates({"general": [f"{type(err).__name__}: {err}"]}, v["method"]) + ["**failed**"] + nothing
        status = f"done: {len(images)} image(s) with `{v['method']}`; each PNG carries its recipe"
        return (self.error_updates(None, v["method"]) + [status, images, pictures or None, str(recipe_path), [p for p, _ in images]])

    def on_restore(self, path: str | None):
        keys = list(self.comps)
        keep = [gr.update() for _ in keys]
        if not path:
            return keep + self.error_updates(None, "") + [None]
        try:
            method, n, slots, params, sampling = forms.form_from_recipe(forms.read_recipe_file(path))
            if method not in METHODS:
                raise MultifusionError(f"method: unknown method {method!r}")
        except MultifusionError as err:
            return keep + self.error_updates({"restore": [f"restore: {err}"]}, "") + [None]
        values: dict[str, Any] = {"method": method, "n_models": n}
        for i in range(MAX_MODELS):
            slot = slots[i] if i < n else {"model": None, "name": "", "prompt": "", "guidance_scale": None, "negative_prompt": ""}
            values.update({f"models[{i}].{k}": slot[k] for k in forms.MODEL_KEYS})
        for w in self.widgets[method]:
            values[f"params:{method}:{w.name}"] = forms.to_widget(w, params.get(w.name, None if w.required else w.default))
        values.update({f"sampling.{k}": sampling.get(k) for k in SAMPLING_FORM})
        return [values[k] if k in values else gr.update() for k in keys] + self.error_updates(None, method) + [None]

    def on_compare(self, data: dict, progress=gr.Progress()):
        v = self.values(data)
        chosen = data.get(self._cmp_methods) or []
        if len(chosen) < 2:
            return "choose two or more methods", None, None
        self.run_id += 1
        run_id = self.run_id
        gallery, rows, problems = [], [], []
        for name in chosen:
            try:
                recipe = self.recipe(v, name)
                forms.check_recipe(recipe)
                out = Path(tempfile.mkdtemp(prefix=f"compare-{name}-", dir=self.out_root))
                images, _, _ = self.generate(recipe, out, progress, run_id)
            except MultifusionError as err:
                problems.append(f"- **{name}**: " + "; ".join(str(err).replace("invalid recipe:", "").split("\n")).strip())
                continue
            except Cancelled:
                return "cancelled", None, None
            gallery += images
            rows += self.scores(name, recipe, images)
        status = "\n".join(problems) if problems else f"compared {len(chosen)} methods"
        import pandas as pd

        return status, gallery or None, pd.DataFrame(rows) if rows else None

    @staticmethod
    def scores(method: str, recipe: dict, images: list) -> list[dict]:
        """The zoo judge's reading and scores of each image against each model's prompt."""
        if not all(str(m["model"]).startswith("zoo:") for m in recipe["models"]):
            return [{"method": method, "image": c, "scores": "not zoo models: no judge"} for _, c in images]
        from PIL import Image

        from multifusion.zoo.judge import load_judge
        from multifusion.zoo.metrics import summary

        pics = [Image.open(p).convert("RGB") for p, _ in images]
        readings = load_judge().read(pics)
        rows = []
        for (_, caption), reading in zip(images, readings):
            row = {"method": method, "image": caption, "judge reads": _reading_text(reading)}
            for i, m in enumerate(recipe["models"]):
                try:
                    s = summary([reading], [m.get("prompt", "")])
                    for k in ("image_success", "scene", "style"):
                        if k in s:
                            row[f"model {i} prompt: {k}"] = round(s[k], 3)
                except MultifusionError:  # a prompt outside the zoo's caption grammar
                    row[f"model {i} prompt"] = "not a zoo caption"
            rows.append(row)
        return rows


def _reading_text(reading: dict) -> str:
    objs = [f"{o['colour']} {o['texture']} {o['shape']} ({slot})" for slot, o in reading["slots"].items() if o]
    return f"{reading['style']}, {reading['background']}: " + (", ".join(objs) or "nothing")


def build_app(model_dirs: list[str] | tuple = ()) -> gr.Blocks:
    app = App(model_dirs)
    demo = app.build()
    app.wire_canvases(demo)
    demo.multifusion_app = app  # type: ignore[attr-defined]
    return demo


def launch(model_dirs: list[str] | tuple = (), port: int = 7860, host: str = "127.0.0.1") -> None:
    demo = build_app(model_dirs)
    app = demo.multifusion_app  # type: ignore[attr-defined]
    demo.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, inbrowser=False, share=False,
                                                   show_api=False, allowed_paths=[str(app.out_root)], quiet=False)
