"""transformers' torchvision warnings about image processors multifusion never uses are silenced
at their source, and nothing else is (`multifusion.logs`)."""

from __future__ import annotations

import logging
import subprocess
import sys

from multifusion.logs import SOURCE, quiet_unused_image_processors


def _kept(message: str) -> bool:
    quiet_unused_image_processors()
    record = logging.LogRecord(SOURCE, logging.WARNING, __file__, 0, message, None, None)
    return logging.getLogger(SOURCE).filter(record)


def test_exactly_the_two_unused_image_processor_warnings_are_dropped():
    for name in ("CLIPImageProcessor", "SiglipImageProcessor"):
        assert not _kept(
            f"`{name}` requires torchvision (not installed); falling back to `{name}Pil` for backward compatibility."
        )
    assert _kept(
        "`ViTImageProcessor` requires torchvision (not installed); falling back to `ViTImageProcessorPil` for backward compatibility."
    )
    assert _kept("something else entirely")


def test_installing_twice_adds_one_filter():
    quiet_unused_image_processors()
    quiet_unused_image_processors()
    assert sum(type(f).__name__ == "_UnusedImageProcessors" for f in logging.getLogger(SOURCE).filters) == 1


def test_importing_diffusers_pipelines_after_multifusion_prints_no_torchvision_warning():
    code = "import multifusion.loading\nfrom diffusers import StableDiffusionPipeline\nfrom diffusers.loaders import IPAdapterMixin\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "requires torchvision" not in done.stderr, done.stderr[-2000:]


def test_the_two_quantization_import_notices_are_dropped_and_nothing_else():
    from multifusion.logs import IMPORT_NOTICES, quiet_quantization_imports

    quiet_quantization_imports()
    quiet_quantization_imports()
    for name, text in IMPORT_NOTICES.items():
        logger = logging.getLogger(name)
        assert sum(type(f).__name__ == "_ImportNotice" for f in logger.filters) == 1

        def kept(message: str, logger=logger) -> bool:
            return logger.filter(logging.LogRecord(logger.name, logging.WARNING, __file__, 0, message, None, None))

        assert not kept(f"<enum 'X'> {text} and more") and kept("another warning")


def test_torchao_kernel_libraries_are_quiet_only_on_a_cpu_build(monkeypatch):
    import torch

    from multifusion.logs import quiet_quantization_imports

    quiet_quantization_imports()
    logger = logging.getLogger("torchao")

    def kept(message: str) -> bool:
        return logger.filter(logging.LogRecord("torchao", logging.WARNING, __file__, 0, message, None, None))

    line = "Failed to load /x/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load this library"
    monkeypatch.setattr(torch.version, "cuda", None)
    assert not kept(line) and kept("Failed to load the config: no such file") and kept("anything else")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert kept(line)  # with CUDA the same line is news
