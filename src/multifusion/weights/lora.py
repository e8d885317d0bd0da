"""LoRAs in the weights: a fine-tune extracted as a LoRA, and a LoRA merged into a checkpoint per block.

A LoRA layer (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022,
arXiv 2106.09685, Eq. 3) adds `scale * B A` to a Linear weight W (out, in): A (r, in) is `lora_A`
("down"), B (out, r) is `lora_B` ("up"), scale = alpha / r (1 when the file gives no alpha, the
diffusers / PEFT convention). On a Conv2d weight (out, in, kh, kw) A is a (r, in, kh, kw) conv and B
a 1x1 conv (out, r, 1, 1), so the delta is B A with the kernel flattened into A's input axis.

- `truncated_svd(delta, rank)`: the best rank-r approximation of a delta in the Frobenius norm
  (Eckart-Young): delta = U S V^T, B = U_r S_r, A = V_r^T; the extraction kohya-ss sd-scripts'
  `extract_lora_from_models.py` popularised, written from the theorem.
- `extract_lora(base, tuned, out, rank=...)`: every Linear and Conv2d weight of the denoiser
  (and, with `text_encoder=True`, of the text encoders) whose value differs between the two
  models, as a safetensors file in the PEFT key layout diffusers' `load_lora_weights` reads
  (`unet.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`). Biases, norms and
  embeddings are not LoRA layers: a fine-tune's changes to them are not in the file.
- `read_lora(path)`: a LoRA file as {component: {module: LoraLayer}}, from the PEFT layout, the
  older diffusers layout (`lora.down` / `lora.up`) or kohya's (`lora_unet_...`, converted by
  diffusers' own `lora_state_dict`).
- `merge_lora(base, lora, out, scale=..., blocks=...)`: base + scale * block weight * B A, per
  tensor, streamed into a diffusers folder like `merge_models`; block weights use the merges'
  block ids (BASE: the text encoders), as SuperMerger's LoRA merge with block weights (LBW)
  does. The base may be a `Merge`, computed on the way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from multifusion.errors import IncompatibleModelsError, ModelLoadError, RecipeError
from multifusion.io import atomic_path, file_fingerprint
from multifusion.weights.models import (
    MERGE_JSON,
    FileSource,
    Merge,
    MergedSource,
    MergeSpec,
    _atomic_folder,
    _chunks,
    _library_version,
    _model_index,
    _model_json,
    _nbytes,
    check_merge_output,
    config_files,
    first_leaf,
    plan_merge,
    write_safetensors,
)
from multifusion.weights.presets import block_weights

FORMAT = "multifusion-lora"


@dataclass(frozen=True)
class LoraLayer:
    """One LoRA layer: `down` (A: (r, in) or (r, in, kh, kw)), `up` (B: (out, r) or (out, r, 1, 1)),
    `alpha` (scale alpha / r; None: scale 1)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def lora_delta(layer: LoraLayer) -> torch.Tensor:
    """The weight delta (alpha / r) B A of one layer, in float32: (out, in) for a Linear,
    (out, in, kh, kw) for a Conv2d."""
    down, up = layer.down.float(), layer.up.float()
    scale = 1.0 if layer.alpha is None else layer.alpha / layer.rank
    delta = up.flatten(1) @ down.flatten(1)  # (out, r) @ (r, in * kh * kw)
    return scale * delta.reshape(up.shape[0], *down.shape[1:])


def truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of the best rank-`rank` approximation of `delta` ((out, in) or (out, in, kh, kw);
    ranks above min(out, in * kh * kw) are that: exact up to float error), in float32:
    up (out, r[, 1, 1]) = U_r S_r, down (r, in[, kh, kw]) = V_r^T."""
    mat = delta.float().flatten(1)  # (out, in * kh * kw)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = min(rank, s.numel())
    up, down = u[:, :r] * s[:r], vh[:r]
    if delta.ndim == 4:
        return up.reshape(*up.shape, 1, 1).contiguous(), down.reshape(r, *delta.shape[1:]).contiguous()
    return up.contiguous(), down.contiguous()


def check_rank(rank, where: str = "rank") -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise RecipeError(
            f"{where}: {rank!r} is not a positive integer; give the LoRA's rank, e.g. 32 (full rank: the layer's size)"
        )
    return rank


def lora_layers(folder: Path, component: str) -> dict[str, str]:
    """{module name: "linear" | "conv"} of the Linear and Conv2d layers of a pipeline folder's
    component, from its config (the module is built on the meta device: no weights read)."""
    import importlib

    library, cls_name = _model_index_classes(folder)[component]
    cls = getattr(importlib.import_module(library), cls_name)
    with torch.device("meta"):
        if library == "diffusers":
            model = cls.from_config(cls.load_config(folder / component))
        else:
            from transformers import AutoConfig

            model = cls(AutoConfig.from_pretrained(folder / component))
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            out[name] = "linear"
        elif isinstance(module, torch.nn.Conv2d) and module.groups == 1:
            out[name] = "conv"
    return out


def _model_index_classes(folder: Path) -> dict[str, tuple[str, str]]:
    index = json.loads((folder / "model_index.json").read_text())
    return {k: tuple(v) for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None}


def _lora_components(plan, text_encoder: bool) -> list[str]:
    index = _model_index(plan.folders[0])
    return [plan.denoiser] + ([c for c in index if c.startswith("text_encoder")] if text_encoder else [])


def extract_lora(
    base: str,
    tuned: str,
    out: str | Path,
    *,
    rank: int,
    text_encoder: bool = False,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write the difference `tuned - base` as a LoRA of rank `rank` (truncated SVD per Linear and
    Conv2d layer; see the module docstring) to the safetensors file `out`, loadable with diffusers'
    `pipe.load_lora_weights(out)` on `base`. `text_encoder=True` also extracts the text encoders'
    layers. The models must be one architecture (checked as a merge checks them, configs and file
    headers, before any tensor is read). Returns `out`."""
    check_rank(rank)
    if dtype not in ("float32", "float16", "bfloat16"):
        raise RecipeError(f"dtype: {dtype!r} is not float32, float16 or bfloat16")
    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise RecipeError(f"--out: {str(out)!r} must end in .safetensors (the LoRA is one safetensors file)")
    if out.exists() and not overwrite:
        raise RecipeError(f"--out: {str(out)!r} already exists; choose another name or pass overwrite=True (--overwrite)")
    try:
        plan = plan_merge([base, tuned], MergeSpec(text_encoder="merge" if text_encoder else "first"))
    except (IncompatibleModelsError, ModelLoadError) as err:
        raise type(err)(f"models: {err}; a LoRA is the difference of two models of one architecture") from None
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for component in _lora_components(plan, text_encoder):
        c = next(c for c in plan.components if c.name == component)
        if c.action == "copy" and component != plan.denoiser:
            continue  # identical text encoders: nothing to extract
        files = [_component_files(plan.folders[i], component) for i in range(2)]
        names = [f"{m}.weight" for m in lora_layers(plan.folders[0], component) if f"{m}.weight" in files[0]]
        # Files reopened every 64 layers: a safe_open handle keeps the pages it read mapped (as merges do).
        for start in range(0, len(names), 64):
            with ExitStack() as stack:
                read = [FileSource(f).reader(stack) for f in files]
                for name in names[start : start + 64]:
                    delta = read[1](name).float() - read[0](name).float()
                    if delta.any():
                        found[f"{component}.{name.removesuffix('.weight')}"] = truncated_svd(delta, rank)
    if not found:
        raise RecipeError(f"models: {base!r} and {tuned!r} have the same Linear and Conv weights; there is no LoRA to extract")
    # One rank in the file: a layer smaller than the rank (kept at its full rank) is padded with
    # zero rows of A and columns of B, which change no product. diffusers describes mixed ranks
    # by a rank pattern that its text-encoder path does not apply to every layer (SDXL's
    # `text_projection` is reinitialised at the common rank), so a file with one rank loads as written.
    common = max(up.shape[1] for up, _ in found.values())
    state: dict[str, torch.Tensor] = {}
    for key, (up, down) in found.items():
        pad = common - up.shape[1]
        up = torch.cat([up, up.new_zeros(up.shape[0], pad, *up.shape[2:])], dim=1)
        down = torch.cat([down, down.new_zeros(pad, *down.shape[1:])], dim=0)
        state[f"{key}.lora_A.weight"] = down.to(getattr(torch, dtype))
        state[f"{key}.lora_B.weight"] = up.to(getattr(torch, dtype))
    from safetensors.torch import save_file

    meta = {
        "format": "pt",
        FORMAT: json.dumps({"base": base, "tuned": tuned, "rank": rank, "layers": len(found), "text_encoder": text_encoder}),
    }
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return out


def _component_files(folder: Path, component: str) -> dict[str, Path]:
    from multifusion.weights.models import _tensor_files

    return _tensor_files(folder / component, str(folder))


