"""Memory layer: time and peak memory of each path as the memory grows from M = 48 to 16,384 cells, at
fixed k = 8 and C = 4 (claim: flat within 1.5x). Method: docs/BENCHMARKS.md, "Memory scaling".

    python benchmarks/bench_memory_scaling.py          # docs/bench_memory_scaling.{json,md,png}
    python benchmarks/bench_memory_scaling.py --children 3 --cells 48 4096 --shapes batch \\
        --paths expanded dense sparse auto --name bench_memory_layer   # against the reference (BENCHMARKS.md)
    python benchmarks/bench_memory_scaling.py --smoke  # tiny sizes, seconds (run by the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from operator import itemgetter
from pathlib import Path
from typing import Any

# Before torch starts OpenMP (docs/BENCHMARKS.md, section 4); set OMP_WAIT_POLICY to measure otherwise.
os.environ["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.spartan import layer as L
from app.spartan.memory import MemoryLayer
from benchmarks import harness

TOP_K, TEMPERATURE, GOAL = 8, 1.6, 1.5  # GOAL: "flat within 1.5x"
FULL_CELLS = [48, 96, 192, 384, 768, 1536, 3072, 6144, 12288, 16384]
SMOKE_CELLS = [48, 768, 3072, 6144]  # crosses DENSE_MAX_CELLS: `auto` runs both paths, two sizes above
PATHS = ("sparse", "dense", "auto", "router", "topk", "expanded")
SHAPES = {"batch": (16, 128, ("infer", "train")), "serve": (8, 64, ("infer",))}
SMOKE_SHAPES = {"batch": (4, 16, ("infer", "train")), "serve": (2, 8, ("infer",))}
SERVE_PATHS = ("sparse", "dense", "auto")
MAX_CALLS, MAX_EXPANDED_GRAD_BYTES = 50, 4 << 30
EXPECTATION = {
    "sparse": "should be flat",
    "auto": "not expected: dense below the threshold is cheaper by design",
    "auto above threshold": "should be flat (what the product runs on large memories)",
    "dense": "not expected: O(M) by construction",
    "router": "not expected: O(E) by the method's definition (P h over all parents)",
    "topk": "not expected: O(E)",
    "expanded": "the reference code's v2 approach",
    "sparse minus router": "should be flat (derived: sparse median - router median)",
}
FLAT = ("sparse", "auto above threshold", "sparse minus router")
series = itemgetter("shape", "path", "mode")  # a series: one contender's rows over M


def expanded_memory(h, parent_keys, child_keys, child_values, top_k, temperature):  # type: ignore[no-untyped-def]
    """The reference code's v2: gather from a [N, E, C, H] expansion (its backward builds one)."""
    n, hidden = h.shape
    _, top_idx, parent_w = L._choose_parents(h, parent_keys, top_k)
    index = top_idx[:, :, None, None].expand(n, top_k, child_keys.shape[1], hidden)
    keys = child_keys.unsqueeze(0).expand(n, -1, -1, -1).gather(1, index)
    values = child_values.unsqueeze(0).expand(n, -1, -1, -1).gather(1, index)
    child_w = F.softmax(torch.einsum("nkch,nh->nkc", keys, h) / temperature, dim=-1)
    return L.MemoryOutput(torch.einsum("nk,nkc,nkch->nh", parent_w, child_w, values), top_idx, top_idx)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build_cases(cells: int, shape: str, args: Any) -> dict[tuple[str, int, str, str], tuple[Any, int]]:
    """(shape, M, path, mode) -> (one call, resident bytes): the contenders at one M and shape, sharing one
    MemoryLayer and one batch of token states."""
    torch.manual_seed(args.seed)
    batch, length, modes = (SMOKE_SHAPES if args.smoke else SHAPES)[shape]
    tokens, children = batch * length, args.children
    layer = MemoryLayer(args.hidden, cells // children, children, TOP_K, TEMPERATURE)
    P, K, V = layer.parent_keys, layer.child_keys, layer.child_values
    h = torch.randn(tokens, args.hidden)
    h_train = h.clone().requires_grad_()
    keys_t, values = (t.contiguous() for t in L.child_major(K.detach(), V.detach(), TEMPERATURE))
    logits = (h @ P.detach().t()).contiguous()
    base = nbytes(P, K, V, h)
    # Dense inference keeps the child-major cache resident, as MemoryLayer does for its dense sizes.
    cache = nbytes(keys_t, values)
    resident = {"dense": base + cache, "auto": base + cache * L.uses_dense(cells // children, children)}
    resident["topk"] = base + nbytes(logits)
    infer: dict[str, Callable[[], Any]] = {
        "sparse": lambda: L.sparse_memory(h, P, K, V, TOP_K, TEMPERATURE),
        "dense": lambda: L.dense_memory_child_major(h, P, keys_t, values, children, TOP_K),
        "auto": lambda: layer(h),
        "router": lambda: L._choose_parents(h, P, TOP_K),
        "topk": lambda: logits.topk(TOP_K, dim=-1),
        "expanded": lambda: expanded_memory(h, P, K, V, TOP_K, TEMPERATURE),
    }
    # Each training forward returns what its upstream gradient flows into.
    train: dict[str, Callable[[], torch.Tensor]] = {
        "sparse": lambda: L.sparse_memory(h_train, P, K, V, TOP_K, TEMPERATURE).update,
        "dense": lambda: L.dense_memory(h_train, P, K, V, TOP_K, TEMPERATURE).update,
        "auto": lambda: layer(h_train).update,
        "router": lambda: L._choose_parents(h_train, P, TOP_K)[2],
        "expanded": lambda: expanded_memory(h_train, P, K, V, TOP_K, TEMPERATURE).update,
    }
    grad_update, grad_weights = torch.randn(tokens, args.hidden), torch.randn(tokens, TOP_K)
    if tokens * cells * args.hidden * 4 > MAX_EXPANDED_GRAD_BYTES:  # expanded's [N, E, C, H] gradient
        del train["expanded"]  # reported as not run

    def run(path: str, mode: str) -> None:
        if mode == "infer":
            with torch.inference_mode():
                infer[path]()
            return
        train[path]().backward(grad_weights if path == "router" else grad_update)
        for p in (P, K, V, h_train):
            p.grad = None

    return {
        (shape, cells, path, mode): (
            partial(run, path, mode),
            resident.get(path, base) if mode == "infer" else base,
        )
        for mode in modes
        for path in args.paths
        if path in (infer if mode == "infer" else train) and (shape != "serve" or path in SERVE_PATHS)
    }


def time_cases(cases: dict[Any, tuple[Callable[[], None], int]], rounds: int, sample_s: float) -> Any:
    """Per case, (ms per call, calls) of every round; the load average after each round."""
    loads: list[float] = []

    def sample(key: Any) -> tuple[float, int]:
        call, calls, start = cases[key][0], 0, time.perf_counter()
        while True:
            call()
            calls += 1
            if (elapsed := time.perf_counter() - start) >= sample_s or calls >= MAX_CALLS:
                return elapsed * 1000 / calls, calls

    def progress(number: int) -> None:
        loads.append(os.getloadavg()[0])
        print(f"round {number + 1}/{rounds}: load {loads[-1]:.2f}", flush=True)

    for call, _ in cases.values():
        call()  # warm-up: kernels, allocator, MemoryLayer's inference cache
    return harness.rotated_rounds(list(cases), rounds, sample, progress), loads


def memory_worker(job: dict[str, Any]) -> list[float | None]:
    """Peak working memory of each listed case, measured in this process (a fresh one)."""
    args, peaks = argparse.Namespace(**job["args"]), []
    for shape, cells, path, mode in job["cases"]:
        call = build_cases(cells, shape, args)[(shape, cells, path, mode)][0]
        call()  # warm-up: one-time allocations are not the call's working memory
        peaks.append(harness.peak_mib(call))
    return peaks


def measure_memory(keys: list[tuple[str, int, str, str]], args: Any) -> dict[tuple[str, int, str, str], Any]:
    """Peak MiB per case, from fresh subprocesses: one per M (one for everything in the smoke run)."""
    groups = [keys] if args.smoke else [[k for k in keys if k[1] == m] for m in sorted({k[1] for k in keys})]
    settings = {k: getattr(args, k) for k in ("children", "hidden", "paths", "seed", "smoke")}
    peaks = {}
    for group in groups:
        job = json.dumps({"cases": group, "args": settings})
        command = [sys.executable, __file__, "--threads", str(args.threads), "--memory-worker", job]
        found = harness.run_child(command, timeout_s=1800, env=harness.MMAP_ENV)
        peaks.update(zip(group, found, strict=True))
        print(f"memory: M = {sorted({k[1] for k in group})} done", flush=True)
    return peaks


def ratio(values: list[tuple[int, float]]) -> dict[str, Any]:
    """max / min over M of (M, value) pairs, where they were, and largest-M over smallest-M growth."""
    (lo_at, lo), (hi_at, hi) = min(values, key=lambda v: v[1]), max(values, key=lambda v: v[1])
    first, last = values[0][1], values[-1][1]
    return {
        "ratio": hi / lo if lo > 0 else None, "min": lo, "min_at": lo_at, "max": hi, "max_at": hi_at,
        "growth": last / first if first > 0 else None,
    }  # fmt: skip


def flat(data: dict[str, Any] | None) -> bool | None:
    return None if data is None else data["ratio"] is not None and data["ratio"] <= GOAL


def summarize(rows: list[dict[str, Any]], threshold: int) -> list[dict[str, Any]]:
    """Per series, and for `auto` above the threshold and sparse minus router: the ratios over M."""
    summary = []
    for shape, path, mode in dict.fromkeys(map(series, rows)):
        picked = [r for r in rows if series(r) == (shape, path, mode)]
        router = {r["cells"]: r for r in rows if series(r) == (shape, "router", mode)}
        subsets = {path: picked}
        if path == "auto":
            subsets["auto above threshold"] = [r for r in picked if r["cells"] > threshold]
        if path == "sparse" and router:
            subsets["sparse minus router"] = [
                {**r, "median_ms": r["median_ms"] - router[r["cells"]]["median_ms"],
                 "min_ms": r["min_ms"] - router[r["cells"]]["min_ms"], "peak_mib": None}
                for r in picked
            ]  # fmt: skip
        for name, subset in ((n, s) for n, s in subsets.items() if len(s) >= 2):
            mems = [(r["cells"], r["peak_mib"]) for r in subset if r["peak_mib"] is not None]
            # Other jobs' load only ever adds time: the per-size minima are a second, less disturbed view.
            times, minima = (ratio([(r["cells"], r[k]) for r in subset]) for k in ("median_ms", "min_ms"))
            memory = ratio(mems) if len(mems) >= 2 else None
            summary.append(
                {
                    "shape": shape,
                    "path": name,
                    "mode": mode,
                    "sizes": len(subset),
                    "goal_applies": name in FLAT,
                    "time": times,
                    "time_of_minima": minima,
                    "memory": memory,
                    "time_met": flat(times),
                    "memory_met": flat(memory),
                    "expectation": EXPECTATION[name],
                }
            )
    return summary


def verdict(entry: dict[str, Any], part: str) -> str:
    data = entry[part]
    if data is None or data["ratio"] is None:
        return "n/a"
    if entry["goal_applies"]:
        return "met" if flat(data) else "**NOT met**"
    return "flat" if flat(data) else "not flat (not expected)"


def x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def notes(report: dict[str, Any]) -> list[str]:
    """Reading the numbers: computed from the report, so they stay true for the run they describe."""
    ms = {(r["shape"], r["cells"], r["path"], r["mode"]): r["median_ms"] for r in report["rows"]}
    lo, hi, threshold = report["cells"][0], report["cells"][-1], report["dense_max_cells"]
    out = ["Reading the numbers:", ""]
    for mode in ("infer", "train"):
        found = [ms.get(("batch", m, p, mode)) for m in (lo, hi) for p in ("sparse", "router")]
        if None not in found:
            s0, r0, s1, r1 = found
            out.append(
                f"- sparse, {mode}: {s0:.1f} ms at M = {lo:,} -> {s1:.1f} ms at M = {hi:,}; of that the "
                f"router takes {r0:.1f} -> {r1:.1f} ms ({100 * r1 / s1:.0f}% at M = {hi:,}), the rest "
                f"(gather, child softmax, weighted sum) {s0 - r0:.1f} -> {s1 - r1:.1f} ms."
            )
    first = next((m for m in report["cells"] if m > threshold), None)  # the first size `auto` runs sparse
    for shape, mode in (("batch", "infer"), ("batch", "train"), ("serve", "infer")):
        dense, sparse = (ms.get((shape, first, p, mode)) for p in ("dense", "sparse"))
        if dense is not None and sparse is not None:
            out.append(
                f"- Threshold ({shape}, {mode}): at M = {first:,}, the first size `auto` runs sparse, "
                f"dense takes {dense:.1f} ms, sparse {sparse:.1f} ms "
                f"({'sparse' if sparse < dense else 'dense'} wins)."
            )
    out.append(
        f"- auto is dense up to M = {threshold:,}, far cheaper than any gather at small M: the flatness goal "
        "applies to its sparse region (`auto above threshold`) and to the sparse path."
    )
    return out


def render(report: dict[str, Any]) -> str:
    def mem(m: dict[str, Any] | None) -> str:
        return "n/a" if m is None else f"{x(m['ratio'])} ({m['min']:.0f} -> {m['max']:.0f} MiB)"

    def when(t: dict[str, Any]) -> str:
        return (
            f"{x(t['ratio'])} ({t['min']:.1f} ms at {t['min_at']:,} -> {t['max']:.1f} ms at {t['max_at']:,})"
        )

    head = ("shape", "path", "mode", "sizes", "time ratio (min at M -> max at M)", "time largest/smallest M",
            "ratio of minima", "time goal", "peak-memory ratio", "memory goal", "expectation")  # fmt: skip
    summary = [
        (e["shape"], e["path"], e["mode"], e["sizes"], when(e["time"]), x(e["time"]["growth"]),
         x(e["time_of_minima"]["ratio"]), verdict(e, "time"), mem(e["memory"]), verdict(e, "memory"),
         e["expectation"])
        for e in report["summary"]
    ]  # fmt: skip
    lines = [
        f"# Memory layer scaling: time and peak memory from M = {report['cells'][0]:,} to "
        f"{report['cells'][-1]:,} cells ({report['environment']['date']})",
        "",
        harness.header(report),
        "",
        f"k = {TOP_K}, C = {report['children']}, H = {report['hidden']}, T = {TEMPERATURE}, E = M / C; "
        f"shapes {'; '.join(report['shapes'].values())}; DENSE_MAX_CELLS = {report['dense_max_cells']:,}. "
        f"Median over {report['rounds']} rounds [min, max]; load average after each round "
        f"{', '.join(f'{a:.1f}' for a in report['load_per_round'])}. "
        "Method: docs/BENCHMARKS.md, section 4.",
        "",
        f"![time and peak memory vs M]({report['name']}.png)",
        "",
        '## Ratio max/min over M, against the goal "flat within 1.5x"',
        "",
        *harness.table(head, summary),
        "",
        *report["notes"],
    ]
    head = ("M", "E", "path", "mode", "median ms", "min", "max", "runs", "peak MiB", "resident MiB")
    for shape in report["shapes"]:
        rows = [
            (f"{r['cells']:,}", f"{r['parents']:,}", r["path"], r["mode"], f"{r['median_ms']:.2f}",
             f"{r['min_ms']:.2f}", f"{r['max_ms']:.2f}", r["runs"],
             "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}", f"{r['resident_mib']:.1f}")
            for r in report["rows"] if r["shape"] == shape
        ]  # fmt: skip
        lines += ["", f"## {shape}", "", *harness.table(head, rows)]
    if report["not_run"]:
        not_run = f"Not run (an [N, E, C, H] gradient over 4 GiB): expanded train at M = {report['not_run']}"
        lines += ["", not_run]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    rows = [r for r in report["rows"] if r["shape"] == "batch"]
    for _, name, mode in dict.fromkeys(map(series, rows)):
        picked = sorted((r for r in rows if series(r) == ("batch", name, mode)), key=itemgetter("cells"))
        xs, color = [r["cells"] for r in picked], f"C{PATHS.index(name)}"
        style = dict(color=color, linestyle="-" if mode == "infer" else "--", marker="o", markersize=3)
        axes[0].plot(xs, [r["median_ms"] for r in picked], label=f"{name} {mode}", **style)
        axes[0].fill_between(
            xs, [r["min_ms"] for r in picked], [r["max_ms"] for r in picked], color=color, alpha=0.12
        )
        mem = [(r["cells"], max(r["peak_mib"], 0.1)) for r in picked if r["peak_mib"] is not None]
        axes[1].plot([m for m, _ in mem], [v for _, v in mem], label=f"{name} {mode}", **style)
    titles = ("time per call, ms", "peak working memory per call, MiB (< 0.1 at 0.1)")
    for axis, title in zip(axes, titles, strict=True):
        axis.set(xscale="log", yscale="log", title=title, xlabel=f"M cells (E = M / {report['children']})")
        axis.axvline(report["dense_max_cells"], color="grey", linestyle=":", linewidth=1)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8, ncol=2)
    fig.suptitle(f"Memory layer scaling, k = {TOP_K}, H = {report['hidden']}; band = min..max over rounds")
    harness.save_figure(fig, path, dpi=110)


def main() -> None:
    cli = harness.parser(__doc__, name="bench_memory_scaling", rounds=7)
    cli.add_argument("--cells", type=int, nargs="+", help="M values (E = M // C parents, at least k)")
    cli.add_argument("--children", type=int, default=4, help="C, children per parent")
    cli.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS[:5]))
    cli.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    cli.add_argument("--hidden", type=int)
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = cli.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return
    args.hidden = args.hidden or (32 if args.smoke else 384)
    cells = sorted(args.cells or (SMOKE_CELLS if args.smoke else FULL_CELLS))
    if any(m // args.children < TOP_K for m in cells):
        cli.error(f"every M needs E = M // C >= k = {TOP_K}")
    rounds = 2 if args.smoke else args.rounds
    report: dict[str, Any] = {"command": harness.command_line("bench_memory_scaling.py")}
    report["environment"] = harness.environment(threads=args.threads)
    cases = {k: v for shape in args.shapes for m in cells for k, v in build_cases(m, shape, args).items()}
    print(f"{len(cases)} contenders, {rounds} rounds", flush=True)
    samples, loads = time_cases(cases, rounds, 0.002 if args.smoke else 0.05)
    peaks = measure_memory(list(cases), args)
    rows = [
        {"shape": k[0], "cells": k[1], "parents": k[1] // args.children, "path": k[2], "mode": k[3],
         **{f"{s}_ms": v for s, v in harness.spread([ms for ms, _ in samples[k]]).items() if s != "runs"},
         "runs": rounds, "calls_per_run": [min(c for _, c in samples[k]), max(c for _, c in samples[k])],
         "peak_mib": peaks[k], "resident_mib": cases[k][1] / 2**20}
        for k in sorted(cases, key=lambda k: (args.shapes.index(k[0]), PATHS.index(k[2]), k[3], k[1]))
    ]  # fmt: skip
    expanded_train = "expanded" in args.paths and "batch" in args.shapes
    sizes = {s: (SMOKE_SHAPES if args.smoke else SHAPES)[s] for s in args.shapes}
    report["shapes"] = {
        s: f"{s} = {b} x {n} = {b * n:,} tokens ({', '.join(m)})" for s, (b, n, m) in sizes.items()
    }
    report.update(
        cells=cells, children=args.children, hidden=args.hidden, top_k=TOP_K, goal_ratio=GOAL, rounds=rounds,
        dense_max_cells=L.DENSE_MAX_CELLS, load_per_round=loads, rows=rows,
        summary=summarize(rows, L.DENSE_MAX_CELLS),
        not_run=[m for m in cells if expanded_train and ("batch", m, "expanded", "train") not in cases],
    )  # fmt: skip
    report["notes"] = notes(report)
    harness.finish(args.out, args.name, report, render, plot, smoke=args.smoke)


if __name__ == "__main__":
    main()
