"""Memory layer alone: time and peak memory of each implementation, forward and forward+backward.

Contenders (tokens = batch x length, H = 384 as MiniLM, k = 8, C = 3, E = M / C):
  expanded  the published reference code's v2 approach: expand the memory to [N, E, C, H], then gather
            (kept here only as the baseline the spec warns about);
  dense     ours, all M cells as two GEMMs with a zero-outside-top-k weight matrix;
  sparse    ours, gathers only the k chosen parents' rows (cost independent of E);
  auto      what the service runs (dense up to DENSE_MAX_CELLS cells, sparse above).
Each cell runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own.

    python benchmarks/bench_memory_layer.py          # full run: docs/bench_memory_layer.{json,md}
    python benchmarks/bench_memory_layer.py --smoke  # tiny sizes, seconds (run by the tests)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.spartan.layer import DENSE_MAX_CELLS, dense_memory, memory_forward, sparse_memory


def expanded_memory(h, parent_keys, child_keys, child_values, top_k, temperature):  # type: ignore[no-untyped-def]
    """The reference code's v2: gather from a [N, E, C, H] expansion (cost grows with M, not k)."""
    n, hidden = h.shape
    num_children = child_keys.shape[1]
    logits = h @ parent_keys.t()
    top_logits, top_idx = logits.topk(top_k, dim=-1)
    parent_w = torch.softmax(top_logits, dim=-1)
    index = top_idx[:, :, None, None].expand(n, top_k, num_children, hidden)
    keys = child_keys.unsqueeze(0).expand(n, -1, -1, -1).gather(1, index)
    values = child_values.unsqueeze(0).expand(n, -1, -1, -1).gather(1, index)
    child_w = F.softmax(torch.einsum("nkch,nh->nkc", keys, h) / temperature, dim=-1)
    return torch.einsum("nk,nkc,nkch->nh", parent_w, child_w, values), top_idx


IMPLS = {"expanded": expanded_memory, "dense": dense_memory, "sparse": sparse_memory, "auto": memory_forward}


def run_cell(impl: str, cells: int, tokens: int, hidden: int, mode: str, repeats: int) -> dict[str, float]:
    """Time one implementation at one size; returns median/min/max ms and peak RSS growth in MiB."""
    torch.manual_seed(0)
    parents = cells // 3
    params = [
        torch.randn(tokens, hidden),
        torch.randn(parents, hidden) * 0.02,
        torch.randn(parents, 3, hidden) * 0.02,
        torch.randn(parents, 3, hidden) * 0.02,
    ]
    fn = IMPLS[impl]
    if mode == "train":
        params = [p.requires_grad_() for p in params]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def once() -> None:
        if mode == "train":
            out = fn(*params, 8, 1.6)
            (out[0]).sum().backward()
            for p in params:
                p.grad = None
        else:
            with torch.inference_mode():
                fn(*params, 8, 1.6)

    once()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append((time.perf_counter() - start) * 1000)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "peak_rss_growth_mib": max(0, peak - base_rss) / 1024,
        "runs": repeats,
    }


# The expanded baseline's backward allocates a [N, E, C, H] gradient; past this we report, not run, it.
MAX_EXPANDED_GRAD_BYTES = 4 << 30


def in_subprocess(impl: str, cells: int, tokens: int, hidden: int, mode: str, repeats: int) -> dict[str, Any]:
    grad_bytes = tokens * cells * hidden * 4
    if impl == "expanded" and mode == "train" and grad_bytes > MAX_EXPANDED_GRAD_BYTES:
        return {"error": f"not run: its backward needs a {grad_bytes / 2**30:.1f} GiB [N, E, C, H] gradient"}
    if repeats <= 2:  # smoke mode: no isolation needed, and process start-up would dominate
        return run_cell(impl, cells, tokens, hidden, mode, repeats)
    args = [
        sys.executable,
        __file__,
        "--cell",
        impl,
        str(cells),
        str(tokens),
        str(hidden),
        mode,
        str(repeats),
    ]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else f"exit {done.returncode}"}
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--cell", nargs=6)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.cell:
        impl, cells, tokens, hidden, mode, repeats = args.cell
        print(json.dumps(run_cell(impl, int(cells), int(tokens), int(hidden), mode, int(repeats))))
        return
    tokens, hidden = (64, 32) if args.smoke else (16 * 128, 384)
    sizes = [48, 96] if args.smoke else [48, 4096]
    sweep = [48, 96] if args.smoke else [48, 96, 192, 384, 768, 1536, 3072, 4096]
    repeats = 2 if args.smoke else args.repeats
    rows = []
    for cells in sizes:
        for mode in ("infer", "train"):
            for impl in IMPLS:
                result = in_subprocess(impl, cells, tokens, hidden, mode, repeats)
                rows.append({"cells": cells, "mode": mode, "impl": impl, **result})
                print(json.dumps(rows[-1]), flush=True)
    crossover = []
    for cells in sweep:
        for impl in ("dense", "sparse"):
            result = in_subprocess(impl, cells, tokens, hidden, "infer", repeats)
            crossover.append({"cells": cells, "impl": impl, **result})
            print(json.dumps(crossover[-1]), flush=True)
    report = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}",
        "command": "python benchmarks/bench_memory_layer.py" + (" --smoke" if args.smoke else ""),
        "tokens": tokens,
        "hidden": hidden,
        "dense_max_cells": DENSE_MAX_CELLS,
        "rows": rows,
        "crossover": crossover,
    }
    name = "bench_memory_layer_smoke" if args.smoke else "bench_memory_layer"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(render(report))


def render(report: dict) -> str:  # type: ignore[type-arg]
    lines = [
        f"# Memory layer: time and peak memory ({report['date']})",
        "",
        f"Machine: {report['machine']}. Command: `{report['command']}`. "
        f"{report['tokens']} tokens (batch 16 x length 128), H = {report['hidden']}, "
        "k = 8, C = 3, E = M / 3. "
        "Median of the runs shown with [min, max]; peak memory = growth of the process's peak RSS "
        "(a fresh process per cell).",
        "",
        "| M | mode | implementation | median ms [min, max] | peak RSS growth MiB |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        if "error" in row:
            lines.append(f"| {row['cells']} | {row['mode']} | {row['impl']} | failed: {row['error']} | |")
            continue
        lines.append(
            f"| {row['cells']} | {row['mode']} | {row['impl']} | {row['median_ms']:.1f} "
            f"[{row['min_ms']:.1f}, {row['max_ms']:.1f}] | {row['peak_rss_growth_mib']:.0f} |"
        )
    lines += ["", "Crossover (inference, median ms) that sets DENSE_MAX_CELLS "
              f"= {report['dense_max_cells']}:", "", "| M | dense | sparse |", "|---|---|---|"]  # fmt: skip
    by_cells: dict[int, dict[str, float]] = {}
    for row in report["crossover"]:
        by_cells.setdefault(row["cells"], {})[row["impl"]] = row.get("median_ms", float("nan"))
    for cells, times in by_cells.items():
        lines.append(
            f"| {cells} | {times.get('dense', float('nan')):.1f} | {times.get('sparse', float('nan')):.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
