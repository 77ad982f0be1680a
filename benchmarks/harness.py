"""The shared benchmark harness: environment, alternating rounds, spread, child processes, reports.

Every benchmark is a thin script over this module, so that every figure in docs/ was measured the same
way: contenders alternate inside each round (machine noise hits them alike), ratios are taken per
round, and every figure comes with its spread over rounds and the machine it ran on. Runtimes that
bring their own thread pools (torch, ONNX Runtime, OpenVINO) each run in a child process of their
own: in one process their pools steal each other's cores.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def package_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return platform.processor()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


def environment(**extra: Any) -> dict[str, Any]:
    """Date, machine and software of a run; `extra` adds the benchmark's own settings."""
    packages = ("torch", "transformers", "onnxruntime", "openvino", "adapters", "peft")
    return {
        "date": date.today().isoformat(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "packages": {name: v for name in packages if (v := package_version(name)) is not None},
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        **extra,
    }


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max over rounds, and how many rounds."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
    }


def seconds_per_call(call: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls


def calibrate(contenders: Mapping[str, Callable[[], object]], target_s: float) -> int:
    """Warm every contender up (first calls at a shape allocate and pick kernels), then pick the number
    of calls per timing so that one timing lasts about `target_s` (the same for every contender)."""
    for call in contenders.values():
        call()
    typical = statistics.median(seconds_per_call(call, 1) for call in contenders.values())
    return max(1, round(target_s / max(typical, 1e-9)))


def alternate(
    contenders: Mapping[str, Callable[[], object]],
    *,
    rounds: int,
    items_per_call: int,
    target_s: float = 0.5,
) -> dict[str, list[float]]:
    """Throughput (items/s) of each contender per round; inside a round, the contenders take turns,
    and the order rotates from round to round so that none always runs first."""
    calls = calibrate(contenders, target_s)
    names = list(contenders)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    for number in range(rounds):
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            per_round[name].append(items_per_call / seconds_per_call(contenders[name], calls))
    return per_round


def ratios(per_round: Mapping[str, Sequence[float]], base: str) -> dict[str, dict[str, float]]:
    """Each contender's throughput over `base`'s, per round (same round = same machine state)."""
    return {
        name: spread([a / b for a, b in zip(values, per_round[base], strict=True)])
        for name, values in per_round.items()
        if name != base
    }


def run_child(command: Sequence[str], *, timeout_s: float, env: Mapping[str, str] | None = None) -> Any:
    """Run a benchmark child process; its last stdout line is its JSON result."""
    done = subprocess.run(
        list(command),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def command_line(script: str) -> str:
    """The command that reproduces this run, as written in reports."""
    return " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]])


def write_report(out: Path, name: str, report: Mapping[str, Any], markdown: str) -> None:
    """`name`.json (every number) and `name`.md (the tables) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)


def fmt_spread(entry: Mapping[str, float], digits: int = 1) -> str:
    """`median [min, max]`."""
    return f"{entry['median']:.{digits}f} [{entry['min']:.{digits}f}, {entry['max']:.{digits}f}]"
