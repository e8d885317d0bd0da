"""Naming and loading models: diffusers folders, Hub ids, single-file checkpoints, the zoo.

Loading a checkpoint must not run code, so pickle files (.ckpt, .bin, .pt, .pth) are refused
unless the caller passes ``allow_pickle=True``; folders are read with ``use_safetensors=True``
under the same rule. Components with identical weights across models (a text encoder or VAE
that fine-tunes inherit unchanged) are held once.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from multifusion.errors import (
    IncompatibleModelsError,
    ModelLoadError,
    PickleRefusedError,
    RecipeError,
    did_you_mean,
    format_validation_error,
)
from multifusion.families import FAMILIES, ModelFacts, facts_from_configs, family_named, vae_factor
from multifusion.handles import ModelHandle, Offloader, holds_quantized, stored_tensors
from multifusion.lora import PICKLE_SUFFIXES, apply_loras
from multifusion.quantize import check_backend, component_folders, gguf_denoiser, pipeline_config
from multifusion.recipe import Quantize

PIPELINE_PREFIX = "pipeline:"
"""The `source` (and recipe `model`) of a model handed over as a diffusers pipeline object: it
names the object's origin for the record, and is never loaded from (`from_pipeline`)."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

RefKind = Literal["folder", "hub", "single_file", "zoo"]


@dataclass(frozen=True)
class ModelRef:
    """A resolved model name: what kind of thing it is and where."""

    text: str
    kind: RefKind
    location: str  # folder or file path, or Hub id
    config: str | None = None  # diffusers config folder for single-file checkpoints


def zoo_root() -> Path:
    return Path(__file__).parent / "zoo" / "weights"


def zoo_models() -> list[str]:
    """Names of the models shipped in the embedded zoo (folders with a model_index.json)."""
    root = zoo_root()
    return sorted(p.parent.name for p in root.glob("*/model_index.json")) if root.is_dir() else []


def resolve(text: str, *, config: str | None = None, allow_pickle: bool = False) -> ModelRef:
    """Decide what `text` names, without loading anything. Raises ModelLoadError with a fix."""
    if text.startswith("zoo:"):
        name = text[4:]
        available = zoo_models()
        if name not in available:
            listed = ", ".join(available) or "none yet"
            raise ModelLoadError(f"unknown zoo model {text!r} (available: {listed}){did_you_mean(name, available, 'zoo:')}")
        return ModelRef(text, "zoo", str(zoo_root() / name))
    path = Path(text).expanduser()
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise PickleRefusedError.of(text, "checkpoint")
        if not path.is_file():
            raise ModelLoadError(f"checkpoint file {text!r} does not exist")
        return ModelRef(text, "single_file", str(path), config)
    if suffix == ".safetensors":
        if not path.is_file():
            raise ModelLoadError(f"checkpoint file {text!r} does not exist")
        if config is not None and not (Path(config) / "model_index.json").is_file():
            raise ModelLoadError(f"config {config!r} for {text!r} is not a diffusers pipeline folder (no model_index.json)")
        return ModelRef(text, "single_file", str(path), config)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"folder {text!r} is not a diffusers pipeline folder (no model_index.json); "
                "name the pipeline's root folder, or a single .safetensors checkpoint"
            )
        return ModelRef(text, "folder", str(path))
    if _HUB_ID.match(text) and not path.exists():
        return ModelRef(text, "hub", text)
    raise ModelLoadError(
        f"cannot find model {text!r}: not an existing folder, not a .safetensors file, not a Hub id "
        "(owner/name) and not 'zoo:NAME'"
    )


