"""Whole-model merges: checked first, then streamed tensor by tensor into a diffusers folder.

`plan_merge` checks everything before a byte is written: the method and its weights against the
number of models, the block weights against the UNet's blocks, and the models against each
other (configs, prediction type, every tensor's name and shape). `merge_models` then reads one
parameter at a time from every input's safetensors files (`safetensors.safe_open`, memory-mapped;
the files are reopened every 1/(4N) of a component so that mapped pages do not pile up), merges
it with `multifusion.weights.merge` and appends it to the output file, whose header is written
first from the known shapes. Peak memory stays below one model whatever the number N of models.
The output folder is built under a temporary name and renamed at the end, so an interrupted
merge leaves nothing.

What is merged, following A1111's merger and the AFA paper's baselines (arXiv 2405.17082):
the denoiser (the UNet, or the transformer of an SD3 or FLUX pipeline; per block with block
weights), the text encoder(s), T5 included, with the BASE weight (or the models' weights in a
plain merge), unless `text_encoder="first"` keeps the first model's.
Deviation from A1111, which merges the VAE too: the VAE, tokenizer and scheduler are the first
model's, as fine-tunes of one base share them. A component identical in every model is copied,
not merged, and so is every tensor identical in every model (exact, whatever the weights).

`merge_in_memory` runs the same per-parameter merge into the first model's loaded modules and
returns a `ModelHandle`; it agrees with a merged folder loaded by `load_models` bit for bit.
"""

from __future__ import annotations

import dataclasses
import filecmp
import hashlib
import json
import math
import os
import shutil
import struct
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from multifusion.errors import IncompatibleModelsError, ModelLoadError, RecipeError, did_you_mean
from multifusion.families.blocks import BlockLayout
from multifusion.io import file_fingerprint
from multifusion.weights.merge import MERGE_METHODS  # noqa: F401  (registers the built-in methods)
from multifusion.weights.presets import BlockWeights, block_weights
from multifusion.weights.registry import MergeSpecError, get_merge_method

if TYPE_CHECKING:
    from multifusion.handles import ModelHandle

TEXT_ENCODER = ("merge", "first")
MERGE_JSON = "merge.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".index.json")


def config_files(src: Path, out: Path) -> None:
    """A component folder `out` holding `src`'s files other than weights (configs, tokenizer
    files): the merged or LoRA-fused weights are written beside them."""
    out.mkdir()
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith(".") and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, out / f.name)


# Config keys that describe how a file was saved, not the architecture.
_CONFIG_NOISE = ("transformers_version", "dtype", "torch_dtype", "architectures")
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class MergeSpec:
    """How to merge: the one description of a merge (a recipe's `merges:` entry, the `merge` and
    `mbw` methods' params and merge.json all become one). Checked on construction against the
    method's registered signature (`weights.registry`); against the models (their number, the
    UNet's blocks) by `plan_merge`.

    - `method`: a registered merge method (`weights.merge`: weighted_sum, add_difference, ties,
      dare, dare_ties, model_stock, slerp, geometric_median), "did you mean" on typos.
    - weighted_sum: `weights`, one per model in the order the models are named (normalised;
      default equal), or `blocks` for two models: per-block share of the second model.
    - add_difference: models (A, B, C) give A + alpha (B - C); `blocks` gives alpha per block.
    - `options`: the other methods' hyper-parameters by name (`density`, `drop_rate`, `merge_seed`,
      `t`, `iterations`, and `alpha` for TIES / DARE), checked against their declared ranges.
    - `blocks`: a preset name ("RING08_SOFT"), an A1111 weight string or a list of numbers; it
      sets the method's ratio per block (weights, alpha or t).
    - `text_encoder`: "merge" (with BASE, or the models' weights) or "first" (model 0's).
    """

    method: str = "weighted_sum"
    weights: tuple[float, ...] | None = None
    alpha: float | None = None
    blocks: str | tuple[float, ...] | None = None
    text_encoder: str = "merge"
    options: tuple[tuple[str, float | int], ...] | Mapping[str, float | int] = ()

    def __post_init__(self):
        method = get_merge_method(self.method)
        if self.text_encoder not in TEXT_ENCODER:
            raise RecipeError(f"text_encoder must be one of {TEXT_ENCODER}, got {self.text_encoder!r}")
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if self.blocks is not None and not isinstance(self.blocks, str):
            object.__setattr__(self, "blocks", tuple(float(w) for w in self.blocks))
        options = dict(self.options)
        for name in ("weights", "alpha"):
            if name in options:
                raise MergeSpecError(name, f"give `{name}` as its own field of the spec, not in options")
        object.__setattr__(self, "options", tuple(sorted(options.items())))
        method.check(self.hyper, blocks=self.blocks is not None)

    @property
    def merge_method(self):
        """The registered `MergeMethod`."""
        return get_merge_method(self.method)

    @property
    def hyper(self) -> dict:
        """The hyper-parameters given (weights, alpha, options), by name."""
        given = {"weights": self.weights, "alpha": self.alpha}
        return {**{k: v for k, v in given.items() if v is not None}, **dict(self.options)}

    def resolved(self) -> dict:
        """Every hyper-parameter of the method, defaults filled in (what merge.json records)."""
        return self.merge_method.check(self.hyper, blocks=self.blocks is not None)

    def check_models(self, n: int) -> None:
        """MergeSpecError (naming the field) when `n` models do not fit this spec."""
        if n < 1:
            raise MergeSpecError("models", "name at least one model", "name at least one model")
        self.merge_method.check(self.hyper, n, blocks=self.blocks is not None)

    def model_count_error(self, n: int) -> str | None:
        """Why `n` models do not fit this spec, or None."""
        try:
            self.check_models(n)
        except MergeSpecError as err:
            return str(err)
        return None

    def as_json(self) -> dict:
        """The spec as JSON (`MergeSpec(**spec.as_json())` rebuilds it)."""
        out = dataclasses.asdict(self)
        out["options"] = dict(self.options)
        return out


