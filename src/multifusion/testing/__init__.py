"""The test kit: tiny offline pipelines (built by `multifusion.zoo.tiny`,
`tiny_sdxl` and `tiny_flow`) and a writer of single-file (LDM layout) checkpoints. The library
never imports it."""

from multifusion.zoo.tiny import build_tiny_pipeline
from multifusion.zoo.tiny_flow import build_tiny_flux_pipeline, build_tiny_sd3_pipeline
from multifusion.zoo.tiny_sdxl import build_tiny_sdxl_pipeline
from multifusion.zoo.tokenizer import write_clip_tokenizer

__all__ = [
    "build_tiny_pipeline",
    "build_tiny_sdxl_pipeline",
    "build_tiny_sd3_pipeline",
    "build_tiny_flux_pipeline",
    "write_clip_tokenizer",
]