def check_safetensors(path: Path) -> None:
    """ModelLoadError when a .safetensors file is damaged: its header is read (not its tensors),
    which also checks that the tensors it lists fit in the file, so a truncated download is
    reported as corrupt before loading rather than as a missing-weights (or pickle) problem."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(f"{str(path)!r} is a corrupt .safetensors file ({err}); download or export it again") from None


def check_weight_files(ref: ModelRef) -> None:
    """`check_safetensors` on every local .safetensors file of `ref` (the file itself, or each
    component's in a pipeline folder)."""
    if ref.kind == "single_file" and ref.location.lower().endswith(".safetensors"):
        check_safetensors(Path(ref.location))
    elif ref.kind in ("folder", "zoo"):
        for f in sorted(Path(ref.location).glob("*/*.safetensors")):
            check_safetensors(f)


def _pickle_only_components(root: Path) -> list[str]:
    """Component folders of a pipeline folder with pickle weights and no .safetensors ones."""
    return (
        sorted(
            d.name
            for d in root.iterdir()
            if d.is_dir() and not any(d.glob("*.safetensors")) and any(f.suffix.lower() in PICKLE_SUFFIXES for f in d.iterdir())
        )
        if root.is_dir()
        else []
    )


def _config_root(ref: ModelRef) -> Path | None:
    """The local folder holding `ref`'s diffusers configs: the pipeline folder, or a single
    file's `config:` folder; None when they are not local (Hub ids, single files without one)."""
    return Path(ref.location) if ref.kind in ("folder", "zoo") else (Path(ref.config) if ref.config else None)


def _model_index(root: Path) -> dict:
    """A pipeline folder's model_index.json ({} when missing or unreadable)."""
    try:
        return json.loads((root / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def read_facts(ref: ModelRef) -> ModelFacts | None:
    """The facts that validation needs (family, latent space, schedule; `families.ModelFacts`),
    read from configs without loading weights; None when they are not local (Hub ids, single
    files without a config). ModelLoadError for a pipeline of no known family."""
    root = _config_root(ref)
    if root is None:
        return None
    family = family_of(ref)
    try:
        vae = json.loads((root / "vae" / "config.json").read_text())
        denoiser = json.loads((root / family.denoiser_folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    try:  # the noise schedule, to check the step count against the scheduler before loading
        scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        scheduler = None
    return facts_from_configs(family, denoiser, vae, scheduler)


def resolve_vae(text: str, *, allow_pickle: bool = False) -> ModelRef:
    """A separate VAE (say the fp16-fix SDXL VAE) without loading it: a diffusers VAE folder (its
    config.json, or a pipeline folder's vae/), or one checkpoint file in the original layout.
    Raises ModelLoadError with a fix."""
    path = Path(text).expanduser()
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise PickleRefusedError.of(text, "checkpoint")
    if suffix in PICKLE_SUFFIXES or suffix == ".safetensors":
        if not path.is_file():
            raise ModelLoadError(f"VAE file {text!r} does not exist")
        if suffix == ".safetensors":
            check_safetensors(path)
        return ModelRef(text, "single_file", str(path))
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise ModelLoadError(
                f"folder {text!r} is not a diffusers VAE (no config.json, nor vae/config.json); name the "
                "VAE's folder, a pipeline folder, or a single .safetensors VAE file"
            )
        for f in sorted(folder.glob("*.safetensors")):
            check_safetensors(f)
        return ModelRef(text, "folder", str(folder))
    raise ModelLoadError(f"cannot find VAE {text!r}: not an existing folder nor a .safetensors file")


def read_vae_config(ref: ModelRef) -> dict | None:
    """A separate VAE's config.json (None for a single file: it takes its model's config)."""
    if ref.kind != "folder":
        return None
    try:
        return json.loads((Path(ref.location) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def vae_mismatch(vae: dict, unet_in_channels: int, scaling_factor: float, vae_scale_factor: int) -> str | None:
    """What makes a replacement VAE (its config) unfit for a model whose UNet takes
    `unet_in_channels` latent channels and whose own VAE has `scaling_factor` and downsampling
    `vae_scale_factor`; None when it fits."""
    got = (vae.get("latent_channels", 4), vae_factor(vae), round(float(vae.get("scaling_factor", 0.18215)), 6))
    want = (unet_in_channels, vae_scale_factor, round(scaling_factor, 6))
    for what, a, b in zip(("latent channels", "downsampling factor", "scaling_factor"), got, want):
        if a != b:
            return (
                f"its {what} is {a}, the model's VAE has {b}: it encodes another latent space (an SD-1.x VAE on an "
                "SDXL model, or the reverse?); give a VAE made for this model's family"
            )
    return None


def _load_vae(ref: ModelRef, model: ModelRef, cls: type, dtype: torch.dtype, allow_pickle: bool) -> torch.nn.Module:
    """Load a separate VAE of class `cls` (the model's own VAE's). A single file takes the
    model's local VAE config (its folder, or its `config:` folder)."""
    try:
        if ref.kind == "folder":
            return cls.from_pretrained(ref.location, use_safetensors=None if allow_pickle else True, **{_DTYPE_KWARG: dtype})
        root = model.location if model.kind in ("folder", "zoo") else model.config
        if root is None:
            raise ModelLoadError(
                f"the single-file VAE {ref.text!r} needs its model's diffusers config, and {model.text!r} "
                "has none here: give the model a `config:` folder, or the VAE as a diffusers folder"
            )
        return cls.from_single_file(ref.location, config=root, subfolder="vae", **{_DTYPE_KWARG: dtype})
    except ModelLoadError:
        raise
    except Exception as err:  # diffusers raises OSError, ValueError and its own error classes here
        raise ModelLoadError(f"could not load VAE {ref.text!r}: {_said(err)}") from err


def _dtype_kwarg() -> str:
    # diffusers 0.42 renamed `torch_dtype` to `dtype` (the old name still works, with a warning).
    import diffusers

    major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (0, 42) else "torch_dtype"


_DTYPE_KWARG = _dtype_kwarg()


def family_of(ref: ModelRef) -> type[ModelHandle]:
    """The handle class of `ref`'s family (`multifusion.families`): from its pipeline folder's (or
    config folder's) model_index.json where local; Stable Diffusion 1.x/2.x otherwise."""
    root = _config_root(ref)
    try:
        return family_named(None if root is None else _model_index(root).get("_class_name"), repr(ref.text))
    except IncompatibleModelsError as err:
        raise ModelLoadError(str(err)) from None


def _absent_parts(ref: ModelRef) -> list[str]:
    """Components a local pipeline folder's model_index.json lists as absent ([null, null], e.g.
    SD3 without its T5 encoder): diffusers loads them only when told they are None."""
    if ref.kind not in ("folder", "zoo"):
        return []
    index = _model_index(Path(ref.location))
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v == [None, None]]


_SEE_ABOVE = re.compile(r"\s*Please check out the root cause in the stacktrace above\.?")


def _said(err: BaseException) -> str:
    """What a loading error says, in place of diffusers' pointer to "the stacktrace above" (which
    a page or a one-line error never shows): the root cause it points to (the Hub unreachable,
    offline mode) written out."""
    text = str(err)
    if _SEE_ABOVE.search(text) is None:
        return text
    cause = err.__cause__ or err.__context__
    return _SEE_ABOVE.sub(f" ({type(cause).__name__}: {cause})" if cause is not None else "", text).rstrip()


def _load_pipeline(
    ref: ModelRef, family: type[ModelHandle], dtype: torch.dtype, allow_pickle: bool, quantize: Quantize | None = None
):
    import diffusers

    pipeline = getattr(diffusers, family.pipeline_class)
    common = dict(family.load_kwargs)
    common[_DTYPE_KWARG] = dtype
    common.update({part: None for part in _absent_parts(ref)})
    if quantize is not None:
        check_quantize(ref, family, quantize)
        if quantize.backend == "gguf":
            try:
                common[family.denoiser_folder] = gguf_denoiser(quantize, family, ref.location, dtype)
            except Exception as err:  # diffusers and gguf raise OSError, ValueError and their own errors here
                raise ModelLoadError(
                    f"quantize.file: could not load {quantize.file!r} as {ref.text!r}'s denoiser: {err}"
                ) from err
        else:
            common["quantization_config"] = pipeline_config(quantize, family, dtype, "quantize", _absent_parts(ref))
    check_weight_files(ref)
    try:
        if ref.kind == "single_file":
            kwargs = dict(common)
            if ref.config:
                kwargs["config"] = ref.config
            return pipeline.from_single_file(ref.location, **kwargs)
        return pipeline.from_pretrained(ref.location, use_safetensors=None if allow_pickle else True, **common)
    except Exception as err:  # diffusers raises OSError, ValueError and its own error classes here
        if ref.kind == "single_file" and not ref.config:
            hint = " (single-file checkpoints need their diffusers config: give the model a `config:` folder in the recipe, or config=FOLDER in Python)"
            raise ModelLoadError(f"could not load {ref.text!r}: {_said(err)}{hint}") from err
        pickled = _pickle_only_components(Path(ref.location)) if ref.kind in ("folder", "zoo") else []
        if not allow_pickle and (pickled or (ref.kind == "hub" and "safetensors" in str(err).lower())):
            which = f" ({', '.join(pickled)} only as pickles)" if pickled else ""
            raise PickleRefusedError(
                f"could not load {ref.text!r}: {_said(err)} (this model ships no .safetensors weights for every component{which}; "
                "its pickle weights can run code when loaded: pass allow_pickle=True (runtime.allow_pickle in a recipe) only if you trust it)"
            ) from err
        raise ModelLoadError(f"could not load {ref.text!r}: {_said(err)}") from err


def same_module(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when two modules are interchangeable: same class, config and every tensor equal.
    Quantized modules are never compared (their tensors have no equality): held once only when
    they are one object."""
    if type(a) is not type(b) or holds_quantized(a) or holds_quantized(b):
        return False
    ca, cb = getattr(a, "config", None), getattr(b, "config", None)
    if ca is not None and cb is not None:
        da = ca.to_dict() if hasattr(ca, "to_dict") else dict(ca)
        db = cb.to_dict() if hasattr(cb, "to_dict") else dict(cb)
        for d in (da, db):
            for k in ("_name_or_path", "transformers_version", "_diffusers_version", "_commit_hash"):
                d.pop(k, None)
        if da != db:
            return False
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    return all(sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def share_components(handles: list[ModelHandle]) -> dict[str, int]:
    """Point each handle's text encoder, VAE and UNet at an earlier handle's when they are equal,
    so identical weights are held once. Returns how many components were shared, per kind."""
    shared = {"text_encoder": 0, "vae": 0, "unet": 0}
    for i in range(1, len(handles)):
        for kind, n in _share_with_earlier(handles[: i + 1]).items():
            shared[kind] += n
    return shared


def _share_with_earlier(handles: list[ModelHandle]) -> dict[str, int]:
    *earlier, h = handles
    shared = {"text_encoder": 0, "vae": 0, "unet": 0}
    if from_python(h):
        return shared  # a pipeline object's components are used as they are (shared only when the same objects)
    for kind, mine in h.modules().items():
        shared.setdefault(kind, 0)
        for prev in earlier:
            theirs = getattr(prev, kind, None)
            if theirs is None or from_python(prev) or prev.device != h.device:
                continue  # a pipeline object's modules stay its own; one module cannot sit on two devices
            if theirs is mine:
                break
            if same_module(theirs, mine):
                setattr(h, kind, theirs)
                shared[kind] += 1
                break
    return shared


def held_bytes(handles: list[ModelHandle]) -> int:
    """Bytes of parameters and buffers held by all handles, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for h in handles:
        for module in h.modules().values():
            for t in (leaf for x in [*module.parameters(), *module.buffers()] for leaf in stored_tensors(x)):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in seen:
                    seen.add(ptr)
                    total += t.untyped_storage().nbytes()
    return total


def check_quantize(ref: ModelRef, family: type[ModelHandle], spec: Quantize, where: str = "quantize") -> None:
    """What can be checked of `spec` for the model `ref` of `family` before it loads: the backend
    installed, the components there, the model a folder (diffusers loads single files without a
    quantization config). Errors name `where` (say "models[1].quantize") and the fix."""
    if ref.kind == "single_file":
        raise RecipeError(
            f"{where}: diffusers loads a single-file pipeline without a quantization config; save it as a folder "
            "(pipe.save_pretrained(folder)) and quantize the folder"
        )
    check_backend(spec, where)
    component_folders(spec, family, where, _absent_parts(ref))
    if spec.file is not None and not Path(spec.file).expanduser().is_file():
        raise ModelLoadError(f"{where}.file: {spec.file!r} does not exist")


def as_quantize(spec: Quantize | dict | None, where: str = "quantize") -> Quantize | None:
    """A quantization spec from its recipe form (a dict) or as it is; RecipeError naming `where`."""
    if spec is None or isinstance(spec, Quantize):
        return spec
    from pydantic import ValidationError

    try:
        return Quantize.model_validate(spec)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, where)) from None


def load_model(
    ref: str | ModelRef,
    *,
    name: str | None = None,
    config: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    offloader: Offloader | None = None,
    allow_pickle: bool = False,
    vae: str | None = None,
    loras: Sequence[Any] = (),
    quantize: Quantize | dict | None = None,
) -> ModelHandle:
    """Load one model into a handle. `offloader` (shared between handles) keeps the components
    on the CPU and moves each one to its device only while it runs. `vae` names a VAE to use in
    place of the model's own (`resolve_vae`), checked to encode the same latent space. `loras`
    (each a {path, scale, name} dict, a recipe's `LoraEntry` or a `lora.LoraSpec`) are applied
    as diffusers' `load_lora_weights` + `set_adapters` apply them (`multifusion.lora`).
    `quantize` loads the denoiser (and T5) quantized through diffusers (`multifusion.quantize`)."""
    where = [f"loras[{j}]" for j in range(len(loras))]
    return _load_base(
        ref,
        [name],
        [loras],
        [where],
        config=config,
        dtype=dtype,
        device=device,
        offloader=offloader,
        allow_pickle=allow_pickle,
        vae=vae,
        quantize=quantize,
    )[0]


def _load_base(
    ref: str | ModelRef,
    names: list[str | None],
    lora_sets: Sequence[Sequence[Any]],
    lora_fields: Sequence[Sequence[str]],
    *,
    config: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    offloader: Offloader | None = None,
    allow_pickle: bool = False,
    vae: str | None = None,
    quantize: Quantize | dict | None = None,
) -> list[ModelHandle]:
    """Load one checkpoint once and return one handle per model of it (names[k], with the LoRAs
    lora_sets[k]): the handles share every module, and when any model has LoRAs each handle holds
    its adapter set (empty for the base alone), activated before each call (`multifusion.lora`)."""
    quantize = as_quantize(quantize)
    if isinstance(ref, str):
        ref = resolve(ref, config=config, allow_pickle=allow_pickle)
    vae_ref = resolve_vae(vae, allow_pickle=allow_pickle) if vae is not None else None
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    family = family_of(ref)
    pipe = _load_pipeline(ref, family, torch_dtype, allow_pickle, quantize)
    if vae_ref is not None:
        own = pipe.vae
        replacement = _load_vae(vae_ref, ref, type(own), torch_dtype, allow_pickle)
        problem = vae_mismatch(
            dict(replacement.config), int(own.config.latent_channels), float(own.config.scaling_factor), vae_factor(own.config)
        )
        if problem:
            raise IncompatibleModelsError(f"VAE {vae!r} does not fit {ref.text!r}: {problem}")
        pipe.vae = replacement
    # LoRAs go in before the move to the device, so their layers move with the base.
    adapter_sets = apply_loras(pipe, lora_sets, lora_fields, allow_pickle=allow_pickle) if any(lora_sets) else [None] * len(names)
    device = torch.device(device)
    if offloader is None:
        pipe.to(device)
    handle = family(
        name=names[0] or ref.text,
        **family.pipeline_parts(pipe),
        scheduler_config=dict(pipe.scheduler.config),
        source=ref.text,
        device=device,
        dtype=torch_dtype,
        offloader=offloader,
        quantize=quantize,
    )
    for module in handle.modules().values():
        module.eval().requires_grad_(False)
    # Unnamed models of one base are told apart by their adapters ("zoo:general+ink").
    return [
        dataclasses.replace(handle, name=n or ref.text + "".join(f"+{x}" for x in (a.names if a else ())), adapters=a)
        for n, a in zip(names, adapter_sets)
    ]


def from_python(handle: ModelHandle) -> bool:
    """Whether `handle` wraps a pipeline object handed over from Python (`from_pipeline`)."""
    return handle.source.startswith(PIPELINE_PREFIX)


def pipeline_family(pipe: Any, what: str = "the pipeline") -> type[ModelHandle]:
    """The family of a diffusers pipeline object: its class, or the nearest base class that a
    family is built from (a user's subclass of StableDiffusionPipeline is one). ModelLoadError
    naming `what` for anything that is not a pipeline, IncompatibleModelsError for a pipeline of
    no family (img2img, the SDXL refiner, ...)."""
    import diffusers

    if isinstance(pipe, (str, Path)):
        raise ModelLoadError(f"{what}: {str(pipe)!r} is a name; load it with load_models, or give a pipeline object")
    if not isinstance(pipe, diffusers.DiffusionPipeline):
        raise ModelLoadError(
            f"{what}: got a {type(pipe).__module__}.{type(pipe).__qualname__}, not a diffusers pipeline; give a text-to-image "
            f"pipeline object ({', '.join(sorted(FAMILIES))}), a ModelHandle, or a model name"
        )
    known = next((c.__name__ for c in type(pipe).__mro__ if c.__name__ in FAMILIES), type(pipe).__name__)
    return family_named(known, what)


def from_pipeline(pipe: Any, *, name: str | None = None, what: str = "the pipeline") -> ModelHandle:
    """A handle over a diffusers pipeline object as the caller built it: on its device (the
    pipeline's execution device), in its dtype, quantized, with LoRAs loaded or compiled. Its
    denoiser, text encoders, tokenizers and VAE are the handle's, the same objects: no weight is
    copied, moved or cast, and the pipeline keeps working. Only the scheduler's config is read
    (the recipe's `sampling.scheduler` is built on it). `what` names the object in errors."""
    family = pipeline_family(pipe, what)
    try:
        parts = family.pipeline_parts(pipe)
    except AttributeError as err:
        raise ModelLoadError(f"{what}: a {type(pipe).__name__} without {err.name or 'a component'}") from None
    missing = [k for k in ("unet", "vae", "text_encoder") if parts.get(k) is None]
    if missing:
        which = ", ".join(family.denoiser_folder if k == "unet" else k for k in missing)
        raise ModelLoadError(f"{what}: this {type(pipe).__name__} has no {which}; a text-to-image model needs every component")
    source = PIPELINE_PREFIX + (getattr(pipe, "name_or_path", None) or type(pipe).__name__)
    denoiser = parts["unet"]
    return family(
        name=name or source,
        **parts,
        scheduler_config=dict(pipe.scheduler.config),
        source=source,
        # Where the pipeline runs its models: its device, or the accelerator under diffusers' offload hooks.
        device=torch.device(pipe._execution_device),
        dtype=getattr(denoiser, "dtype", None) or next(denoiser.parameters()).dtype,
    )


def load_models(
    refs: list[str | Any],
    *,
    names: list[str | None] | None = None,
    configs: list[str | None] | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    offload: bool = False,
    allow_pickle: bool = False,
    share: bool = True,
    fields: list[str] | None = None,
    vaes: list[str | None] | None = None,
    loras: list[Sequence[Any] | None] | None = None,
    quantize: list[Quantize | dict | None] | None = None,
    devices: list[str | torch.device | None] | None = None,
) -> list[ModelHandle]:
    """Load several models, sharing identical components. All refs are resolved (and refused,
    for pickles) before the first one loads. `fields` (say, "models[1].model") prefix each
    model's load errors, so they name where the model was given. `vaes` replace models' own VAEs
    (None keeps a model's own). `loras[k]` are model k's LoRAs (see `load_model`): models naming
    one checkpoint (and VAE, quantization and device) hold it once, whatever their LoRAs, each
    LoRA file loaded once. `quantize` loads models' denoisers (and T5) quantized
    (`load_model`; None: full precision). `devices` places each model on its own device (None:
    `device`); under `offload` each device keeps one module at a time. Models on different devices
    share no component.

    A ref may also be a diffusers pipeline object, taken as it is (`from_pipeline`: no weight
    copied; `dtype`, `device` and `offload` do not apply to it); components that are the same
    object in several pipelines are held once because they are one object."""
    n = len(refs)
    for what, given in (
        ("names", names),
        ("configs", configs),
        ("fields", fields),
        ("vaes", vaes),
        ("loras", loras),
        ("quantize", quantize),
        ("devices", devices),
    ):
        if given is not None and len(given) != n:
            raise RecipeError(f"{what}: {len(given)} values for {n} models; give one per model (None keeps the default)")
    names = names or [None] * n
    vaes = vaes or [None] * n
    configs = configs or [None] * n
    fields = fields or [""] * n
    wheres = [f.removesuffix(".model") if f else f"models[{k}]" for k, f in enumerate(fields)]
    specs = [as_quantize(q, f"{w}.quantize") for q, w in zip(quantize or [None] * n, wheres)]
    places = [torch.device(d if d is not None else device) for d in (devices or [None] * n)]
    lora_sets = [list(x or ()) for x in (loras or [None] * n)]

    def named(k: int, err: ModelLoadError) -> ModelLoadError:
        # A LoRA's error names its own field (models[k].loras[j]) already.
        if not fields[k] or str(err).startswith(fields[k].removesuffix(".model") + "."):
            return err
        return type(err)(f"{fields[k]}: {err}")

    def lora_where(k: int, j: int) -> str:
        return f"{fields[k].removesuffix('.model')}.loras[{j}]" if fields[k] else f"loras[{k}][{j}]"

    resolved: list[ModelRef | ModelHandle] = []
    for k, (r, c) in enumerate(zip(refs, configs)):
        if not isinstance(r, (str, ModelRef)):  # a pipeline object, taken as it is
            what = fields[k] or f"models[{k}]"
            given = [
                f
                for f, v in (
                    ("config", c),
                    ("vae", vaes[k]),
                    ("loras", lora_sets[k] or None),
                    ("quantize", specs[k]),
                    ("device", (devices or [None] * n)[k]),
                )
                if v is not None
            ]
            if given:
                raise ModelLoadError(
                    f"{what}: a pipeline object is taken as it is, with its own configs, VAE, LoRAs, quantization and device "
                    f"(set them on the pipeline before handing it over); drop its {given[0]}"
                )
            resolved.append(from_pipeline(r, name=names[k], what=what))
            continue
        try:
            resolved.append(resolve(r, config=c, allow_pickle=allow_pickle) if isinstance(r, str) else r)
        except ModelLoadError as err:
            raise named(k, err) from None
        if specs[k] is not None:  # before anything loads: a missing backend or component is named first
            check_quantize(resolved[-1], family_of(resolved[-1]), specs[k], f"{wheres[k]}.quantize")
    offloaders = {d: Offloader(d) for d in places} if offload else {}
    # Models naming the same checkpoint (and VAE, quantization and device) form one group, loaded
    # once with every LoRA any of them asks for. Pipeline objects are taken as they are.
    groups: dict[str, list[int]] = {}
    for k, ref in enumerate(resolved):
        if not isinstance(ref, ModelHandle):
            groups.setdefault(f"{ref.kind}:{ref.location}:{ref.config}:{vaes[k]}:{specs[k]!r}:{places[k]}", []).append(k)
    handles: list[ModelHandle | None] = [None] * n
    for k in range(n):
        if isinstance(resolved[k], ModelHandle):
            handles[k] = resolved[k]
            continue
        if handles[k] is not None:
            continue
        members = next(g for g in groups.values() if g[0] == k)
        try:
            loaded = _load_base(
                resolved[k],
                [names[m] for m in members],
                [lora_sets[m] for m in members],
                [[lora_where(m, j) for j in range(len(lora_sets[m]))] for m in members],
                dtype=dtype,
                device=places[k],
                offloader=offloaders.get(places[k]),
                allow_pickle=allow_pickle,
                vae=vaes[k],
                quantize=specs[k],
            )
        except (ModelLoadError, IncompatibleModelsError) as err:
            raise named(k, err) from err.__cause__
        if share:
            earlier = [h for h in handles if h is not None]
            _share_with_earlier([*earlier, loaded[0]])
            for h in loaded[1:]:  # the group's handles hold the same modules
                for kind in loaded[0].modules():
                    setattr(h, kind, getattr(loaded[0], kind))
        for m, h in zip(members, loaded):
            handles[m] = h
    return handles  # type: ignore[return-value]
