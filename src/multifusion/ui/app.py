"""`multifusion ui`: a local Gradio app over the typed API (recipe -> `Run`), holding no maths.

The method form is generated from the registry (`forms.method_widgets`), each model slot from
the recipe's model entry (`forms.model_widgets`), the sampling and runtime fields from `Sampling`
and `Runtime`, and `merges` from the recipe's own fields (`forms.recipe_widgets`), so a method
registered later, or a field added to the recipe, appears here with no code. Errors of the library start with the field they name
(`params.regions[0].col_end: ...`) and are shown beside that field (`forms.route_errors`).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine

import gradio as gr  # noqa: E402
import yaml  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402

from multifusion.errors import MultifusionError  # noqa: E402
from multifusion.registry import METHODS  # noqa: E402
from multifusion.ui import forms  # noqa: E402
from multifusion.ui.forms import MAX_MODELS  # noqa: E402

DEFAULT_MODELS = [("zoo:general", "a red circle in a snowy field"), ("zoo:expert", "a red striped circle")]
PREVIEW_EVERY = 5
"""Default steps between previews of a run (0: none); each preview decodes the batch once."""
CSS = """
.field-error { color: #b00020; font-weight: 600; } .field-error p { color: #b00020; }
.mf-hidden { display: none !important; }
.mf-canvas img { touch-action: none; user-select: none; }
#status .progress-text { display: none !important; }
"""
# The last rule: Gradio's "N/M steps | time" restarts its clock with every preview the run sends;
# the bar's own text says the step and the run's time (`App.generate`).


class Cancelled(Exception):
    pass


class App:
    """The components of the page, by key, and the handlers that read and fill them."""

    def __init__(self, model_dirs: list[str] | tuple = ()):
        from multifusion.loading import zoo_models

        self.choices = [f"zoo:{n}" for n in zoo_models()] + [str(d) for d in model_dirs]
        self.comps: dict[str, gr.components.Component] = {}  # form key -> component
        self.errors: dict[str, gr.Markdown] = {}  # error key -> box beside the field
        self.groups: dict[str, gr.Group] = {}  # method -> its form
        self.slots: list[gr.Group] = []
        # Collapsed accordions (each slot's fields beyond forms.MODEL_MAIN, merges, runtime) and
        # the form and error keys inside each: opened when one of them shows an error or is restored.
        self.folds: list[tuple[gr.Accordion, set[str]]] = []
        self.widget_of: dict[str, forms.Widget] = {}  # form key -> its widget
        self.model_widgets = forms.model_widgets()
        self.widgets = {name: forms.method_widgets(m) for name, m in METHODS.items()}
        # Runs are numbered; Cancel stops every run started so far. (Gradio's `cancels` drops the
        # event, but the worker thread runs on: it stops at its next step when it sees this.)
        self.run_id, self.cancelled_upto = 0, 0
        self.out_root = Path(tempfile.mkdtemp(prefix="multifusion-ui-"))
        self._handles: dict[str, list] = {}  # loaded models, by the recipe's model list

    # ---- layout ------------------------------------------------------------------------------

    def error_box(self, key: str) -> gr.Markdown:
        box = gr.Markdown(
            visible=False,
            elem_id="err-" + key.replace("[", "-").replace("]", "").replace(".", "-").replace(":", "-"),
            elem_classes=["field-error"],
        )
        self.errors[key] = box
        return box

    def component(self, key: str, w: forms.Widget, eid: str, label: str | None = None, value: Any = PydanticUndefined):
        """The component of a widget (a params or a model field), kept under `key`; `value`
        in place of the field's default."""
        kw = dict(label=label or w.label, info=w.description or None, elem_id=eid)
        value = w.initial() if value is PydanticUndefined else value
        self.widget_of[key] = w
        if key.endswith("].model"):  # a model: the zoo and the folders given on the command line, or any reference
            c = gr.Dropdown(self.choices, value=value or None, allow_custom_value=True, **kw)
        elif key == "sampling.scheduler":
            from multifusion.schedulers import SCHEDULERS

            c = gr.Dropdown(list(SCHEDULERS), value=value, allow_custom_value=True, **kw)  # a restored name is kept as written
        elif w.kind == "choice":
            c = gr.Dropdown(list(w.choices), value=value, **kw)
        elif w.kind == "bool":
            c = gr.Checkbox(value=bool(value), **kw)
        elif w.kind in ("int", "float") and not w.optional:
            c = gr.Number(value=value if not w.required else None, precision=0 if w.kind == "int" else None, **kw)
        elif w.kind == "table":
            c = gr.Dataframe(
                value=value,
                headers=list(w.columns),
                type="array",
                column_count=len(w.columns),
                column_widths=[forms.column_width(w.item, c) for c in w.columns],
                row_count=1,
                interactive=True,
                label=f"{w.label}: one row per item",
                elem_id=eid,
            )
        else:  # text, optional numbers (blank: none), YAML (a mapping: several lines), one item per line
            tall = w.kind == "lines" or (w.kind == "yaml" and isinstance(w.default, dict))
            c = gr.Textbox(value=value, lines=(4 if w.kind == "yaml" else 2) if tall else 1, max_lines=12 if tall else None, **kw)
        self.comps[key] = c
        return c

    def param_component(self, method: str, w: forms.Widget) -> gr.components.Component:
        return self.component(f"params:{method}:{w.name}", w, f"param-{method}-{w.name}")

    def model_slot(self, i: int, model: str, prompt: str) -> None:
        """Model slot i: a component per field of the recipe's model entry with an error box under
        each; the fields beyond `forms.MODEL_MAIN` in a collapsed accordion. Short fields go two to
        a row."""
        main = [w for w in self.model_widgets if w.name in forms.MODEL_MAIN]
        more = [w for w in self.model_widgets if w.name not in forms.MODEL_MAIN]
        start = {"model": model, "prompt": prompt}

        def fields(ws: list[forms.Widget]) -> None:
            for k, run in itertools.groupby(ws, key=lambda w: w.name == "model" or w.kind == "lines"):
                run = list(run)
                if k:  # wide: one to a row
                    for w in run:
                        self.model_field(i, w, start)
                    continue
                for j in range(0, len(run), 2):
                    with gr.Row():
                        for w in run[j : j + 2]:
                            with gr.Column(min_width=160):
                                self.model_field(i, w, start)

        fields(main)
        with gr.Accordion(f"more: {', '.join(w.name for w in more)}", open=False, elem_id=f"more-{i}") as acc:
            fields(more)
        self.folds.append((acc, {f"models[{i}].{w.name}" for w in more}))
        self.error_box(f"models[{i}]")

    def section(self, prefix: str, ws: list[forms.Widget], start: dict[str, Any] | None = None) -> None:
        """A component per widget under form keys `<prefix><field>` (element ids with `-` for
        the dot), each with its error box when the prefix is empty (a recipe field of its own)."""
        for w in ws:
            self.component(
                prefix + w.name, w, (prefix.replace(".", "-") + w.name), w.label, (start or {}).get(w.name, PydanticUndefined)
            )
            if not prefix:
                self.error_box(w.name)

    def fold(self, title: str, eid: str, prefix: str, ws: list[forms.Widget], error_key: str | None = None) -> None:
        """`section` in a collapsed accordion (left out when there are no widgets), with the
        error box of `error_key` inside."""
        if not ws:
            return
        with gr.Accordion(title, open=False, elem_id=eid) as acc:
            self.section(prefix, ws)
            if error_key:
                self.error_box(error_key)
        self.folds.append((acc, {prefix + w.name for w in ws} | ({error_key} if error_key else set())))

    def model_field(self, i: int, w: forms.Widget, start: dict[str, str]) -> None:
        label = f"model {i}" if w.name == "model" else w.name
        self.component(f"models[{i}].{w.name}", w, f"{w.name}-{i}", label, start.get(w.name, PydanticUndefined))
        self.error_box(f"models[{i}].{w.name}")

    def build(self) -> gr.Blocks:
        theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
        drag_script = (Path(__file__).with_name("canvas.js")).read_text()
        self.page = dict(theme=theme, css=CSS, js=drag_script)  # what launch() gives the page
        with gr.Blocks(title="multifusion", analytics_enabled=False) as demo:
            gr.Markdown("# multifusion\nCompose a fusion of diffusion models at sampling time.")
            self.general = self.error_box("general")
            with gr.Tab("Compose", id="compose"):
                gr.Markdown(
                    "Pick the models and a prompt for each (left), a method and its parameters (middle), then **Run**: "
                    "the images show here. Drop a PNG made by multifusion at the bottom of the page to restore its recipe.",
                    elem_id="how-to",
                )
                with gr.Row():
                    validate_btn = gr.Button("Validate", elem_id="validate")
                    run_btn = gr.Button("Run", variant="primary", elem_id="run")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
                    self.comps["preview_every"] = gr.Number(
                        PREVIEW_EVERY,
                        precision=0,
                        minimum=0,
                        elem_id="preview-every",
                        label="preview every N steps (0: none)",
                        info="the clean image each step predicts, decoded by the VAE",
                    )
                with gr.Row(equal_height=False):
                    self.status = gr.Markdown(elem_id="status", min_height=120)
                    self.preview = gr.Image(
                        label="preview while sampling",
                        type="pil",
                        interactive=False,
                        height=220,
                        elem_id="preview",
                        buttons=[],
                    )
                    self.images = gr.Gallery(
                        label="images",
                        columns=4,
                        fit_columns=False,  # one image is not stretched past the box (its caption cut off)
                        height=260,
                        object_fit="contain",
                        elem_id="images",
                        scale=2,
                    )
                with gr.Row():
                    with gr.Column(scale=1):
                        gr.Markdown("### Models")
                        self.comps["n_models"] = n_models = gr.Slider(
                            1, MAX_MODELS, value=2, step=1, label="number of models", elem_id="n-models"
                        )
                        self.error_box("models")
                        for i in range(MAX_MODELS):
                            model, prompt = DEFAULT_MODELS[i] if i < len(DEFAULT_MODELS) else ("", "")
                            with gr.Group(visible=i < 2) as g:
                                self.model_slot(i, model, prompt)
                            self.slots.append(g)
                        self.fold("merges: models merged before sampling", "merges-fold", "", forms.recipe_widgets())
                    with gr.Column(scale=2):  # the method's form: its tables and canvas want the room
                        gr.Markdown("### Method")
                        self.comps["method"] = method = gr.Dropdown(list(METHODS), value="snb", label="method", elem_id="method")
                        self.summary = gr.Markdown(self.method_summary("snb"))
                        for name in METHODS:
                            layers = forms.canvas_layers(self.widgets[name])
                            with gr.Group(visible=name == "snb") as g:
                                for w in self.widgets[name]:
                                    # the canvas above the first table that paints: rows added below never move it
                                    if layers and w.name == layers[0].name:
                                        self.canvas_tools(name, layers)
                                    self.param_component(name, w)
                                    self.error_box(f"{name}:params.{w.name}")
                                if not self.widgets[name]:
                                    gr.Markdown("no parameters")
                            self.groups[name] = g
                    with gr.Column(scale=1):
                        gr.Markdown("### Sampling")
                        sampling = forms.sampling_widgets()
                        self.section(
                            "sampling.", [w for w in sampling if w.name in forms.SAMPLING_MAIN], {"num_inference_steps": 10}
                        )
                        more = [w for w in sampling if w.name not in forms.SAMPLING_MAIN]
                        self.fold(f"more: {', '.join(w.name for w in more)}", "sampling-fold", "sampling.", more)
                        self.error_box("sampling")
                        runtime = forms.runtime_widgets()
                        self.fold(
                            f"runtime: {', '.join(w.name for w in runtime)}", "runtime-fold", "runtime.", runtime, "runtime"
                        )
                # full width and tall: a strip of masks or a map with its legend is read at its own size
                self.pictures = gr.Gallery(
                    label="method pictures (SNB masks, AMDM strip, AFA maps, region weights)",
                    columns=2,
                    height=560,
                    object_fit="contain",
                    elem_id="pictures",
                )
                with gr.Row():
                    self.recipe_file = gr.File(label="recipe (YAML)", elem_id="recipe-file")
                    self.png_files = gr.File(label="PNGs (each carries its recipe)", file_count="multiple", elem_id="png-files")
                with gr.Row():
                    restore = gr.File(
                        label="Drop a PNG made by multifusion (or a recipe .yaml) to restore its recipe",
                        type="filepath",
                        elem_id="restore",
                    )
                    self.error_box("restore")
            with gr.Tab("Compare", id="compare"):
                gr.Markdown(
                    "The models, prompts, sampling settings and seeds of the Compose tab, through several methods side by "
                    "side (each with its parameters from the Compose tab); zoo models are scored by the zoo's judge."
                )
                cmp_methods = gr.CheckboxGroup(
                    list(METHODS), value=["average", "snb"], label="methods", elem_id="compare-methods"
                )
                cmp_btn = gr.Button("Compare", variant="primary", elem_id="compare-run")
                cmp_status = gr.Markdown(elem_id="compare-status")
                cmp_gallery = gr.Gallery(
                    # a quarter of the width each, never stretched to fill the row: a thumbnail (and the
                    # caption at its foot) stays inside the gallery's box
                    label="side by side",
                    columns=4,
                    fit_columns=False,
                    height="auto",
                    object_fit="contain",
                    elem_id="compare-images",
                )
                # hidden until a run fills it (empty, it shows placeholder headers "1 2 3")
                cmp_scores = gr.Dataframe(
                    label="judge scores (zoo models)", elem_id="compare-scores", interactive=False, visible=False
                )

            inputs = set(self.comps.values())
            errs = self.error_outputs()
            n_models.change(lambda n: [gr.update(visible=i < int(n)) for i in range(MAX_MODELS)], n_models, self.slots)
            method.change(
                lambda m: [gr.update(visible=k == m) for k in self.groups] + [self.method_summary(m)],
                method,
                list(self.groups.values()) + [self.summary],
            )
            for key, comp in self.comps.items():  # an edited field's error box empties at once
                box = self.errors.get(forms.error_box_of(key) or "")
                if box is not None:
                    comp.input(lambda: gr.update(value="", visible=False), None, box, queue=False, show_progress="hidden")
            validate_btn.click(self.on_validate, inputs, errs + [self.status])
            run_event = run_btn.click(
                self.on_run,
                inputs,
                errs + [self.status, self.images, self.pictures, self.recipe_file, self.png_files, self.preview],
                show_progress_on=[self.status],
            )  # the previews stay in view beside the bar
            cmp_event = cmp_btn.click(self.on_compare, inputs | {cmp_methods}, [cmp_status, cmp_gallery, cmp_scores])
            cancel_btn.click(
                self.on_cancel, None, self.status, cancels=[run_event, cmp_event], concurrency_limit=None, queue=False
            )
            # the drop box empties itself after reading, ready for the next file
            # what the last click or drag did no longer applies to a restored recipe
            said = [cv["said"] for cv in getattr(self, "_canvases", [])]
            restore.upload(
                lambda path: self.on_restore(path) + [""] * len(said),
                restore,
                [self.comps[k] for k in self.comps] + errs + [restore, self.status] + said,
            )
            self._cmp_methods = cmp_methods
        return demo

    def canvas_tools(self, method: str, layers: list[forms.Layer]) -> None:
        """The canvas of a method's box tables: a live preview (snapped to the latent grid,
        uncovered pixels hatched, image regions and rerolls shown), boxes drawn by two clicks or
        a drag, moved or resized by dragging (canvas.js sends the drag, `forms.drag_edit` applies
        it), and a tiles helper."""
        gr.Markdown(
            "**Canvas.** Drag a box to move it, its corner to resize it; drag on empty canvas (or Shift-drag) or click "
            "two corners to add a region. Everything snaps to the latent grid; edit prompts and models in the tables."
        )
        preview = gr.Image(
            label="canvas",
            interactive=False,
            type="pil",
            elem_id=f"canvas-{method}",
            elem_classes=["mf-canvas"],
            buttons=[],
        )
        said = gr.Markdown(elem_id=f"canvas-said-{method}")  # what the last click or drag did
        notes = gr.Markdown(elem_id=f"canvas-notes-{method}")
        # what the drag script reads (the boxes) and writes (a drag): in the page, never shown
        state = gr.Textbox(elem_id=f"canvas-state-{method}", elem_classes=["mf-hidden"], show_label=False, container=False)
        dragged = gr.Button(elem_id=f"canvas-dragged-{method}", elem_classes=["mf-hidden"])
        drag = gr.Textbox(elem_classes=["mf-hidden"], show_label=False, container=False)
        corner = gr.State(None)
        with gr.Accordion("tiles helper", open=False):
            with gr.Row():
                t_rows, t_cols = gr.Number(1, label="rows", precision=0), gr.Number(2, label="columns", precision=0)
                t_h, t_w = gr.Number(64, label="tile height", precision=0), gr.Number(40, label="tile width", precision=0)
                t_ov = gr.Number(16, label="overlap", precision=0)
            tiles_btn = gr.Button("Fill the table with tiles (and set the canvas size)")
        self._canvases = getattr(self, "_canvases", [])
        self._canvases.append(
            dict(
                method=method,
                layers=layers,
                preview=preview,
                notes=notes,
                said=said,
                state=state,
                dragged=dragged,
                drag=drag,
                corner=corner,
                tiles_btn=tiles_btn,
                tile_inputs=[t_rows, t_cols, t_h, t_w, t_ov],
            )
        )

    def layer_items(self, method: str, layers: list[forms.Layer], tables: list) -> list[tuple[forms.Layer, list[dict]]]:
        ws = {w.name: w for w in self.widgets[method]}
        return [(layer, self.table_items(ws[layer.name], rows)) for layer, rows in zip(layers, tables)]

    def tables_of(self, method: str, layered: list[tuple[forms.Layer, list[dict]]]) -> list:
        ws = {w.name: w for w in self.widgets[method]}
        return [forms.to_widget(ws[layer.name], items) for layer, items in layered]

    def canvas_view(
        self, method: str, layered: list[tuple[forms.Layer, list[dict]]], others: dict[str, Any], n_models, h, wd, model0
    ) -> tuple[int, tuple[int, int], list[forms.Placed] | None, str | None]:
        """(VAE factor, (height, width), the placed regions, why they do not place) of the canvas
        the form describes: the method places its regions (tables, tiles, a background) from the
        form's params as a run would (`forms.method_regions`, on the method's own canvas when it
        fixes one); until the params validate, no placed regions and the library's error."""
        fac, (H, W) = self.canvas_size(h, wd, model0)
        m = METHODS[method]
        try:
            params = forms.params_from_widgets(m, others)
            params.update({layer.name: items for layer, items in layered})
            placed, (H, W) = forms.method_regions(m, params, int(n_models or 1), H, W, fac)
        except MultifusionError as err:
            return fac, (H, W), None, str(err)
        return fac, (H, W), placed, None

    def canvas_shown(self, method: str, layered, others: dict[str, Any], n_models, h, wd, model0) -> list:
        """The canvas picture, its notes and the drag script's state for the form's values."""
        fac, (H, W), placed, problem = self.canvas_view(method, layered, others, n_models, h, wd, model0)
        im, text = forms.regions_preview(layered, H, W, fac, placed=placed, problem=problem)
        return [im, text, forms.canvas_state(layered, H, W, fac, forms.preview_scale(H, W))]

    def wire_canvases(self, demo: gr.Blocks) -> None:
        """Canvas events need the sampling and model components, built after the method forms.
        They run outside the queue's one-at-a-time limit: pure and quick, they answer during a run.
        Every parameter of the method is an input: tiles and a background place regions too."""
        size = [
            self.comps["n_models"],
            self.comps["sampling.height"],
            self.comps["sampling.width"],
            self.comps["models[0].model"],
        ]
        p0 = self.comps["models[0].prompt"]
        with demo:
            for cv in getattr(self, "_canvases", []):
                method, layers = cv["method"], cv["layers"]
                tables = [self.comps[f"params:{method}:{layer.name}"] for layer in layers]
                names = [w.name for w in self.widgets[method] if w.name not in {layer.name for layer in layers}]
                others = [self.comps[f"params:{method}:{name}"] for name in names]
                n, k = len(tables), len(tables) + len(names)
                shown = [cv["preview"], cv["notes"], cv["state"]]
                fast = dict(concurrency_limit=None, show_progress="hidden")

                def split(args, method=method, layers=layers, names=names, n=n, k=k):
                    """(layered tables, other params by name, n_models, height, width, model 0) of the inputs."""
                    return (self.layer_items(method, layers, args[:n]), dict(zip(names, args[n:k])), *args[k : k + 4])

                def draw(*args, method=method, split=split):
                    return self.canvas_shown(method, *split(args))

                def click(evt: gr.SelectData, first, *args, method=method, layers=layers, split=split, n=n):
                    layered, *rest = split(args[:-1])
                    prompt0 = args[-1]
                    fac, (H, W), _, _ = self.canvas_view(method, layered, *rest)
                    scale = forms.preview_scale(H, W)
                    x, y = evt.index[0], evt.index[1]
                    if first is None:
                        return (
                            [(x, y)]
                            + list(args[:n])
                            + self.canvas_shown(method, layered, *rest)
                            + [f"first corner at row {y // scale}, col {x // scale}: click the opposite corner"]
                        )
                    box = forms.box_from_clicks(first, (x, y), fac, H, W, scale)
                    layered[0] = (layered[0][0], layered[0][1] + [{**box, "prompt": prompt0 or "", "model": 0}])
                    said = f"{layers[0].name}[{len(layered[0][1]) - 1}] added (model 0's prompt): edit its prompt and model in the table"
                    return [None] + self.tables_of(method, layered) + self.canvas_shown(method, layered, *rest) + [said]

                def dragged(payload, *args, method=method, split=split, n=n):
                    layered, *rest = split(args[:-1])
                    prompt0 = args[-1]
                    try:
                        move = json.loads(payload)
                        start, end = [tuple(float(v) for v in move[key]) for key in ("from", "to")]
                    except (TypeError, ValueError, KeyError):
                        return [gr.update() for _ in range(n + 4)]
                    fac, (H, W), _, _ = self.canvas_view(method, layered, *rest)
                    layered, said = forms.drag_edit(
                        layered,
                        start,
                        end,
                        fac,
                        H,
                        W,
                        forms.preview_scale(H, W),
                        {"prompt": prompt0 or "", "model": 0},
                        draw=bool(move.get("draw")),
                    )
                    return self.tables_of(method, layered) + self.canvas_shown(method, layered, *rest) + [said]

                def tiles(r, c, th, tw, ov, prompt0, method=method, layers=layers):
                    items = forms.tile_rows(int(r), int(c), int(th), int(tw), int(ov), prompt0 or "")
                    from multifusion.noise.methods import TilesParams

                    H, W = TilesParams(
                        prompts=[[""] * int(c)] * int(r),
                        tile_height=int(th),
                        tile_width=int(tw),
                        tile_row_overlap=int(ov),
                        tile_col_overlap=int(ov),
                    ).canvas()
                    return self.tables_of(method, [(layers[0], items)])[0], H, W

                ins = tables + others + size
                for c in ins:
                    c.change(draw, ins, shown, **fast)
                demo.load(draw, ins, shown, **fast)
                cv["preview"].select(click, [cv["corner"]] + ins + [p0], [cv["corner"]] + tables + shown + [cv["said"]], **fast)
                cv["dragged"].click(
                    dragged,
                    [cv["drag"]] + ins + [p0],
                    tables + shown + [cv["said"]],
                    js="(drag, ...rest) => [window.multifusionDrag, ...rest]",
                    **fast,
                )
                cv["tiles_btn"].click(
                    tiles,
                    cv["tile_inputs"] + [p0],
                    [tables[0], self.comps["sampling.height"], self.comps["sampling.width"]],
                    **fast,
                )

    # ---- reading the form ----------------------------------------------------------------------

    @staticmethod
    def method_summary(name: str) -> str:
        m = METHODS[name]
        return f"**{name}** ({m.meets}): {m.summary}"

    @staticmethod
    def table_items(w: forms.Widget, rows) -> list[dict]:
        v = forms.from_widget(w, rows)
        return [] if v is PydanticUndefined else v

    def canvas_size(self, h, wd, model0: str | None) -> tuple[int, tuple[int, int]]:
        """(VAE factor, (height, width)) the canvas shows: the form's size where it reads as a
        positive number, else the first model's native size."""
        fac, native = forms.canvas_facts(model0)

        def side(v) -> int:
            try:
                return min(int(float(v)), 4096) if float(v) > 0 else native
            except (TypeError, ValueError):
                return native

        return fac, (side(h), side(wd))

    def error_outputs(self) -> list:
        """What `error_updates` fills: every error box, then each collapsed accordion."""
        return list(self.errors.values()) + [acc for acc, _ in self.folds]

    def values(self, data: dict) -> dict[str, Any]:
        return {k: data.get(c) for k, c in self.comps.items()}

    def recipe(self, v: dict[str, Any], method: str | None = None) -> dict:
        return forms.recipe_from_form(v, method)

    def error_updates(self, routed: dict[str, list[str]] | None, method: str, opened: set[str] = frozenset()) -> list:
        """Updates of `error_outputs`: each routed error shown in its box (`general` when the form
        has none for it); an accordion opened when an error lies in it, or when it holds a form key
        of `opened` (a restored recipe sets that field), else left as the user has it."""
        routed = dict(routed or {})
        shown: dict[str, list[str]] = {}
        for key, lines in routed.items():
            target = f"{method}:{key}" if key.startswith("params.") else key
            shown.setdefault(target if target in self.errors else "general", []).extend(lines)
        boxes = [
            gr.update(value="\n\n".join(f"⚠ {ln}" for ln in shown[k]), visible=True)
            if k in shown
            else gr.update(value="", visible=False)
            for k in self.errors
        ]
        opened = set(opened) | set(shown)
        return boxes + [gr.update(open=True) if keys & opened else gr.update() for _, keys in self.folds]

    # ---- handlers ------------------------------------------------------------------------------

    def checked(self, v: dict) -> dict:
        """The form's recipe, validated as `multifusion validate` does; raises the library's errors."""
        return forms.check_form(v)

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

        key = recipe.model_dump_json(
            include={"models", "merges", "runtime"},
            exclude={"models": {"__all__": {"prompt", "negative_prompt", "guidance_scale"}}},
        )
        if key not in self._handles:
            self._handles = {key: load_recipe_models(recipe)}  # one set of models kept at a time
        return self._handles[key]

    def generate(
        self,
        recipe_dict: dict,
        out: Path,
        report: Callable[[tuple], None] | None = None,
        run_id: int | None = None,
        preview_every: int = 0,
    ) -> tuple[list, list, Path]:
        """Run a recipe: images (path, caption), method pictures (path, caption), the recipe file.
        `report` gets ("note", text) for what the page should say before sampling (models a
        merge would average without a common ancestor), ("progress", (done, total), text) after
        every step, counted in image steps (a batch's images advance together) with the run's
        time in the text, and, every `preview_every` steps but the last, ("preview", picture,
        "step k/n"): what the step predicts for each image (`viz.x0_previews`), in one labelled
        grid."""
        from multifusion.api import image_name, write_images
        from multifusion.io import grid, write_text
        from multifusion.recipe import parse_recipe
        from multifusion.viz import x0_previews

        recipe = parse_recipe(recipe_dict)
        models = self.handles(recipe)
        stem = recipe.method
        if report is not None and (note := self.lineage_note(recipe, models)):
            report(("note", note))
        recipe_path = write_text(
            out / f"{stem}.yaml", yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False)
        )
        steps, total = recipe.sampling.num_inference_steps, recipe.sampling.num_images
        images, pictures = [], []
        done = 0
        start = time.monotonic()  # the run's clock: Gradio's own restarts with each preview sent

        def callback(step, chunk):
            if run_id is not None and run_id <= self.cancelled_upto:
                raise Cancelled()
            if report is None:
                return
            # A batch's images are denoised together: each step advances all of them.
            report(
                (
                    "progress",
                    (done * steps + len(chunk) * (step.step + 1), total * steps),
                    f"{stem}: seeds {chunk[0]}-{chunk[-1]}, step {step.step + 1}/{steps}, {time.monotonic() - start:.1f} s",
                )
            )
            if preview_every > 0 and (step.step + 1) % preview_every == 0 and step.step + 1 < step.num_steps:
                # The run's VAE made ready as the run makes it to decode (under offload: brought in).
                shown = x0_previews(step, models[0].ready_vae(recipe.runtime.vae_device), [f"seed {s}" for s in chunk])
                label = f"step {step.step + 1}/{steps}"
                report(("preview", grid([[im for im, _ in shown]], [label], [c for _, c in shown]), label))

        # A fresh folder per run: nothing to resume.
        for written in write_images(
            recipe,
            out,
            lambda seed: image_name(stem, seed),
            models=models,
            batch_size=4,
            overwrite=True,
            pictures=True,
            callback=callback,
            progress=False,
        ):
            images += [(str(path), f"{stem} seed {seed}") for path, seed in zip(written.paths, written.result.seeds)]
            pictures += [(str(p), p.stem) for p in written.pictures if p.suffix == ".png"]
            done += len(written.result.seeds)
        return images, pictures, recipe_path

    @staticmethod
    def lineage_note(recipe, models) -> str | None:
        """For a method meeting in the weights: which models share no ancestor with the first
        (`weights.lineage`), whose merge averages unrelated weights into noise."""
        if METHODS[recipe.method].meets != "weights":
            return None
        from multifusion.weights.lineage import RELATED_COSINE, unrelated

        far = unrelated([m.unet.state_dict() for m in models])
        if not far:
            return None
        named = ", ".join(f"models[{i}] ({recipe.models[i].model}, weight cosine {cos:.2f})" for i, cos in far)
        return (
            f"⚠ {named} share(s) no ancestor with models[0] ({recipe.models[0].model}): fine-tunes of one base lie "
            f"above {RELATED_COSINE} of each other; a {recipe.method} averages unrelated weights, and the images come out as noise"
        )

    def on_run(self, data: dict, progress=gr.Progress()):
        """Sample in a worker thread; stream its progress and previews to the page as they come
        (a generator: each `yield` updates the page)."""
        v = self.values(data)
        self.run_id += 1
        run_id = self.run_id
        began = time.monotonic()
        keep = [gr.update()] * 5  # images, pictures, recipe file, PNGs, preview
        nothing = [None, None, None, None, None]
        try:
            recipe = self.checked(v)
        except MultifusionError as err:
            yield self.error_updates(forms.route_errors(err), v["method"]) + ["**not run**: see the fields marked ⚠"] + nothing
            return
        try:
            every = max(0, int(v.get("preview_every") or 0))
        except (TypeError, ValueError):
            every = 0
        yield self.error_updates(None, v["method"]) + ["running…"] + keep[:4] + [None]
        out = Path(tempfile.mkdtemp(prefix="run-", dir=self.out_root))
        events: queue.Queue = queue.Queue()
        result: dict[str, Any] = {}

        def work():
            try:
                result["done"] = self.generate(recipe, out, events.put, run_id, every)
            except Exception as err:  # noqa: BLE001 (handed to the page below, as the library's or as a failure)
                result["error"] = err
            finally:
                events.put(None)

        worker = threading.Thread(target=work, name=f"multifusion-run-{run_id}", daemon=True)
        worker.start()
        notes: list[str] = []
        try:
            while (event := events.get()) is not None:
                if event[0] == "note":
                    notes.append(event[1])
                    yield [gr.update()] * len(self.error_outputs()) + ["running…\n\n" + "\n\n".join(notes)] + keep
                elif event[0] == "progress":
                    progress(event[1], desc=event[2], unit="image steps")
                elif event[0] == "preview":
                    yield [gr.update()] * (len(self.error_outputs()) + 1) + keep[:4] + [event[1]]  # the bar says the step
        finally:
            if worker.is_alive():  # the page left or cancelled: the worker stops at its next step
                self.cancelled_upto = max(self.cancelled_upto, run_id)
        err = result.get("error")
        if isinstance(err, MultifusionError):
            yield self.error_updates(forms.route_errors(err), v["method"]) + ["**not run**: see the fields marked ⚠"] + nothing
        elif isinstance(err, Cancelled):
            yield self.error_updates(None, v["method"]) + ["cancelled"] + nothing
        elif err is not None:  # not the user's input: say what failed, without a traceback
            yield self.error_updates({"general": [f"{type(err).__name__}: {err}"]}, v["method"]) + ["**failed**"] + nothing
        elif "done" not in result:  # the worker ended without an answer (interpreter shutting down)
            yield self.error_updates(None, v["method"]) + ["**failed**: the run stopped"] + nothing
        else:
            images, pictures, recipe_path = result["done"]
            took = time.monotonic() - began  # loading included: what the person waited
            status = "\n\n".join(
                [f"done in {took:.1f} s: {len(images)} image(s) with `{v['method']}`; each PNG carries its recipe", *notes]
            )
            yield self.error_updates(None, v["method"]) + [
                status,
                images,
                pictures or None,
                str(recipe_path),
                [p for p, _ in images],
                None,  # the preview of a step is gone: the images are final
            ]

    def on_restore(self, path: str | None):
        """The form holding a dropped file's recipe, and the status saying what was restored;
        the file's error at the drop box when it holds none."""
        keys = list(self.comps)
        keep = [gr.update() for _ in keys]
        if not path:
            return keep + self.error_updates(None, "") + [None, gr.update()]
        name = Path(path).name
        try:
            values, notes = forms.restored_form(forms.read_recipe_file(path))
        except MultifusionError as err:
            said = f"**not restored**: {name} holds no recipe the form can take (see the drop box)"
            return keep + self.error_updates({"restore": [f"restore: {err}"]}, "") + [None, said]
        changed = {k for k, v in values.items() if k in self.widget_of and v != self.widget_of[k].initial()}
        routed = {"runtime": notes} if notes else None
        said = f"restored the recipe of `{name}`: method `{values['method']}`, {values['n_models']} model(s); press Run"
        return (
            [values[k] if k in values else gr.update() for k in keys]
            + self.error_updates(routed, values["method"], changed)
            + [None, said]
        )

    def on_compare(self, data: dict, progress=gr.Progress()):
        v = self.values(data)
        chosen = data.get(self._cmp_methods) or []
        if len(chosen) < 2:
            return "choose two or more methods", None, gr.update(visible=False)
        self.run_id += 1
        run_id = self.run_id
        gallery, rows, problems, notes = [], [], [], []
        for name in chosen:
            try:
                recipe = forms.check_form(v, name)
                out = Path(tempfile.mkdtemp(prefix=f"compare-{name}-", dir=self.out_root))
                images, _, _ = self.generate(
                    recipe,
                    out,
                    lambda e: progress(e[1], desc=e[2]) if e[0] == "progress" else notes.append(f"- **{name}**: {e[1]}"),
                    run_id,
                )
            except MultifusionError as err:
                problems.append(f"- **{name}**: " + "; ".join(forms.error_lines(err)))
                continue
            except Cancelled:
                return "cancelled", None, gr.update(visible=False)
            gallery += images
            rows += self.scores(name, recipe, images)
        status = "\n".join(problems + notes) if problems or notes else f"compared {len(chosen)} methods"
        import pandas as pd

        return (
            status,
            gallery or None,
            gr.update(value=pd.DataFrame(rows), visible=True) if rows else gr.update(value=None, visible=False),
        )

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


MAX_UPLOAD = "64mb"
"""The largest file the page takes (a recipe, or a PNG carrying one: a 4096x4096 PNG stays below)."""


def launch(model_dirs: list[str] | tuple = (), port: int = 7860, host: str = "127.0.0.1") -> None:
    from starlette.middleware import Middleware

    from multifusion.ui.guard import Guard, host_names

    demo = build_app(model_dirs)
    app = demo.multifusion_app  # type: ignore[attr-defined]
    demo.queue(default_concurrency_limit=1).launch(
        app_kwargs={"middleware": [Middleware(Guard, names=host_names(host))]},
        max_file_size=MAX_UPLOAD,
        server_name=host,
        server_port=port,
        inbrowser=False,
        share=False,
        footer_links=[],
        ssr_mode=False,
        **app.page,
        allowed_paths=[str(app.out_root)],
        quiet=False,
    )