def tensor_seed(seed: int, component: str, name: str) -> int:
    """The seed of one tensor's random draws: fixed by the merge's seed and the tensor's name,
    so the streamed folder and the in-memory merge draw the same whatever order they visit."""
    digest = hashlib.sha256(f"{seed}/{component}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class Merge:
    """A merged model as the input of another merge (a recipe's `merge:NAME` inside `merges:`):
    its models (names, or merges again) and its spec. It is never written: the outer merge reads
    each of its tensors as it is computed, one at a time, so a merge of merges streams like one
    merge. `where` locates its errors (`merges.NAME`)."""

    models: tuple[str | Merge, ...]
    spec: MergeSpec = dataclasses.field(default_factory=MergeSpec)
    where: str = "merge"

    def __post_init__(self):
        object.__setattr__(self, "models", tuple(self.models))

    @property
    def first_leaf(self) -> str:
        """The model whose configs, VAE, tokenizer and scheduler the merge keeps (model 0's, down the tree)."""
        return first_leaf(self.models[0])

    def leaves(self) -> list[str]:
        return [x for m in self.models for x in ([m] if isinstance(m, str) else m.leaves())]

    def as_json(self) -> dict:
        return {
            "merge": self.where,
            "spec": self.spec.as_json(),
            "hyper": self.spec.resolved(),  # defaults filled in: a random inner merge's seed is here
            "models": [_model_json(m) for m in self.models],
        }


def first_leaf(model: str | Merge) -> str:
    return model if isinstance(model, str) else model.first_leaf


def _model_json(model: str | Merge):
    return model if isinstance(model, str) else model.as_json()


def merge_tree(name: str, entries: Mapping, prefix: str = "merge:", where: str = "merges") -> Merge:
    """The `Merge` named `name` among `entries` (a recipe's `merges:`: name -> entry with `models`
    and the fields of MergeSpec, read by `spec_of`), its `prefix`NAME models resolved to their
    merges, recursively. Checked before any file is opened: a name not defined ("did you mean"),
    a merge naming itself, a cycle (`a` -> `b` -> `a`), each an error naming the field
    (`merges.a.models[1]`); a bad spec names `merges.NAME`."""

    def build(name: str, path: tuple[str, ...]) -> Merge:
        entry = entries[name]
        models: list[str | Merge] = []
        for j, model in enumerate(entry.models):
            field = f"{where}.{name}.models[{j}]"
            if not model.startswith(prefix):
                models.append(model)
                continue
            inner = model[len(prefix) :]
            if inner == name:
                raise RecipeError(f"{field}: {model!r} is this merge itself; a merge cannot take itself as an input")
            if inner in path:
                loop = " -> ".join((*path[path.index(inner) :], name, inner))
                raise RecipeError(
                    f"{field}: {model!r} makes a cycle ({loop}); merges may nest but not loop: "
                    f"name a model or another merge instead"
                )
            if inner not in entries:
                known = f" (merges: {', '.join(entries)})" if entries else ""
                raise RecipeError(f"{field}: no merge named {inner!r}{known}{did_you_mean(inner, entries)}")
            models.append(build(inner, (*path, name)))
        try:
            spec = spec_of(entry)
        except MergeSpecError as err:
            raise RecipeError(err.at(f"{where}.{name}")) from None
        return Merge(tuple(models), spec, f"{where}.{name}")

    if name not in entries:
        known = f" (merges: {', '.join(entries)})" if entries else f"; define it under `{where}:`"
        raise RecipeError(f"no merge named {name!r}{known}{did_you_mean(name, entries)}")
    return build(name, ())


@dataclass(frozen=True)
class FileSource:
    """A component's tensors as a model's safetensors files hold them (tensor name -> file)."""

    files: Mapping[str, Path]
    leaves = 1  # files opened per tensor (bounds what a chunk holds mapped)

    def reader(self, stack: ExitStack):
        """A function name -> tensor, opening each file once within `stack` (memory-mapped)."""
        from safetensors import safe_open

        handles: dict[Path, object] = {}

        def read(name: str) -> torch.Tensor:
            path = self.files[name]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, framework="pt"))
            return handles[path].get_tensor(name)

        return read


