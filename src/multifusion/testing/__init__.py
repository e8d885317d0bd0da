"""Helpers that build tiny, offline Stable-Diffusion-shaped models (tests, demos, benchmarks)."""

from multifusion.testing.tiny import build_tiny_pipeline, write_clip_tokenizer

__all__ = ["build_tiny_pipeline", "write_clip_tokenizer"]
