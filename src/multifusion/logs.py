"""Third-party log lines that say nothing about this project's work, silenced at their source.

transformers 5 warns once per class, on import, that `CLIPImageProcessor` and
`SiglipImageProcessor` need torchvision and fall back to their PIL versions. diffusers' pipeline
modules import those two (`pipelines/stable_diffusion`: the safety checker's feature extractor;
`loaders/ip_adapter`: IP-Adapter's image encoder), so every command printed both warnings,
although multifusion never runs an image processor (the safety checker is not loaded; IP-Adapter
is not used). The filter drops exactly those two records, on the one logger that emits them;
every other transformers warning, torchvision ones for other classes included, still shows.
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
