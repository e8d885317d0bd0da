"""Third-party log lines that say nothing about this project's work, silenced at their source.

transformers 5 warns once per class, on import, that `CLIPImageProcessor` and
`SiglipImageProcessor` need torchvision and fall back to their PIL versions. diffusers' pipeline
modules import those two (`pipelines/stable_diffusion`: the safety checker's feature extractor;
`loaders/ip_adapter`: IP-Adapter's image encoder), so every command printed both warnings,
although multifusion never runs an image processor (the safety checker is not loaded; IP-Adapter
is not used). The filter drops exactly those two records, on the one logger that emits them;
every other transformers warning, torchvision ones for other classes included, still shows.

With torchao installed (the `quant` extra), diffusers imports it whenever a pipeline loads, and two
more lines print on every run, whether or not a model is quantized: torch's deprecation notice to
torchao's authors about Enum pytree constants (`torch.utils._pytree`), and diffusers' notice that
torchao-serialized checkpoints may not load (multifusion quantizes at load time and never reads
one). On a CPU build of torch, torchao also names each of its CUDA kernel libraries it cannot
load (`Failed to load .../_C_*.so`), which no CPU build can. `quiet_quantization_imports` drops
exactly those, each on its own logger (the kernel lines only when torch has no CUDA).
"""

from __future__ import annotations

import logging

SOURCE = "transformers.utils.import_utils"
"""The logger of transformers' lazy-import fallback (`_LazyModule.__getattr__`)."""
UNUSED = ("CLIPImageProcessor", "SiglipImageProcessor")
"""Image processors diffusers imports on pipeline import and multifusion never calls."""


class _UnusedImageProcessors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(
            text.startswith(f"`{name}` requires torchvision (not installed); falling back to `{name}Pil`") for name in UNUSED
        )


def quiet_unused_image_processors() -> None:
    """Install the filter (once: calling again adds nothing). Imports nothing from transformers."""
    logger = logging.getLogger(SOURCE)
    if not any(isinstance(f, _UnusedImageProcessors) for f in logger.filters):
        logger.addFilter(_UnusedImageProcessors())


IMPORT_NOTICES = {
    "torch.utils._pytree": "is an Enum subclass and is now natively supported by torch.compile",
    "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects.",
}
"""Logger -> the text of the one notice dropped there (`quiet_quantization_imports`)."""


class _ImportNotice(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class _CudaKernelsOnCpu(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        import sys

        torch = sys.modules.get("torch")  # imported by torchao before it logs
        text = record.getMessage()
        cpu_build = torch is not None and getattr(torch.version, "cuda", None) is None
        return not (cpu_build and text.startswith("Failed to load ") and ".so" in text.split(":")[0])


def quiet_quantization_imports() -> None:
    """Install the `IMPORT_NOTICES` filters and the CPU-build kernel one on the `torchao` logger
    (once each). Imports neither torch nor diffusers."""
    for name, text in IMPORT_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ImportNotice) for f in logger.filters):
            logger.addFilter(_ImportNotice(text))
    logger = logging.getLogger("torchao")
    if not any(isinstance(f, _CudaKernelsOnCpu) for f in logger.filters):
        logger.addFilter(_CudaKernelsOnCpu())
