"""This process's resident memory from /proc (Linux): the benchmarks' peak-memory measure.

Peak working memory of a piece of code = the RSS high-water mark (VmHWM) during it minus the RSS before
it, after resetting the mark (writing 5 to /proc/self/clear_refs). Run with MALLOC_MMAP_THRESHOLD_ set
low so freed tensors go back to the OS and the next measurement starts from a true baseline.
"""

from __future__ import annotations

import re
from pathlib import Path


def status_mib(field_name: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM, ...) in MiB; NaN where unavailable."""
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else float("nan")


def reset_peak() -> bool:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return abs(status_mib("VmHWM") - status_mib("VmRSS")) < 1.0
