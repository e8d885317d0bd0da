"""LoRAs: a model is a base checkpoint with low-rank adapters applied, and models that share a base
hold it once.

Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen, "LoRA: Low-Rank Adaptation of Large Language
Models", ICLR 2022, arXiv 2106.09685: a linear layer W becomes W + s (alpha / r) B A.

LoRAs are applied exactly as diffusers applies them, by diffusers itself:
`pipe.load_lora_weights(folder, weight_name=file, adapter_name=name)` injects peft layers into the
denoiser and the text encoders (diffusers converts the kohya/A1111 and older layouts), and what
`pipe.set_adapters(names, adapter_weights=scales)` does to each component (a diffusers model's
`set_adapters`, a transformers text encoder's `set_adapters_for_text_encoder`) is done here per
component by `AdapterSet.activate`.

Several models on one base (the base alone, base + LoRA a, base + a + b at other scales) load the
base once and every distinct LoRA file once into it; each model's handle holds its `AdapterSet` and
activates it on a shared module right before that module runs (`ModelHandle._on_device`), so N
such models cost one base plus N LoRAs in memory. Switching is skipped when the module already has
the set (the module remembers the last set activated on it). A model of the group without LoRAs
activates the empty set: every peft layer then runs its base layer alone, the base model exactly.

Models of one base that each run at most one LoRA (or none), every LoRA at one weight across them,
also denoise together in one call (`per_sample_adapters`): peft's mixed-batch forward runs the base
layer on the whole batch and adds each LoRA's update to its own samples only, which is each model's
own layer output sample by sample. Models with several LoRAs at once, or one LoRA at two weights,
are called one by one (`per_sample_names` says which).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multifusion.errors import ModelLoadError, PickleRefusedError, did_you_mean

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
"""Weight files that are pickles, refused unless pickles are allowed (models and LoRAs alike)."""
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
"""The file `save_lora_weights` writes in a LoRA folder (diffusers' LORA_WEIGHT_NAME_SAFE)."""


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a model: its file, its adapter weight and its adapter name (None: from the
    file's stem). A recipe's `LoraEntry`, or a dict {path, scale, name} from Python, reads as one."""

    path: str
    scale: float = 1.0
    name: str | None = None

    @classmethod
    def of(cls, value: Any) -> LoraSpec:
        if isinstance(value, LoraSpec):
            return value
        if isinstance(value, (str, Path)):
            return cls(str(value))
        if isinstance(value, Mapping):
            return cls(str(value["path"]), float(value.get("scale", 1.0)), value.get("name"))
        return cls(str(value.path), float(value.scale), getattr(value, "name", None))


def zoo_lora_root() -> Path:
    """Where the embedded zoo's LoRAs are installed (`multifusion.zoo.loras`)."""
    return Path(__file__).parent / "zoo" / "weights" / "loras"


def zoo_loras() -> list[str]:
    """Names of the zoo's installed LoRAs (`zoo:NAME` in a model's `loras`)."""
    root = zoo_lora_root()
    return sorted(p.stem for p in root.glob("*.safetensors")) if root.is_dir() else []


def lora_file(path: str, *, allow_pickle: bool = False) -> Path:
    """The weight file a LoRA path names, checked without loading its tensors: `zoo:NAME` (a zoo
    LoRA), a file, or a folder
    holding `pytorch_lora_weights.safetensors` or exactly one .safetensors file. Pickle files are
    refused unless `allow_pickle`; a .safetensors header must be sound and list LoRA tensors.
    ModelLoadError (PickleRefusedError) saying what to change."""
    if path.startswith("zoo:"):
        available = zoo_loras()
        if path[4:] not in available:
            raise ModelLoadError(
                f"unknown zoo LoRA {path!r} (available: {', '.join(available) or 'none'}){did_you_mean(path[4:], available, 'zoo:')}"
            )
        path = str(zoo_lora_root() / f"{path[4:]}.safetensors")
    p = Path(path).expanduser()
    if p.is_dir():
        candidates = sorted(p.glob("*.safetensors"))
        if (p / DIFFUSERS_LORA_FILE).is_file():
            p = p / DIFFUSERS_LORA_FILE
        elif len(candidates) == 1:
            p = candidates[0]
        elif candidates:
            names = ", ".join(c.name for c in candidates)
            raise ModelLoadError(f"folder {path!r} holds several .safetensors files ({names}); name the LoRA file itself")
        else:
            pickled = sorted(f.name for f in p.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
            if not pickled:
                raise ModelLoadError(f"folder {path!r} holds no LoRA weights (no .safetensors file)")
            if len(pickled) > 1:
                raise ModelLoadError(
                    f"folder {path!r} holds several weight files ({', '.join(pickled)}); name the LoRA file itself"
                )
            p = p / pickled[0]
    elif not p.is_file():
        raise ModelLoadError(f"LoRA file {path!r} does not exist")
    suffix = p.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise PickleRefusedError.of(str(p), "LoRA file")
        return p
    if suffix != ".safetensors":
        raise ModelLoadError(f"{str(p)!r} is not a LoRA file: give a .safetensors file (or its folder)")
    _check_lora_header(p)
    return p


def _check_lora_header(path: Path) -> None:
    """ModelLoadError unless `path` is a sound .safetensors file listing LoRA tensors (names with
    `lora` in them, as every layout diffusers reads has: peft's lora_A/lora_B, kohya's
    lora_down/lora_up, A1111's lora_te_/lora_unet_ prefixes)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(f"{str(path)!r} is a corrupt .safetensors file ({err}); download or export it again") from None
    if not any("lora" in k.lower() for k in keys):
        raise ModelLoadError(
            f"{str(path)!r} holds no LoRA tensors ({len(keys)} tensors, none named lora_*): is it a full "
            "checkpoint? Give a full model as `model`, a LoRA under `loras`"
        )


@dataclass(frozen=True)
class AdapterSet:
    """The adapters a model runs with on its (shared) base, and their weights: what
    `pipe.set_adapters(names, adapter_weights=weights)` sets. Empty: the base alone."""

    names: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    # The LoRAs as given ({path, scale, name?} each, in order): what a recipe made from the
    # handle (`multifusion.fuse`) writes, so the images' metadata regenerates them.
    given: tuple[dict, ...] = ()

    def activate(self, module: torch.nn.Module) -> None:
        """Make this set the active one on `module` (a denoiser or text encoder), as
        `pipe.set_adapters` does for that component; nothing when it holds no LoRA layers or
        already runs this set.

        For adapter weights that are numbers, diffusers' `set_adapters` on a diffusers model (its
        per-block scale expansion leaves numbers as they are) and `set_adapters_for_text_encoder`
        on a text encoder both come to `set_weights_and_activate_adapters`
        (diffusers/utils/peft_utils.py): on every peft layer, `set_adapter(names)` and then
        `set_scale(name, weight)` per adapter. That is done here on the module's peft layers,
        listed once (`_lora_layers`): walking every submodule on each switch costs as much as
        the rest of the switch."""
        state = (self.names, self.weights)
        if module.__dict__.get("_per_sample_adapters") or getattr(module, "_active_adapter_set", None) == state:
            return
        layers = _lora_layers(module)
        if not layers:
            return
        names = list(self.names)
        for layer in layers:
            layer.set_adapter(names)
            for name, weight in zip(self.names, self.weights):
                layer.set_scale(name, weight)
        # peft marks active adapters trainable; harmless here, every family's call runs under
        # torch.no_grad (turning it back off would double the cost of a switch).
        module._active_adapter_set = state


BASE_ONLY = "__base__"
"""peft's name for "no adapter" in a mixed batch (`adapter_names`)."""


def per_sample_names(
    sets: Sequence[AdapterSet | None], module: torch.nn.Module | None = None
) -> tuple[list[str], dict[str, float]] | None:
    """For models of one base with these adapter sets (None: no LoRA): the adapter each runs in a
    mixed batch (`BASE_ONLY` for none) and every adapter's weight, when each set holds at most one
    LoRA, a LoRA has one weight wherever it is used and none is a DoRA adapter of `module` (the
    shared denoiser; peft refuses DoRA in a mixed batch); None otherwise (the models run apart)."""
    if module is not None and any(_dora(module, n) for s in sets if s is not None for n in s.names):
        return None
    names, weights = [], {}
    for s in sets:
        if s is None or not s.names:
            names.append(BASE_ONLY)
        elif len(s.names) > 1 or weights.setdefault(s.names[0], s.weights[0]) != s.weights[0]:
            return None
        else:
            names.append(s.names[0])
    return names, weights


@contextmanager
def per_sample_adapters(module: torch.nn.Module, names: list[str], weights: Mapping[str, float]) -> Iterator[None]:
    """Run `module` (a denoiser) on a batch whose sample i takes adapter `names[i]` (`BASE_ONLY`:
    the base layer alone), each adapter at its weight in `weights`, for the duration of the
    block: every peft layer gets peft's `adapter_names` argument (its mixed-batch forward, as
    `PeftModel` passes it, by a forward pre-hook), and `AdapterSet.activate` leaves the module
    alone meanwhile. Afterwards the next activation sets every layer again."""
    layers = _lora_layers(module)
    if any(_dora(module, n) for n in weights):
        raise ValueError("a DoRA adapter cannot run in a mixed batch (peft refuses it); run its models apart")
    for layer in layers:
        for name, weight in weights.items():
            layer.set_scale(name, weight)

    def inject(_layer, args, kwargs):
        return args, {**kwargs, "adapter_names": names}

    hooks = [layer.register_forward_pre_hook(inject, with_kwargs=True) for layer in layers]
    module.__dict__["_per_sample_adapters"] = True
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        module.__dict__.pop("_per_sample_adapters", None)
        module.__dict__.pop("_active_adapter_set", None)  # the scales changed: the next activation sets them again


def _dora(module: torch.nn.Module, name: str) -> bool:
    """Whether adapter `name` is a DoRA adapter on any of `module`'s peft layers."""
    return any(layer.use_dora.get(name, False) for layer in _lora_layers(module))


def _lora_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The peft layers of `module`, listed on first use (`apply_loras` clears the list when it
    adds adapters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = module.__dict__.get("_lora_layers")
    if layers is None:
        layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
        module.__dict__["_lora_layers"] = layers
    return layers


def _forget_active_sets(pipe: Any) -> None:
    """After adapters are added to `pipe`'s modules: their peft layers are listed again and the
    next activation sets every layer."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.__dict__.pop("_lora_layers", None)
            component.__dict__.pop("_active_adapter_set", None)


def _adapter_name(spec: LoraSpec, file: Path, taken: set[str]) -> str:
    """`spec.name`, else the file's stem (or folder's name for diffusers' default file name) made a
    valid adapter name, numbered when another LoRA of the base has it."""
    if spec.name is not None:
        return spec.name
    stem = file.parent.name if file.name == DIFFUSERS_LORA_FILE else file.stem
    base = re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "lora"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


class _Warnings(logging.Handler):
    """Collects what diffusers' LoRA loading warns about, to raise it instead."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class _NoKeysForComponent(logging.Filter):
    """Drops diffusers' note that a LoRA has no keys for one component (a UNet-only LoRA has none
    for the text encoder: the usual case); a LoRA matching no component at all is an error here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to")


@contextmanager
def _diffusers_warnings() -> Iterator[_Warnings]:
    """The warnings diffusers logs while the block runs, whatever its verbosity is set to."""
    root = logging.getLogger("diffusers")
    loader = logging.getLogger("diffusers.loaders.lora_base")
    warned, quiet, level = _Warnings(), _NoKeysForComponent(), root.level
    root.addHandler(warned)
    loader.addFilter(quiet)
    if root.getEffectiveLevel() > logging.WARNING:
        root.setLevel(logging.WARNING)
    try:
        yield warned
    finally:
        root.setLevel(level)
        loader.removeFilter(quiet)
        root.removeHandler(warned)


def apply_loras(
    pipe: Any, lora_sets: Sequence[Sequence[Any]], fields: Sequence[Sequence[str]], *, allow_pickle: bool = False
) -> list[AdapterSet]:
    """Load the LoRAs of several models sharing `pipe` (a loaded diffusers pipeline) into it, each
    distinct file once, and return each model's `AdapterSet` (lora_sets[k] the LoRAs of model k,
    `fields[k][j]` where LoRA j of model k was given, for errors). ModelLoadError naming the field
    when a file is unfit, diffusers cannot apply it (a LoRA for another architecture: shapes differ)
    or its keys match nothing (or only part) of this model."""
    loaded: dict[Path, str] = {}  # file -> adapter name
    names_of_files: dict[str, Path] = {}
    out = []
    for specs, where_list in zip(lora_sets, fields):
        names, weights, given = [], [], []
        for raw, where in zip(specs, where_list):
            spec = LoraSpec.of(raw)
            try:
                file = lora_file(spec.path, allow_pickle=allow_pickle).resolve()
            except ModelLoadError as err:
                raise type(err)(f"{where}.path: {err}") from None
            if file not in loaded:
                name = _adapter_name(spec, file, set(names_of_files))
                if name in names_of_files:
                    raise ModelLoadError(
                        f"{where}.name: {name!r} already names LoRA {str(names_of_files[name])!r} on this base; "
                        "give each LoRA file its own name"
                    )
                _load_one(pipe, file, name, where, allow_pickle)
                loaded[file], names_of_files[name] = name, file
            if loaded[file] in names:
                raise ModelLoadError(
                    f"{where}: LoRA {spec.path!r} is given twice for one model; give it once, with the sum of the scales"
                )
            names.append(loaded[file])
            weights.append(float(spec.scale))
            given.append({"path": spec.path, "scale": float(spec.scale), **({"name": spec.name} if spec.name else {})})
        out.append(AdapterSet(tuple(names), tuple(weights), tuple(given)))
    _forget_active_sets(pipe)
    return out


def _load_one(pipe: Any, file: Path, name: str, where: str, allow_pickle: bool) -> None:
    """`pipe.load_lora_weights` of one file as adapter `name`, its failures and partial matches
    raised naming `where`."""
    try:
        with _diffusers_warnings() as warned, warnings.catch_warnings():
            # peft's note on a second adapter in one model: that is what a shared base is.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            pipe.load_lora_weights(
                str(file.parent), weight_name=file.name, adapter_name=name, use_safetensors=None if allow_pickle else True
            )
    except Exception as err:  # diffusers and peft raise ValueError, RuntimeError (shapes), KeyError here
        if "not found in the base model" in str(err):  # peft's NoMatchingPeftModuleError
            raise ModelLoadError(_matches_nothing(where, file, pipe)) from err
        raise ModelLoadError(
            f"{where}: LoRA {str(file)!r} does not apply to this {type(pipe).__name__} ({type(err).__name__}: "
            f"{_short(str(err))}); is it a LoRA for another model family?"
        ) from err
    present = {n for adapters in pipe.get_list_adapters().values() for n in adapters}
    if name not in present:
        raise ModelLoadError(_matches_nothing(where, file, pipe))
    unhandled = [m for m in warned.messages if "unexpected keys" in m or "missing keys" in m]
    if unhandled:
        raise ModelLoadError(
            f"{where}: LoRA {str(file)!r} matches this {type(pipe).__name__} only in part ({_short(unhandled[0])}); "
            "is it a LoRA for another version of this model?"
        )


def _matches_nothing(where: str, file: Path, pipe: Any) -> str:
    return (
        f"{where}: no key of LoRA {str(file)!r} matches a layer of this {type(pipe).__name__}, so it would change "
        "nothing; is it a LoRA for another model family?"
    )


def _short(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."
