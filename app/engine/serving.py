"""Building the encoder that serves: the one place that reads the engine settings."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

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
            threads=pass_threads(settings),
            streams=engine_streams(settings),
            required=settings.runtime == "openvino",
            cache_dir=settings.cache_dir / "graphs",
            # fp32, consumed by the conversion; loaded only when the cache misses
            fp32_source=lambda: load_backbone(settings.backbone, settings.cache_dir),
        )
    runtime = "one OpenVINO graph (backbone and memories)" if encoder.graph else "torch eager"
    log.info("serving passes run on %s at %s", runtime, precision)
    return encoder


def engine_streams(settings: Settings) -> int:
    """Passes the graph runs at once: the setting, else one per `torch_threads` threads of the CPUs this
    process may use (one single-thread stream per CPU when both are unset). Measured on 2 cores under
    64 clients: two streams of one thread served 1.18x the rows/s of one stream of two threads, for
    ~2 ms more at one client (docs/ENGINE.md)."""
    if settings.engine_streams is not None:
        return settings.engine_streams
    return max(1, available_cpus() // (settings.torch_threads or 1))


def pass_threads(settings: Settings) -> int:
    """Each pass's threads on the graph: the setting, else the CPUs shared among the streams."""
    return settings.torch_threads or max(1, available_cpus() // engine_streams(settings))


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup CPU quota (a container's CPU
    limit, which os.cpu_count() does not see: on a 64-core node a 2-CPU pod would start 64 streams)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    return max(1, min(cpus, math.ceil(quota))) if quota is not None else cpus


def _cgroup_quota(root: Path) -> float | None:
    """CPUs of the cgroup's quota (v2 cpu.max, v1 cfs quota/period); None where there is none."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" = none
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # cgroup v1: -1 = none
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None