@dataclass(frozen=True)
class MergedSource:
    """A merged component of an inner merge, computed tensor by tensor as the outer merge reads
    it (never held whole, never written)."""

    plan: MergePlan
    component: Component

    @property
    def leaves(self) -> int:
        return sum(s.leaves for s in self.component.sources)

    def reader(self, stack: ExitStack):
        readers = [s.reader(stack) for s in self.component.sources]
        return lambda name: merged_tensor(self.plan, self.component.name, name, [r(name) for r in readers])


Source = FileSource | MergedSource


@dataclass(frozen=True)
class Component:
    """One pipeline component in the plan: merged tensor by tensor, or copied from model 0."""

    name: str
    action: str  # "merge" or "copy"
    reason: str
    sources: tuple[Source, ...] = ()  # per model (a copy: model 0's only): where its tensors come from
    header: tuple[tuple[str, str, tuple[int, ...]], ...] = ()  # (name, dtype, shape) of model 0
    out_file: str = ""


@dataclass(frozen=True)
class MergePlan:
    """Everything a merge will do, decided and checked before anything is written."""

    spec: MergeSpec
    models: tuple[str, ...]
    folders: tuple[Path, ...]
    components: tuple[Component, ...]
    layout: BlockLayout | None = None
    blocks: Mapping[str, float] | None = None
    base: float | None = None
    blocks_note: str = ""
    t5: float | None = None
    denoiser: str = "unet"
    leaves: tuple[Path, ...] = ()  # every input folder, down the tree of merges

    def streamed(self, component: Component) -> bool:
        """Whether `component` is written tensor by tensor: merged, or model 0's when model 0
        is a merge (a file copy otherwise)."""
        return component.action == "merge" or any(isinstance(s, MergedSource) for s in component.sources[:1])

    def weight(self, component: str, name: str) -> float | None:
        """The block weight of tensor `name` of `component` (None without block weights)."""
        if self.blocks is None:
            return None
        if component == self.denoiser:
            return self.blocks[self.layout.block_of(name)]
        w = self.t5 if component == self.layout.t5 and self.t5 is not None else self.base
        return w or 0.0

    def merge(self, component: str, name: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Tensor `name` of `component` merged from `tensors` (one per model) by the spec's method:
        its hyper-parameters, the ratio set from the tensor's block when there are block weights,
        and, for a random method, a generator seeded from the seed and the tensor's name."""
        method = self.spec.merge_method
        hyper = self.spec.resolved()
        w = self.weight(component, name)
        if w is not None:
            hyper[method.ratio] = method.block_ratio(w) if method.block_ratio is not None else w
        generator = None
        if method.random:
            generator = torch.Generator().manual_seed(tensor_seed(hyper["merge_seed"], component, name))
        return method(tensors, hyper, generator)

    def recipe(self) -> dict:
        """The merge as JSON: the spec (rebuilds with MergeSpec(**recipe["spec"])), resolved
        block weights, the inputs and what happened to each component."""
        out = {
            "format": "multifusion-merge",
            "version": 1,
            "spec": self.spec.as_json(),
            "hyper": self.spec.resolved(),  # defaults filled in: a random merge's seed is here
            "models": [_model_json(m) for m in self.models],
            "components": {c.name: f"{c.action}: {c.reason}" for c in self.components},
        }
        if self.blocks is not None:
            out["blocks"] = {"base": self.base, "weights": dict(self.blocks), "source": self.blocks_note}
            if self.t5 is not None:
                out["blocks"]["t5"] = self.t5
        return out


def spec_of(entry) -> MergeSpec:
    """The MergeSpec of a recipe's `merges.NAME` entry (`recipe.MergeEntry`: its fields, and any
    other keys as the method's hyper-parameters)."""
    blocks = entry.blocks if entry.blocks is None or isinstance(entry.blocks, str) else tuple(entry.blocks)
    weights = None if entry.weights is None else tuple(entry.weights)
    return MergeSpec(entry.method, weights, entry.alpha, blocks, entry.text_encoder, dict(entry.model_extra or {}))


def plan_merge(models: Sequence[str | Merge], spec: MergeSpec | None = None) -> MergePlan:
    """Check `spec` against `models` (names as `multifusion.loading.resolve` takes them: local
    diffusers folders or zoo:NAME; or `Merge`s, planned first, whose tensors the merge reads as
    they are computed) and decide what happens to each component. Reads configs and safetensors
    headers only. Raises RecipeError, ModelLoadError or IncompatibleModelsError."""
    from multifusion.loading import check_weight_files, family_of, resolve

    spec = spec or MergeSpec()
    spec.check_models(len(models))
    labels = [m if isinstance(m, str) else m.where for m in models]
    folders, inner = [], {}
    for i, model in enumerate(models):
        if not isinstance(model, str):
            try:
                inner[i] = plan_merge(model.models, model.spec)
            except (RecipeError, ModelLoadError, IncompatibleModelsError) as err:
                raise type(err)(f"{model.where}: {err}") from None
            folders.append(inner[i].folders[0])
            continue
        ref = resolve(model)
        if ref.kind not in ("folder", "zoo"):
            raise ModelLoadError(
                f"{model!r} is a {ref.kind.replace('_', '-')} model; merges read diffusers pipeline folders. Load it "
                "once and save it with `save_pretrained(folder, safe_serialization=True)`, then merge the folder"
            )
        try:  # a damaged file is named as `generate` names it, before any header is read
            check_weight_files(ref)
        except ModelLoadError as err:
            raise ModelLoadError(f"models[{i}].model: {err}") from None
        folders.append(Path(ref.location))
    index = [_model_index(f) for f in folders]
    family = family_of(resolve(first_leaf(models[0])))
    denoiser = family.denoiser_folder
    if denoiser not in index[0]:
        raise IncompatibleModelsError(f"{labels[0]!r} has no {denoiser}; merges combine diffusion pipelines")
    _check_same_prediction(labels, folders)

    layout = weights = None
    note = ""
    if spec.blocks is not None:
        layout = family.block_layout(_config(folders[0] / denoiser))
        weights, note = block_weights(spec.blocks, layout)
        weights.by_block(layout)  # checks the length
        _check_ratio(spec, weights, layout)

    def source(i: int, name: str) -> Source:
        if i not in inner:
            return FileSource(_tensor_files(folders[i] / name, labels[i]))
        c = next(c for c in inner[i].components if c.name == name)
        return MergedSource(inner[i], c) if c.action == "merge" else c.sources[0]

    components = []
    for name, library in index[0].items():
        if name != denoiser and not name.startswith("text_encoder"):
            components.append(Component(name, "copy", f"model 0's (only the {denoiser} and text encoders are merged)"))
            continue
        if name != denoiser and spec.text_encoder == "first":
            first = source(0, name)
            header = tuple((k, *v) for k, v in sorted(_source_header(first).items()))
            out_file = "model.safetensors" if library == "transformers" else "diffusion_pytorch_model.safetensors"
            components.append(Component(name, "copy", "model 0's (text_encoder='first')", (first,), header, out_file))
            continue
        for text, idx in zip(labels, index):
            if name not in idx:
                raise IncompatibleModelsError(f"{text!r} has no {name}; {labels[0]!r} has one, so they cannot be merged")
        out_file = "model.safetensors" if library == "transformers" else "diffusion_pytorch_model.safetensors"
        text_w = None if weights is None or name == denoiser else weights.text_weight(name, layout)
        sources = [source(i, name) for i in range(len(models))]
        components.append(_plan_component(name, labels, folders, sources, spec, text_w, out_file, name == denoiser))

    merged = next(c for c in components if c.name == denoiser)
    if layout is not None and merged.action == "merge":
        for tensor, _, _ in merged.header:
            layout.block_of(tensor)  # every denoiser parameter must have a block
    blocks = None if weights is None else weights.by_block(layout)
    return MergePlan(
        spec,
        tuple(models),
        tuple(folders),
        tuple(components),
        layout,
        blocks,
        None if weights is None else weights.base,
        note,
        None if weights is None else weights.t5,
        denoiser,
        tuple(p for i, f in enumerate(folders) for p in (inner[i].leaves if i in inner else (f,))),
    )


def local_layout(model: str) -> BlockLayout | None:
    """The block layout of `model`'s denoiser from its local config (a folder or zoo:NAME),
    without loading it; None when the config is not local or not readable (checked later, on
    loading)."""
    from multifusion.loading import family_of, resolve

    try:
        ref = resolve(model)
        if ref.kind not in ("folder", "zoo"):
            return None
        family = family_of(ref)
        return family.block_layout(_config(Path(ref.location) / family.denoiser_folder))
    except (ModelLoadError, IncompatibleModelsError, OSError, KeyError, ValueError):
        return None


def _plan_component(
    name: str,
    models: Sequence[str],
    folders: Sequence[Path],
    sources: Sequence[Source],
    spec: MergeSpec,
    base: float | None,
    out_file: str,
    is_denoiser: bool,
) -> Component:
    dirs = [f / name for f in folders]  # a merge's configs are its first model's
    headers = [_source_header(s) for s in sources]
    for text, h in zip(models[1:], headers[1:]):
        _check_same_tensors(name, models[0], headers[0], text, h)
    configs = [_config(d) for d in dirs]  # same shapes can still mean another architecture
    for text, cfg in zip(models[1:], configs[1:]):
        _check_same(f"{name} config", models[0], configs[0], text, cfg)
    header = tuple((k, *headers[0][k]) for k in sorted(headers[0]))
    if not is_denoiser and spec.blocks is not None and not base:
        why = "model 0's (BASE weight 0)" if base == 0 else "model 0's (no BASE weight given)"
        return Component(name, "copy", why, (sources[0],), header, out_file)
    files = [s.files for s in sources if isinstance(s, FileSource)]
    if len(files) == len(sources) and all(_same_files(files[0], f) for f in files[1:]):
        return Component(name, "copy", "model 0's (identical in every model)", (sources[0],), header, out_file)
    return Component(name, "merge", spec.method, tuple(sources), header, out_file)


def _source_header(source: Source) -> dict[str, tuple[str, tuple[int, ...]]]:
    if isinstance(source, FileSource):
        return _header(source.files)
    return {k: (dtype, shape) for k, dtype, shape in source.component.header}


def _check_ratio(spec: MergeSpec, weights: BlockWeights, layout: BlockLayout) -> None:
    """Every block weight within the range of the ratio it sets (the method's declared range)."""
    problem = block_weights_problem(spec.merge_method, weights.named(layout))
    if problem:
        raise RecipeError(problem)


def block_weights_problem(method, named) -> str | None:
    """Why one of the (block, weight) pairs lies outside the range of `method`'s ratio, or None."""
    rng = method.ratio_range()
    for block, w in named:
        if rng is not None and rng.problem(w) is not None:
            where = "" if block is None else f" for {block}"
            return f"block weight {w!r}{where} is outside {rng.interval()}; {BLOCK_RANGE_WHY.get(method.name, '')}".rstrip("; ")
    return None


BLOCK_RANGE_WHY = {"weighted_sum": "a block-weighted sum interpolates between A and B (add_difference extrapolates)"}


def _model_index(folder: Path) -> dict[str, str]:
    """The pipeline's components (non-null in model_index.json) and the library of each."""
    index = json.loads((folder / "model_index.json").read_text())
    return {k: v[0] for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None}


def _config(folder: Path) -> dict:
    for name in ("config.json", "scheduler_config.json"):
        if (folder / name).is_file():
            cfg = json.loads((folder / name).read_text())
            return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in _CONFIG_NOISE}
    raise ModelLoadError(f"{folder} has no config.json")


