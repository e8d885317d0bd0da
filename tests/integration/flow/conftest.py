"""Tiny SD3- and FLUX-shaped pipelines built from config (no network): `sd3_a` and `sd3_b` are
fine-tunes of one base (same encoders and VAE, different transformers), as are `flux_a` and
`flux_b`; `sd3_no_t5` has no T5 encoder; `flux_schnell` has no guidance embedding."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def flow_dir(tmp_path_factory):
    from multifusion.testing import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("flow")
    build_tiny_sd3_pipeline(root / "sd3_a", seed=0)
    build_tiny_sd3_pipeline(root / "sd3_b", seed=1, text_seed=0, vae_seed=0)
    build_tiny_sd3_pipeline(root / "sd3_no_t5", seed=2, t5=False)
    build_tiny_flux_pipeline(root / "flux_a", seed=0)
    build_tiny_flux_pipeline(root / "flux_b", seed=1, text_seed=0, vae_seed=0)
    build_tiny_flux_pipeline(root / "flux_schnell", seed=2, guidance_embeds=False)
    return root


@pytest.fixture(scope="session")
def sd3_a(flow_dir):
    return str(flow_dir / "sd3_a")


@pytest.fixture(scope="session")
def sd3_b(flow_dir):
    return str(flow_dir / "sd3_b")


@pytest.fixture(scope="session")
def flux_a(flow_dir):
    return str(flow_dir / "flux_a")


@pytest.fixture(scope="session")
def flux_b(flow_dir):
    return str(flow_dir / "flux_b")
