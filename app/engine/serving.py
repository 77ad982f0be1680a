"""Building the encoder that serves: the one place that reads the engine settings."""

from __future__ import annotations

import logging
import os

from app.engine.backbone import load_backbone, resolve_precision
from app.engine.encoder import SpartanEncoder
from app.engine.graph import try_memory_graph
from app.settings import Settings

log = logging.getLogger(__name__)


def serving_encoder(settings: Settings) -> SpartanEncoder:
    """The encoder that serves (and that `spartan eval` scores with, so its labels are the served
    ones): the backbone at the serving precision, with the compiled graph as `settings.runtime` says."""
    precision = resolve_precision(settings.precision)
    encoder = SpartanEncoder(load_backbone(settings.backbone, settings.cache_dir, precision=precision))
    if settings.runtime != "torch":
        encoder.graph = try_memory_graph(
            encoder.backbone,
            encoder.layernorm_names,
            precision=precision,
            threads=settings.torch_threads or os.cpu_count() or 1,
            required=settings.runtime == "openvino",
            cache_dir=settings.cache_dir / "graphs",
            # fp32, consumed by the conversion; loaded only when the cache misses
            fp32_source=lambda: load_backbone(settings.backbone, settings.cache_dir),
        )
    runtime = "one OpenVINO graph (backbone and memories)" if encoder.graph else "torch eager"
    log.info("serving passes run on %s at %s", runtime, precision)
    return encoder