def read_lora(path: str | Path, pipeline_class: str = "StableDiffusionPipeline") -> dict[str, dict[str, LoraLayer]]:
    """A LoRA file as {component: {module: LoraLayer}} (component: "unet", "text_encoder", ...;
    module: the diffusers module path). Reads the PEFT layout (`<component>.<module>.lora_A.weight`,
    `lora_B.weight`, optional `<component>.<module>.alpha`) and the older diffusers one
    (`lora.down.weight`, `lora.up.weight`); other layouts (kohya's `lora_unet_...`) are converted
    first by `pipeline_class.lora_state_dict` (diffusers). ModelLoadError naming the file for what
    is not a LoRA."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"LoRA {str(path)!r}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"LoRA {str(path)!r}: not a readable safetensors file ({err})") from None
    alphas: dict[str, float] = {}
    if not any(".lora_A." in k or ".lora.down." in k for k in state):
        import diffusers
        from diffusers.utils import convert_unet_state_dict_to_peft

        try:
            state, network_alphas = getattr(diffusers, pipeline_class).lora_state_dict(str(path))
        except (ValueError, KeyError, RuntimeError) as err:
            raise ModelLoadError(f"LoRA {str(path)!r}: not a LoRA layout diffusers reads ({type(err).__name__}: {err})") from None
        # diffusers' conversion names attention layers as its old attention processors
        # (`attn1.processor.to_k_lora.down`); its own PEFT conversion gives module paths.
        state = convert_unet_state_dict_to_peft(state)
        # Alphas are keyed by module (`conv_in.alpha`) or by their down weight (`to_k_lora.down.weight.alpha`).
        named = convert_unet_state_dict_to_peft(
            {_down_key(k.removesuffix(".alpha")): v for k, v in (network_alphas or {}).items()}
        )
        alphas = {k.removesuffix(".lora_A.weight"): float(v) for k, v in named.items()}
    downs, ups = {}, {}
    for key, t in state.items():
        for marker, into in (
            (".lora_A.weight", downs),
            (".lora.down.weight", downs),
            (".lora_B.weight", ups),
            (".lora.up.weight", ups),
        ):
            if key.endswith(marker):
                into[key[: -len(marker)]] = t
                break
        else:
            if key.endswith(".alpha"):
                alphas[key[: -len(".alpha")]] = float(t)
            elif not key.endswith(".lora_B.bias"):
                raise ModelLoadError(
                    f"LoRA {str(path)!r}: key {key!r} is not a LoRA layer's (lora_A / lora_B, lora.down / lora.up)"
                )
            else:
                raise ModelLoadError(f"LoRA {str(path)!r}: {key!r} is a LoRA bias, which merges do not read yet")
    if not downs or downs.keys() != ups.keys():
        missing = sorted(set(downs) ^ set(ups))[:3]
        raise ModelLoadError(f"LoRA {str(path)!r}: no LoRA layers, or layers without both halves ({missing})")
    out: dict[str, dict[str, LoraLayer]] = {}
    for key in sorted(downs):
        component, _, module = key.partition(".")
        down, up = downs[key], ups[key]
        if down.shape[0] != up.shape[1] or down.ndim != up.ndim:
            raise ModelLoadError(f"LoRA {str(path)!r}: {key}: down {tuple(down.shape)} and up {tuple(up.shape)} do not multiply")
        out.setdefault(component, {})[module] = LoraLayer(down, up, alphas.get(key))
    return out


def _down_key(key: str) -> str:
    return key if key.endswith("down.weight") else f"{key}.lora.down.weight"


# --- a LoRA merged into a checkpoint ----------------------------------------------------------------


def merge_lora(
    base: str | Merge,
    lora: str | Path,
    out: str | Path,
    *,
    scale: float = 1.0,
    blocks: str | Sequence[float] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `base` with the LoRA file `lora` merged in as a new diffusers folder `out` (with
    merge.json): each LoRA layer's weight becomes W + scale * w * (alpha / r) B A, w the block
    weight of the tensor's block (`blocks`: a preset, an A1111 string or a list, the ids of `mbw`;
    BASE weighs the text encoders; without blocks, or without BASE, w = 1). Streamed one tensor at
    a time; everything is checked first (the LoRA's layers against the base's tensors: names and
    shapes). `base` may be a `Merge`, computed on the way. Returns `out`."""
    import math

    from multifusion.loading import family_of, resolve

    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise RecipeError(f"scale: {scale!r} is not a finite number; give the LoRA's strength, e.g. 0.8")
    models, spec = (base.models, base.spec) if isinstance(base, Merge) else ([base], MergeSpec())
    plan = plan_merge(models, spec)
    family = family_of(resolve(first_leaf(base)))
    layers = read_lora(lora, family.pipeline_class)
    weights = layout = None
    if blocks is not None:
        from multifusion.weights.models import _config

        layout = family.block_layout(_config(plan.folders[0] / plan.denoiser))
        try:  # any finite weight: a LoRA's block weights may exceed 1 or be negative (SuperMerger's LBW)
            weights, _ = block_weights(blocks if isinstance(blocks, str) else tuple(float(v) for v in blocks), layout)
            weights.by_block(layout)
        except RecipeError as err:
            raise RecipeError(f"blocks: {err}") from None
    by_block = None if weights is None else weights.by_block(layout)

    components = {c.name: c for c in plan.components}
    for component, modules in layers.items():
        if component not in components or (component != plan.denoiser and not component.startswith("text_encoder")):
            raise IncompatibleModelsError(
                f"LoRA {str(lora)!r} has layers for {component!r}, which {first_leaf(base)!r} has no {plan.denoiser} or text encoder named so"
            )
        header = {k: shape for k, _, shape in components[component].header}
        for module, layer in modules.items():
            name = f"{module}.weight"
            want = tuple(layer.up.shape[:1]) + tuple(layer.down.shape[1:])
            if name not in header:
                raise IncompatibleModelsError(
                    f"LoRA {str(lora)!r}: {component}.{module} is not a layer of {first_leaf(base)!r}; the LoRA was made for another architecture"
                )
            if tuple(header[name]) != want:
                raise IncompatibleModelsError(
                    f"LoRA {str(lora)!r}: {component}.{module} changes a {want} weight; {first_leaf(base)!r} has {tuple(header[name])} "
                    "there: the LoRA was made for another architecture"
                )

    def weight_of(component: str, name: str) -> float:
        if by_block is None:
            return 1.0
        if component == plan.denoiser:
            return by_block[layout.block_of(name)]
        w = weights.text_weight(component, layout)
        return 1.0 if w is None else w

    out = check_merge_output(out, overwrite)
    if any(out.resolve() == f.resolve() for f in plan.leaves):
        raise RecipeError(f"--out: {str(out)!r} is the base model; write the merge elsewhere")
    recipe = {
        "format": "multifusion-merge",
        "version": 1,
        "base": _model_json(base),
        "lora": {
            "file": str(lora),
            "scale": scale,
            "blocks": None if blocks is None else (blocks if isinstance(blocks, str) else list(blocks)),
        },
        "fingerprints": [file_fingerprint(f) for f in plan.leaves] + [file_fingerprint(Path(lora))],
        "library": _library_version(),
    }
    if by_block is not None:
        recipe["lora"]["weights"] = dict(by_block)
    with _atomic_folder(out, overwrite) as tmp:
        import shutil

        shutil.copy2(plan.folders[0] / "model_index.json", tmp / "model_index.json")
        for c in plan.components:
            src = plan.folders[0] / c.name
            if c.name not in layers and not plan.streamed(c):
                shutil.copytree(src, tmp / c.name, ignore=shutil.ignore_patterns(".*"))
                continue
            config_files(src, tmp / c.name)
            source = MergedSource(plan, c) if c.action == "merge" else c.sources[0]
            mods = layers.get(c.name, {})
            w = {f"{m}.weight": (layer, weight_of(c.name, f"{m}.weight")) for m, layer in mods.items()}
            write_safetensors(tmp / c.name / c.out_file, c.header, _with_lora(source, c, w, scale))
        (tmp / MERGE_JSON).write_text(json.dumps(recipe, indent=2) + "\n")
    return out


def _with_lora(
    source, component, layers: Mapping[str, tuple[LoraLayer, float]], scale: float
) -> Iterator[tuple[str, torch.Tensor]]:
    """The component's tensors from `source`, one at a time, with scale * block weight * delta
    added where a LoRA layer has one (the sum in float32, stored in the tensor's dtype)."""
    sizes = [_nbytes(dtype, shape) for _, dtype, shape in component.header]
    budget = max(max(sizes, default=0), sum(sizes) // (4 * source.leaves))
    for chunk in _chunks(component.header, sizes, budget):
        with ExitStack() as stack:
            read = source.reader(stack)
            for name, _, _ in chunk:
                t = read(name)
                if name in layers and (w := layers[name][1] * scale) != 0:
                    t = (t.float() + w * lora_delta(layers[name][0])).to(t.dtype)
                yield name, t