def _check_same_prediction(models: Sequence[str], folders: Sequence[Path]) -> None:
    kinds = [_config(f / "scheduler").get("prediction_type", "epsilon") for f in folders]
    for text, kind in zip(models[1:], kinds[1:]):
        if kind != kinds[0]:
            raise IncompatibleModelsError(
                f"{models[0]!r} predicts {kinds[0]} and {text!r} predicts {kind}; their weights do not mean the same "
                "thing, so a merge of them is not a model (combine them at noise level instead)"
            )


def _check_same(what: str, name_a: str, a: Mapping, name_b: str, b: Mapping) -> None:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            raise IncompatibleModelsError(
                f"{what} differs: {key} is {a.get(key)!r} in {name_a!r} and {b.get(key)!r} in {name_b!r}; "
                "merges need one architecture"
            )


def _check_same_tensors(component: str, name_a: str, a: Mapping, name_b: str, b: Mapping) -> None:
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            has, lacks = (name_a, name_b) if key in a else (name_b, name_a)
            raise IncompatibleModelsError(
                f"{component} tensor {key!r} is in {has!r} but not in {lacks!r}; merges need one architecture"
            )
        if a[key][1] != b[key][1]:
            raise IncompatibleModelsError(
                f"{component} tensor {key!r} has shape {tuple(a[key][1])} in {name_a!r} and {tuple(b[key][1])} in "
                f"{name_b!r}; merges need one architecture"
            )


