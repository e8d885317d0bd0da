"""Shared fixtures: tiny Stable-Diffusion-shaped pipelines built from config, saved and loaded
through the real loaders (no network)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models gain nothing from a second thread, and one thread keeps the suite steady when
# another job shares the machine.
torch.set_num_threads(1)

# The files that take minutes (the whole zoo demo alone about 7 of them), first in the queue: in
# two processes (`-n 2 --dist loadfile`, with pyproject's `--no-loadscope-reorder`; xdist's
# default order puts files with few tests last) the other process works through the rest beside
# them, instead of idling while one of them runs at the end.
SLOW_FILES_FIRST = ("tests/integration/test_demo.py", "tests/ui/test_browser.py", "tests/integration/test_faults.py")


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Folder of tiny pipelines: `a` and `b` are fine-tunes of one base (same text encoder and
    VAE, different UNets); `v` predicts v; `wide` has 8 latent channels (another latent space)."""
    from multifusion.testing import build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny")
    build_tiny_pipeline(root / "a", seed=0)
    build_tiny_pipeline(root / "b", seed=1, text_seed=0, vae_seed=0)
    build_tiny_pipeline(root / "c", seed=2, text_seed=0, vae_seed=0)
    build_tiny_pipeline(root / "v", seed=3, prediction_type="v_prediction")
    build_tiny_pipeline(root / "wide", seed=4, latent_channels=8)
    return root


@pytest.fixture(scope="session")
def tiny_a(tiny_dir):
    return str(tiny_dir / "a")


@pytest.fixture(scope="session")
def tiny_b(tiny_dir):
    return str(tiny_dir / "b")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """Folder of tiny SDXL pipelines: `a`; `b` a fine-tune of it (same text encoders and VAE,
    another UNet); `c` a fine-tune with retrained text encoders; `v` predicts v; `keep` encodes
    empty negative prompts (force_zeros_for_empty_prompt False)."""
    from multifusion.testing import build_tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("tiny_sdxl")
    build_tiny_sdxl_pipeline(root / "a", seed=0)
    build_tiny_sdxl_pipeline(root / "b", seed=1, text_seed=0, vae_seed=0)
    build_tiny_sdxl_pipeline(root / "c", seed=2, text_seed=5, vae_seed=0)
    build_tiny_sdxl_pipeline(root / "v", seed=3, prediction_type="v_prediction")
    build_tiny_sdxl_pipeline(root / "keep", seed=0, force_zeros_for_empty_prompt=False)
    return root
