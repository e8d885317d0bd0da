"""Quantized weights through diffusers' own quantization support (docs/quantization.md).

A recipe model's `quantize` (`recipe.Quantize`) asks for its denoiser and/or T5 encoder to load
quantized. Nothing here quantizes a tensor: the spec becomes the `PipelineQuantizationConfig`
that diffusers' `from_pretrained` takes, so a quantized model is exactly the pipeline diffusers
loads with that config (diffusers' config classes for the denoiser, transformers' for T5):

    backend       weights        quantization type
    torchao       int8           Int8WeightOnlyConfig()                     CPU and GPUs
                  int8_dynamic   Int8DynamicActivationInt8WeightConfig()    CPU and GPUs
                  int4           Int4WeightOnlyConfig()                     CUDA (its kernels)
                  float8         Float8WeightOnlyConfig()                   recent GPUs; CPU emulated
    bitsandbytes  int8           BitsAndBytesConfig(load_in_8bit=True)      CUDA
                  nf4, fp4       BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=...,
                                 bnb_4bit_compute_dtype=the run's dtype)
    gguf          (the file's)   the denoiser from a .gguf file: its class's from_single_file with
                                 GGUFQuantizationConfig(compute_dtype=the run's dtype), configs from
                                 the model's folder or Hub id; dequantized per layer as it runs

torchao quantizes the linear layers (attention and feed-forward projections: nearly all of a
transformer's weights, most of a UNet's); convolutions, norms and embeddings keep the run's dtype.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import torch

from multifusion.errors import ModelLoadError, RecipeError
from multifusion.handles import ModelHandle
from multifusion.recipe import Quantize

PACKAGES = {"torchao": "torchao", "bitsandbytes": "bitsandbytes", "gguf": "gguf"}
"""The package each backend needs (the `quant` extra installs torchao)."""


def check_backend(spec: Quantize, where: str) -> None:
    """ModelLoadError naming `where` (say "models[1].quantize") when the backend's package is not
    installed, with the command that installs it."""
    package = PACKAGES[spec.backend]
    if importlib.util.find_spec(package) is None:
        extra = f"pip install {package}" if spec.backend == "bitsandbytes" else "pip install 'multifusion[quant]'"
        raise ModelLoadError(f"{where}.backend: {spec.backend} quantization needs the {package} package ({extra})")


def component_folders(spec: Quantize, family: type[ModelHandle], where: str, absent: Sequence[str] = ()) -> list[str]:
    """The pipeline components `spec` quantizes in a model of `family` (its denoiser's folder, its
    T5 encoder's); RecipeError naming `where.components` for a T5 the model does not have (no
    such encoder in the family, or listed as absent in the model's model_index.json)."""
    out = []
    for part in spec.components:
        if part == "denoiser":
            out.append(family.denoiser_folder)
            continue
        folder = family.t5_component
        if folder is None or folder in absent:
            which = f"a {family.family_name} model" if folder is None else "this model (its T5 encoder is absent)"
            raise RecipeError(f"{where}.components: {which} has no T5 encoder to quantize; drop t5")
        out.append(folder)
    return out


def _torchao_type(weights: str) -> Any:
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    return {
        "int8": Int8WeightOnlyConfig,
        "int8_dynamic": Int8DynamicActivationInt8WeightConfig,
        "int4": Int4WeightOnlyConfig,
        "float8": Float8WeightOnlyConfig,
    }[weights]()


def module_config(spec: Quantize, library: Any, dtype: torch.dtype) -> Any:
    """The quantization config of one component for `library` (the `diffusers` or `transformers`
    module: each takes its own config class, with the same arguments)."""
    if spec.backend == "torchao":
        return library.TorchAoConfig(_torchao_type(spec.format))
    if spec.format == "int8":
        return library.BitsAndBytesConfig(load_in_8bit=True)
    return library.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.format, bnb_4bit_compute_dtype=dtype)


def pipeline_config(
    spec: Quantize, family: type[ModelHandle], dtype: torch.dtype, where: str = "quantize", absent: Sequence[str] = ()
) -> Any:
    """The `PipelineQuantizationConfig` that loads a model of `family` quantized as `spec` asks,
    the denoiser through diffusers' config class and T5 through transformers' (not for gguf:
    `gguf_denoiser`). `where` names the recipe field in errors."""
    import diffusers
    import transformers

    check_backend(spec, where)
    mapping = {}
    for folder in component_folders(spec, family, where, absent):
        library = diffusers if folder == family.denoiser_folder else transformers
        mapping[folder] = module_config(spec, library, dtype)
    return diffusers.PipelineQuantizationConfig(quant_mapping=mapping)


def gguf_denoiser(spec: Quantize, family: type[ModelHandle], configs: str, dtype: torch.dtype) -> torch.nn.Module:
    """The denoiser of a model of `family` from the GGUF file `spec.file`, its config read from
    `configs` (the model's folder or Hub id), as diffusers loads one: the family's denoiser class's
    `from_single_file` with `GGUFQuantizationConfig(compute_dtype=dtype)` (files in the original
    layout are converted by diffusers; files in diffusers' layout load as they are)."""
    import diffusers

    cls = getattr(diffusers, family.denoiser_class)
    return cls.from_single_file(
        spec.file,
        quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=dtype),
        config=configs,
        subfolder=family.denoiser_folder,
        torch_dtype=dtype,
    )