def _tensor_files(folder: Path, model: str) -> dict[str, Path]:
    """Tensor name -> safetensors file of one component: the standard file or shard index
    diffusers and transformers write, else the folder's only .safetensors file."""
    from safetensors import safe_open

    for stem in ("diffusion_pytorch_model", "model"):
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    candidates = [folder / f"{stem}.safetensors" for stem in ("diffusion_pytorch_model", "model")]
    candidates = [p for p in candidates if p.is_file()] or sorted(folder.glob("*.safetensors"))
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise ModelLoadError(
            f"{model!r}: cannot tell which weights of {folder.name} to merge (.safetensors files: {found}); "
            "merges read the standard safetensors file of each component (convert pickle weights first)"
        )
    with safe_open(candidates[0], framework="pt") as h:
        return {k: candidates[0] for k in h.keys()}


def _header(files: Mapping[str, Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype, shape), read from the files' headers only."""
    from safetensors import safe_open

    out = {}
    for path in sorted(set(files.values())):
        with safe_open(path, framework="pt") as h:
            for k in h.keys():
                s = h.get_slice(k)
                out[k] = (s.get_dtype(), tuple(s.get_shape()))
    return out


def _same_files(a: Mapping[str, Path], b: Mapping[str, Path]) -> bool:
    fa, fb = sorted(set(a.values())), sorted(set(b.values()))
    return len(fa) == len(fb) and all(filecmp.cmp(x, y, shallow=False) for x, y in zip(fa, fb))


# --- the merge itself -----------------------------------------------------------------------


def merged_tensors(plan: MergePlan, component: Component) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a merged component (or of a copy from model 0, when
    model 0 is itself a merge), one at a time, in the first model's dtype. Tensors bitwise
    equal in every model, and non-float tensors, are model 0's. An input that is a merge is
    computed here, tensor by tensor, from its own inputs' files."""
    # Files are opened per chunk of tensors and closed after it: a safe_open handle keeps the
    # pages it has read mapped (they count as resident memory), and reopening per tensor would
    # parse the header every time. Chunks of 1/(4N) of the component, N the files read per
    # tensor (the leaves of the merge tree), bound what they hold mapped to about a quarter of
    # one model.
    sources = component.sources if component.action == "merge" else component.sources[:1]
    sizes = [_nbytes(dtype, shape) for _, dtype, shape in component.header]
    budget = max(max(sizes, default=0), sum(sizes) // (4 * sum(s.leaves for s in sources)))
    for chunk in _chunks(component.header, sizes, budget):
        with ExitStack() as stack:
            readers = [s.reader(stack) for s in sources]
            for name, _, _ in chunk:
                tensors = [read(name) for read in readers]
                out = merged_tensor(plan, component.name, name, tensors) if component.action == "merge" else tensors[0]
                del tensors
                yield name, out


def merged_tensor(plan: MergePlan, component: str, name: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Tensor `name` of `component` merged from `tensors` (one per model); model 0's when it is
    not floating point or bitwise equal in every model."""
    first = tensors[0]
    if not first.is_floating_point() or all(_same_bits(first, t) for t in tensors[1:]):
        return first
    return plan.merge(component, name, tensors)


def _chunks(header: Sequence, sizes: Sequence[int], budget: int) -> Iterator[list]:
    chunk, total = [], 0
    for entry, size in zip(header, sizes):
        if chunk and total + size > budget:
            yield chunk
            chunk, total = [], 0
        chunk.append(entry)
        total += size
    if chunk:
        yield chunk


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=_ST_DTYPES[dtype]).element_size()


def _as_bytes(t: torch.Tensor):
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN equals itself, -0.0 differs from 0.0): 'identical' for a copy.
    Compared as 8-byte words where the size allows (numpy's comparison is fast, and its
    temporary is then 1/8 of the tensor)."""
    import numpy as np

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    x, y = _as_bytes(a), _as_bytes(b)
    if x.size % 8 == 0:
        x, y = x.view(np.int64), y.view(np.int64)
    return np.array_equal(x, y)


def write_safetensors(
    path: Path, header: Sequence[tuple[str, str, tuple[int, ...]]], tensors: Iterator[tuple[str, torch.Tensor]]
) -> None:
    """Write a safetensors file whose tensors arrive one at a time, in `header` order: the
    header (8-byte little-endian length, JSON with dtype, shape and data offsets, padded to 8
    bytes) first, then each tensor's bytes as it comes, so only one tensor is held at a time."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in header:
        size = _nbytes(dtype, shape)
        meta[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(meta, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for (name, dtype, shape), (got, t) in zip(header, tensors, strict=True):
            if got != name or t.dtype != _ST_DTYPES[dtype] or tuple(t.shape) != tuple(shape):
                raise RuntimeError(
                    f"streamed tensor {got!r} {t.dtype} {tuple(t.shape)} does not match the header entry {name!r} {dtype} {shape}"
                )
            f.write(memoryview(_as_bytes(t)))


def merge_models(
    models: Sequence[str | Merge], out: str | Path, spec: MergeSpec | None = None, *, overwrite: bool = False
) -> Path:
    """Merge `models` (names, or `Merge`s computed on the way) into a new diffusers pipeline
    folder `out` (with merge.json), streaming: peak memory stays near one tensor per model. All
    checks run before anything is written; the folder appears complete or not at all. Returns `out`."""
    plan = plan_merge(models, spec)
    out = Path(out).expanduser()
    if any(out.resolve() == f.resolve() for f in plan.leaves):
        raise RecipeError(f"output {str(out)!r} is one of the models being merged; write the merge elsewhere")
    check_merge_output(out, overwrite)
    recipe = plan.recipe()
    recipe["fingerprints"] = [file_fingerprint(f) for f in plan.leaves]  # the folders read, depth first
    recipe["library"] = _library_version()
    with _atomic_folder(out, overwrite) as tmp:
        shutil.copy2(plan.folders[0] / "model_index.json", tmp / "model_index.json")
        for c in plan.components:
            src = plan.folders[0] / c.name
            if not plan.streamed(c):
                shutil.copytree(src, tmp / c.name, ignore=shutil.ignore_patterns(".*"))
                continue
            config_files(src, tmp / c.name)
            write_safetensors(tmp / c.name / c.out_file, c.header, merged_tensors(plan, c))
        (tmp / MERGE_JSON).write_text(json.dumps(recipe, indent=2) + "\n")
    return out


def check_merge_output(out: str | Path, overwrite: bool, where: str = "--out") -> Path:
    """`out` as a merge writes it, refused (RecipeError naming `where`) before any work when it
    names no folder of its own (".", ".."), is a symbolic link (replacing it would write where it
    points, or fail half done), already exists without `overwrite`, or exists and holds something
    other than a merge (`overwrite` replaces merges only: never a folder of the user's files)."""
    out = Path(out).expanduser()
    if out.name in ("", ".", "..") or out.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise RecipeError(
            f"{where}: {str(out)!r} names no new folder (the merge replaces its output folder as a whole); "
            "give a folder name, e.g. merged/my-merge"
        )
    if out.is_symlink():
        raise RecipeError(
            f"{where}: {str(out)!r} is a symbolic link; a merge is written as a real folder: give another "
            "name, or remove the link"
        )
    if out.exists():
        if not overwrite:
            raise RecipeError(
                f"{where}: output {str(out)!r} already exists; choose another folder or pass overwrite=True (--overwrite)"
            )
        if not (out.is_dir() and (out / MERGE_JSON).is_file() and (out / "model_index.json").is_file()):
            raise RecipeError(
                f"{where}: {str(out)!r} exists and holds no merge (no {MERGE_JSON} and model_index.json); "
                "overwrite replaces an earlier merge only: choose a new folder name"
            )
    return out


def merge_in_memory(
    models: Sequence[str | Merge | ModelHandle],
    spec: MergeSpec | None = None,
    *,
    name: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
):
    """The same merge without writing, returned as a `ModelHandle`.

    `models` are names or `Merge`s (model 0, or the first model down its tree, is loaded and
    its UNet and text encoders receive the merged tensors one at a time, read from every input's
    files, an inner merge computed on the way; peak memory: one model) or loaded
    `ModelHandle`s (nothing is loaded: the tensors come from the handles' modules and go into
    copies of model 0's UNet and text encoders, so the handles stay as they were; `dtype` and
    `device` are then the handles'). Either way the result equals, bit for bit, loading the
    folder `merge_models` writes (merged tensors are rounded through the files' dtype, as the
    folder stores them), provided the handles were loaded in a dtype at least as wide as their
    files'. The checks read the models' configs and file headers (a handle's `source`)."""
    from multifusion.handles import ModelHandle
    from multifusion.loading import load_model

    handles = [m for m in models if isinstance(m, ModelHandle)]
    if handles and len(handles) != len(models):
        raise RecipeError("models: give either all loaded ModelHandles or all model names, not a mix")
    plan = plan_merge([h.source for h in handles] if handles else models, spec)
    for c in plan.components:
        if c.action == "merge" and c.name != plan.denoiser and not c.name.startswith("text_encoder"):
            raise RecipeError(
                f"in-memory merges cover the {plan.denoiser} and the text encoders; {c.name} needs merge_models (a folder)"
            )
    source = f"merge of {', '.join(m if isinstance(m, str) else m.where for m in plan.models)} ({plan.spec.method})"
    if handles:
        merged = {
            _attribute(plan, c.name): _merge_modules(plan, c, [getattr(h, _attribute(plan, c.name)) for h in handles])
            for c in plan.components
            if c.action == "merge"
        }
        return dataclasses.replace(handles[0], name=name or "merge", source=source, **merged)
    handle = load_model(first_leaf(plan.models[0]), name=name or "merge", dtype=dtype, device=device)
    with torch.no_grad():
        for c in plan.components:
            if plan.streamed(c):
                _load_into(getattr(handle, _attribute(plan, c.name)), merged_tensors(plan, c), c.name)
    return dataclasses.replace(handle, source=source)


def _attribute(plan: MergePlan, component: str) -> str:
    """The ModelHandle field holding pipeline component `component` (a handle keeps its
    denoiser, a transformer too, in `unet`)."""
    return "unet" if component == plan.denoiser else component


def _tied(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{key: the first key sharing its storage} for a module's tied tensors (T5's
    `encoder.embed_tokens.weight` is `shared.weight`; its file holds one of them)."""
    first: dict[tuple, str] = {}
    out = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if ident in first:
            out[key] = first[ident]
        else:
            first[ident] = key
    return out


@torch.no_grad()
def _merge_modules(plan: MergePlan, component: Component, modules: Sequence[torch.nn.Module]) -> torch.nn.Module:
    """A copy of modules[0] holding the merge of `modules` (loaded, same architecture): the
    in-memory twin of `merged_tensors`, tensor by tensor, each rounded through its file's dtype."""
    import copy

    stored = {k: _ST_DTYPES[dtype] for k, dtype, _ in component.header}
    out = copy.deepcopy(modules[0])
    states = [m.state_dict() for m in modules]
    state = out.state_dict()
    tied = _tied(state)
    for key, target in state.items():
        if key in tied and (key not in stored or tied[key] in stored):
            continue  # the same storage as an earlier key: merged once, under the name its file uses
        tensors = [s[key] for s in states]
        if not tensors[0].is_floating_point() or all(
            t is tensors[0] or _same_bits(tensors[0].cpu(), t.cpu()) for t in tensors[1:]
        ):
            continue  # the copy holds model 0's already
        file_key = key if key in stored else _state_key(key, stored)
        if file_key is None:
            raise ModelLoadError(f"{component.name}: {key!r} of the loaded module is not in its files; reload the models")
        merged = plan.merge(component.name, file_key, tensors)
        target.copy_(merged.to(stored[file_key]))  # as the folder stores it, then in the module's dtype
    return out


def _load_into(module: torch.nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], component: str) -> None:
    state = module.state_dict()
    tied = _tied(state)
    filled = set()
    for key, t in tensors:
        target = key if key in state else _state_key(key, state)
        if target is None:
            continue  # saved but not a persistent tensor of the module (e.g. old position_ids)
        state[target].copy_(t)
        filled.add(target)
    done = {tied.get(k, k) for k in filled}
    filled = {k for k in state if tied.get(k, k) in done}  # a tied tensor is filled through its twin
    if filled != set(state):
        missing = sorted(set(state) - filled)[:3]
        raise ModelLoadError(f"{component}: the merge produced no value for {missing}; its files and its module disagree")


def _state_key(key: str, state: Mapping[str, torch.Tensor]) -> str | None:
    """A file's tensor name in the module's naming (transformers may add or drop `text_model.`)."""
    for candidate in (key.removeprefix("text_model."), f"text_model.{key}"):
        if candidate in state:
            return candidate
    return None


@contextmanager
def _atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` on success and deleted on any error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.part"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists() and overwrite:
            old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"multifusion {version('multifusion')}"
    except PackageNotFoundError:
        return "multifusion"
