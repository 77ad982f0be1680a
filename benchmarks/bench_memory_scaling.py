"""Memory scaling: memory-layer time and peak memory from M = 48 to 16,384 cells at fixed k and C.

The claim under test (issue "The paper's claims, measured"): at fixed k = 8 and C = 4 children per parent,
the memory layer's cost should stay flat (within 1.5x) as the memory grows from M = 48 to 16,384 cells
(E = M / C = 12 ... 4,096 parents), because each token touches only its k chosen parents' children.

Contenders, each at every M, all on the parameters of a real MemoryLayer (app/spartan/memory.py):
  sparse  app.spartan.layer.sparse_memory: gathers only the k chosen parents' rows; the path whose cost
          should not depend on M (apart from the router below, which it contains);
  dense   all M cells as two GEMMs: dense_memory in training; in inference the cached child-major layout,
          as MemoryLayer serves its dense sizes. Cost O(M): it is not expected to be flat;
  auto    what the product runs: MemoryLayer.forward (dense up to DENSE_MAX_CELLS cells, with the cached
          layout in inference; sparse above);
  router  the part every path pays that is O(E) by the method's definition: parent logits a = P h over all
          E parents, one topk, softmax over the k (app.spartan.layer._choose_parents);
  topk    the topk over E alone, on precomputed logits (inference only).
Modes: infer = forward under torch.inference_mode; train = forward, then backward of a fixed random upstream
gradient w.r.t. the memory parameters P, K, V *and* the input states h (in training, every layer's input
gradient flows on to the earlier layers' memories), then the gradients are set to None.
Shapes: "batch" = batch 16 x length 128 = 2,048 tokens, H = 384 (MiniLM), both modes (as
bench_memory_layer.py); "serve" = batch 8 x length 64 = 512 tokens, about what the service's batcher forms
for MiniLM (docs/SERVICE_BENCHMARKS.md: ~9.6 rows per pass), inference only.

Time: every contender lives in one process (torch threads: --threads, default 2). After one warm-up call
each, they run in rounds, in a fresh random order every round, so load from other jobs on the machine falls
on all of them alike. One sample = the mean of back-to-back calls repeated until they have lasted 50 ms
(at most 50 calls; one call for anything slower). Reported: the median over the rounds, its min and max,
and the number of rounds; also the load average after every round. OpenMP threads wait passively
(OMP_WAIT_POLICY=PASSIVE unless the environment sets it): this torch build's default spins, and with other
jobs on the 2 CPUs a 3 ms call then took ~48 ms, which measures the scheduler rather than the layer.

Peak memory: a fresh subprocess per M, with glibc's mmap threshold pinned at 64 KiB (MALLOC_MMAP_THRESHOLD_)
so that every tensor buffer is its own mapping and goes back to the OS when freed. Per contender: one
warm-up call; then reset the process's RSS high-water mark (write 5 to /proc/self/clear_refs), read VmRSS,
make one call, read VmHWM. Peak = VmHWM - VmRSS, the working memory the call touches on top of what is
already resident (parameters, states, inference cache: reported apart as "resident", from the tensors'
sizes). Repeated calls agreed to 0.1 MiB when tried, so one is measured. Where the high-water mark cannot
be reset, every contender gets its own process and the peak is the growth of ru_maxrss over its first
calls, a lower bound (the report records which method ran). torch.profiler's memory events were tried and
rejected: on CPU its timeline missed the allocations made inside ops.

    python benchmarks/bench_memory_scaling.py          # full run: docs/bench_memory_scaling.{json,md,png}
    python benchmarks/bench_memory_scaling.py --smoke  # tiny sizes, seconds (run by the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

# Before torch starts OpenMP. With spinning (ACTIVE, what this torch build does by default) 2 threads on a
# machine whose CPUs other jobs keep busy wait out the scheduler at every barrier: a 3 ms dense call took
# ~48 ms here. PASSIVE threads sleep instead. Set OMP_WAIT_POLICY yourself to measure otherwise.
os.environ["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.spartan.layer import (
    DENSE_MAX_CELLS,
    _choose_parents,
    child_major,
    dense_memory,
    dense_memory_child_major,
    sparse_memory,
    uses_dense,
)
from app.spartan.memory import MemoryLayer
from benchmarks import harness
from benchmarks.procmem import reset_peak, status_mib

CHILDREN = 4  # C: M = 48 ... 16,384 are both exact (E = 12 ... 4,096)
TOP_K = 8
TEMPERATURE = 1.6
GOAL = 1.5  # "flat within 1.5x"
FULL_CELLS = [48, 96, 192, 384, 768, 1536, 3072, 6144, 12288, 16384]
SMOKE_CELLS = [48, 768, 3072, 6144]  # crosses DENSE_MAX_CELLS: `auto` runs both paths, two sizes above
PATHS = ("sparse", "dense", "auto", "router", "topk")
SAMPLE_S = 0.05  # one timing sample lasts at least this long (back-to-back calls, averaged)
SMOKE_SAMPLE_S = 0.002
MAX_CALLS = 50
MMAP_THRESHOLD = 64 * 1024


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    length: int
    modes: tuple[str, ...]

    @property
    def tokens(self) -> int:
        return self.batch * self.length


def shapes(smoke: bool) -> list[Shape]:
    if smoke:
        return [Shape("batch", 4, 16, ("infer", "train")), Shape("serve", 2, 8, ("infer",))]
    return [Shape("batch", 16, 128, ("infer", "train")), Shape("serve", 8, 64, ("infer",))]


def contenders(shape: Shape) -> list[tuple[str, str]]:
    """(path, mode) pairs measured at one shape: everything on the batch shape, the three paths on serve."""
    pairs = []
    for mode in shape.modes:
        for path in PATHS:
            if path == "topk" and mode == "train":
                continue
            if shape.name == "serve" and path in ("router", "topk"):
                continue
            pairs.append((path, mode))
    return pairs


@dataclass
class Case:
    shape: str
    cells: int
    path: str
    mode: str
    call: Callable[[], None]
    resident_bytes: int
    samples: list[float] = field(default_factory=list)  # ms per call, one per round
    calls: list[int] = field(default_factory=list)  # calls averaged into each sample

    @property
    def key(self) -> tuple[str, int, str, str]:
        return (self.shape, self.cells, self.path, self.mode)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build_cases(cells: int, shape: Shape, hidden: int, seed: int) -> list[Case]:
    """The contenders at one M and shape, sharing one MemoryLayer and one batch of token states."""
    torch.manual_seed(seed)
    layer = MemoryLayer(hidden, cells // CHILDREN, CHILDREN, TOP_K, TEMPERATURE)
    P, K, V = layer.parent_keys, layer.child_keys, layer.child_values
    h = torch.randn(shape.tokens, hidden)
    h_train = h.clone().requires_grad_()
    params = [P, K, V, h_train]
    base = nbytes(P, K, V, h)
    keys_t, values = (t.contiguous() for t in child_major(K.detach(), V.detach(), TEMPERATURE))
    cache = nbytes(keys_t, values)
    logits = (h @ P.detach().t()).contiguous()
    grad_update = torch.randn(shape.tokens, hidden)
    grad_weights = torch.randn(shape.tokens, TOP_K)

    infer: dict[str, Callable[[], Any]] = {
        "sparse": lambda: sparse_memory(h, P, K, V, TOP_K, TEMPERATURE),
        "dense": lambda: dense_memory_child_major(h, P, keys_t, values, CHILDREN, TOP_K),
        "auto": lambda: layer(h),
        "router": lambda: _choose_parents(h, P, TOP_K),
        "topk": lambda: logits.topk(TOP_K, dim=-1),
    }
    # Forward functions for training, each with the upstream gradient of what it returns.
    train: dict[str, tuple[Callable[[], torch.Tensor], torch.Tensor]] = {
        "sparse": (lambda: sparse_memory(h_train, P, K, V, TOP_K, TEMPERATURE).update, grad_update),
        "dense": (lambda: dense_memory(h_train, P, K, V, TOP_K, TEMPERATURE).update, grad_update),
        "auto": (lambda: layer(h_train).update, grad_update),
        "router": (lambda: _choose_parents(h_train, P, TOP_K)[2], grad_weights),
    }
    # What stays resident while each contender runs: dense inference keeps the child-major cache, as
    # MemoryLayer does for the sizes it serves densely.
    auto_cache = cache if uses_dense(cells // CHILDREN, CHILDREN) else 0
    resident = {"dense": base + cache, "auto": base + auto_cache, "topk": base + nbytes(logits)}

    def infer_call(fn: Callable[[], Any]) -> Callable[[], None]:
        def call() -> None:
            with torch.inference_mode():
                fn()

        return call

    def train_call(fn: Callable[[], torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
        def call() -> None:
            fn().backward(grad)
            for p in params:
                p.grad = None

        return call

    cases = []
    for path, mode in contenders(shape):
        if mode == "infer":
            call = infer_call(infer[path])
            res = resident.get(path, base)
        else:
            call = train_call(*train[path])
            res = base
        cases.append(Case(shape.name, cells, path, mode, call, res))
    return cases


def time_cases(cases: list[Case], rounds: int, seed: int, sample_s: float) -> list[float]:
    """Warm up every contender, then time them in rounds, in a fresh random order each round.

    A sample repeats the call until sample_s has passed (at most MAX_CALLS calls) and keeps the mean: the
    count adapts to the moment, so a loaded machine cannot turn a fixed count of tiny calls into seconds.
    Returns the 1-minute load average after each round.
    """
    for case in cases:
        case.call()  # warm-up: kernels, allocator, MemoryLayer's inference cache
    order = list(cases)
    rng = random.Random(seed)
    loads = []
    for number in range(rounds):
        rng.shuffle(order)
        round_start = time.perf_counter()
        for case in order:
            calls, start = 0, time.perf_counter()
            while True:
                case.call()
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= sample_s or calls >= MAX_CALLS:
                    break
            case.samples.append(elapsed * 1000 / calls)
            case.calls.append(calls)
        loads.append(os.getloadavg()[0])
        took = time.perf_counter() - round_start
        print(f"round {number + 1}/{rounds}: {took:.1f} s, load {loads[-1]:.2f}", flush=True)
    return loads


# --- peak memory ------------------------------------------------------------------------------------


def peak_growth_mib(call: Callable[[], None], resettable: bool) -> float:
    if resettable:
        reset_peak()
        before = status_mib("VmRSS")
        call()
        return max(0.0, status_mib("VmHWM") - before)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call()
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def memory_worker(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Measure peak working memory of the given (shape, M, path, mode) cases, in this process."""
    resettable = reset_peak()
    results = []
    for shape_name, cells, path, mode in job["cases"]:
        shape = next(s for s in shapes(job["smoke"]) if s.name == shape_name)
        case = next(
            c
            for c in build_cases(cells, shape, job["hidden"], job["seed"])
            if (c.path, c.mode) == (path, mode)
        )
        if resettable:
            case.call()  # warm-up: one-time allocations are not the call's working memory
            peak = peak_growth_mib(case.call, True)
        else:  # ru_maxrss only grows: measure the first calls (this process runs this one case)
            peak = max(peak_growth_mib(case.call, False) for _ in range(3))
        results.append({"key": [shape_name, cells, path, mode], "peak_mib": peak})
        del case
    return results


def measure_memory(keys: list[tuple[str, int, str, str]], args: argparse.Namespace) -> tuple[dict, str]:  # type: ignore[type-arg]
    """Peak MiB per case key, from fresh subprocesses (one per M, or one per case without HWM reset)."""
    resettable = reset_peak()
    method = (
        "VmHWM - VmRSS around one warm call (HWM reset via /proc/self/clear_refs); "
        f"fresh process per M, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"
        if resettable
        else "ru_maxrss growth over the first 3 calls, fresh process per case (a lower bound), "
        f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"
    )
    if resettable:
        groups = [[k for k in keys if k[1] == cells] for cells in sorted({k[1] for k in keys})]
        if args.smoke:
            groups = [list(keys)]  # process start-up would dominate; the smoke run only checks the path
    else:
        groups = [[k] for k in keys]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    peaks: dict[tuple[str, int, str, str], float] = {}
    for group in groups:
        job = {"cases": group, "hidden": args.hidden, "seed": args.seed, "smoke": args.smoke}
        cmd = [sys.executable, __file__, "--threads", str(args.threads), "--memory-worker", json.dumps(job)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"memory worker failed for {group[0]}: {done.stderr[-2000:]}")
        for item in json.loads(done.stdout.strip().splitlines()[-1]):
            shape_name, cells, path, mode = item["key"]
            peaks[(shape_name, cells, path, mode)] = item["peak_mib"]
        print(f"memory: M = {sorted({k[1] for k in group})} done", flush=True)
    return peaks, method


# --- report -----------------------------------------------------------------------------------------


def ratio(values: list[tuple[int, float]]) -> dict[str, Any]:
    """max/min over M of (M, value) pairs, with where they were, and the largest-M over smallest-M growth."""
    lo = min(values, key=lambda v: v[1])
    hi = max(values, key=lambda v: v[1])
    first, last = values[0], values[-1]
    return {
        "ratio": hi[1] / lo[1] if lo[1] > 0 else None,
        "min": lo[1],
        "min_at": lo[0],
        "max": hi[1],
        "max_at": hi[0],
        "growth": last[1] / first[1] if first[1] > 0 else None,
    }


EXPECTATION = {
    "sparse": "should be flat",
    "auto": "not expected: dense below the threshold is cheaper by design",
    "auto above threshold": "should be flat (what the product runs on large memories)",
    "dense": "not expected: O(M) by construction",
    "router": "not expected: O(E) by the method's definition (P h over all parents)",
    "topk": "not expected: O(E)",
    "sparse minus router": "should be flat (derived: sparse median - router median)",
}


def summarize(rows: list[dict[str, Any]], threshold: int) -> list[dict[str, Any]]:
    summary = []
    keys = []
    for row in rows:
        key = (row["shape"], row["path"], row["mode"])
        if key not in keys:
            keys.append(key)
    for shape_name, path, mode in keys:
        picked = [r for r in rows if (r["shape"], r["path"], r["mode"]) == (shape_name, path, mode)]
        subsets = [(path, picked)]
        if path == "auto":
            subsets.append(("auto above threshold", [r for r in picked if r["cells"] > threshold]))
        if path == "sparse" and shape_name == "batch":
            router = {
                r["cells"]: r
                for r in rows
                if (r["shape"], r["path"], r["mode"]) == (shape_name, "router", mode)
            }
            derived = [
                {
                    **r,
                    "median_ms": r["median_ms"] - router[r["cells"]]["median_ms"],
                    "min_ms": r["min_ms"] - router[r["cells"]]["min_ms"],
                    "peak_mib": None,
                }
                for r in picked
            ]
            subsets.append(("sparse minus router", derived))
        for name, subset in subsets:
            if len(subset) < 2:
                continue
            entry: dict[str, Any] = {"shape": shape_name, "path": name, "mode": mode, "sizes": len(subset)}
            entry["time"] = ratio([(r["cells"], r["median_ms"]) for r in subset])
            # Noise from other jobs only adds time: the per-size minima are a second, less disturbed view.
            entry["time_of_minima"] = ratio([(r["cells"], r["min_ms"]) for r in subset])
            mems = [(r["cells"], r["peak_mib"]) for r in subset if r.get("peak_mib") is not None]
            entry["memory"] = ratio(mems) if len(mems) >= 2 else None
            flat_expected = name in ("sparse", "auto above threshold", "sparse minus router")
            met_time = entry["time"]["ratio"] is not None and entry["time"]["ratio"] <= GOAL
            mem = entry["memory"]
            met_mem = mem is not None and mem["ratio"] is not None and mem["ratio"] <= GOAL
            entry["goal_applies"] = flat_expected
            entry["time_met"] = met_time
            entry["memory_met"] = met_mem if mem is not None else None
            entry["expectation"] = EXPECTATION[name]
            summary.append(entry)
    return summary


def machine_info(threads: int) -> dict[str, Any]:
    cpu = ""
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = match.group(1).strip() if match else ""
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu or platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
    }


def load_warning(report: dict[str, Any]) -> str:
    cpus = report["machine"]["cpu_count"] or 1
    if statistics.median(report["load_per_round"]) <= cpus:
        return "."
    return (
        f": **other jobs oversubscribed the {cpus} CPUs for most of the run**, so every time here is "
        "inflated and noisy; treat ratios near the goal as inconclusive. Peak memory does not depend on "
        "load."
    )


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def verdict(entry: dict[str, Any], part: str) -> str:
    data = entry[part]
    if data is None or data["ratio"] is None:
        return "n/a"
    met = data["ratio"] <= GOAL
    if entry["goal_applies"]:
        return "met" if met else "**NOT met**"
    return "flat" if met else "not flat (not expected)"


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    load_median, load_max = statistics.median(report["load_per_round"]), max(report["load_per_round"])
    shape_text = "; ".join(
        f"{s['name']}: batch {s['batch']} x length {s['length']} = {s['tokens']} tokens "
        f"({', '.join(s['modes'])})"
        for s in report["shapes"]
    )
    lines = [
        f"# Memory layer scaling: time and peak memory from M = {report['cells'][0]:,} "
        f"to {report['cells'][-1]:,} cells ({report['date'][:10]})",
        "",
        f"Command: `{report['command']}`. Started {report['date']}, took {report['wall_s']:.0f} s.",
        f"Machine: {m['platform']}, {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']}, "
        f"{m['torch_threads']} torch threads, OMP_WAIT_POLICY={m['omp_wait_policy']}. "
        f"1-minute load average: {report['load_before']:.1f} before, "
        f"median {load_median:.1f} and max {load_max:.1f} over the rounds, "
        f"{report['load_after']:.1f} after{load_warning(report)}",
        "",
        f"Fixed k = {report['top_k']}, C = {report['children']}, H = {report['hidden']}, T = "
        f"{report['temperature']}; E = M / C. Shapes: {shape_text}. DENSE_MAX_CELLS = "
        f"{report['dense_max_cells']:,} (`auto` is dense up to it, sparse above).",
        "",
        f"Time: median over {report['rounds']} rounds, [min, max]; contenders interleaved in a fresh random "
        "order every round; one sample = the mean of back-to-back calls repeated until they last "
        f">= {report['sample_ms']:g} ms (at most {MAX_CALLS}; 1 call when slower). "
        "train = forward + backward w.r.t. P, K, V and the input states. "
        "OpenMP threads wait passively unless OMP_WAIT_POLICY says otherwise (spinning threads on a busy "
        "machine turned a 3 ms call into ~48 ms). "
        f"Peak = working memory of one call: {report['memory_method']}. "
        "Resident = parameters + token states (+ the dense inference cache, + logits for `topk`), "
        "not in peak.",
        "",
        "![time and peak memory vs M](" + report["plot"] + ")" if report.get("plot") else "",
        "",
        '## Ratio max/min over M, against the goal "flat within 1.5x"',
        "",
        "Time ratio = max/min over M of the per-size medians (the goal is judged on it); the ratio of the "
        "per-size minima is shown too, since other jobs' load only ever adds time.",
        "",
        "| shape | path | mode | sizes | time ratio (min at M -> max at M) | time largest/smallest M | "
        "ratio of minima | time goal | peak-memory ratio | memory goal | expectation |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in report["summary"]:
        t, mem = e["time"], e["memory"]
        mem_text = (
            "n/a" if mem is None else f"{fmt_ratio(mem['ratio'])} ({mem['min']:.0f} -> {mem['max']:.0f} MiB)"
        )
        lines.append(
            f"| {e['shape']} | {e['path']} | {e['mode']} | {e['sizes']} | {fmt_ratio(t['ratio'])} "
            f"({t['min']:.1f} ms at {t['min_at']:,} -> {t['max']:.1f} ms at {t['max_at']:,}) | "
            f"{fmt_ratio(t['growth'])} | {fmt_ratio(e['time_of_minima']['ratio'])} | "
            f"{verdict(e, 'time')} | {mem_text} | {verdict(e, 'memory')} | "
            f"{e['expectation']} |"
        )
    lines += ["", *report["notes"], ""]
    for shape in report["shapes"]:
        lines += [
            f"## {shape['name']}: {shape['tokens']} tokens",
            "",
            "| M | E | path | mode | median ms | min | max | runs | peak MiB | resident MiB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in report["rows"]:
            if r["shape"] != shape["name"]:
                continue
            peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
            lines.append(
                f"| {r['cells']:,} | {r['parents']:,} | {r['path']} | {r['mode']} | {r['median_ms']:.2f} | "
                f"{r['min_ms']:.2f} | {r['max_ms']:.2f} | {r['runs']} | {peak} | {r['resident_mib']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def notes(report: dict[str, Any]) -> list[str]:
    """Reading the numbers: computed from the report, so they stay true for the run they describe."""
    rows = {(r["shape"], r["cells"], r["path"], r["mode"]): r for r in report["rows"]}
    lo, hi = report["cells"][0], report["cells"][-1]
    out = ["Reading the numbers:", ""]
    for mode in ("infer", "train"):
        found = [rows.get(("batch", m, p, mode)) for m in (lo, hi) for p in ("sparse", "router")]
        if not all(found):
            continue
        s0, r0, s1, r1 = (row["median_ms"] for row in found if row)
        out.append(
            f"- sparse, {mode}: {s0:.1f} ms at M = {lo:,} -> {s1:.1f} ms at M = {hi:,}. Of that, the "
            f"router (P h over all E parents, topk, softmax) takes {r0:.1f} -> {r1:.1f} ms "
            f"({100 * r1 / s1:.0f}% at M = {hi:,}); the rest (gather, child softmax, weighted sum"
            f"{', and their backward' if mode == 'train' else ''}) goes {s0 - r0:.1f} -> {s1 - r1:.1f} ms."
        )
    topk, router = rows.get(("batch", hi, "topk", "infer")), rows.get(("batch", hi, "router", "infer"))
    if topk and router:
        out.append(
            f"- The topk alone over E = {hi // report['children']:,} parents takes "
            f"{topk['median_ms']:.1f} ms of the router's {router['median_ms']:.1f} ms (inference); "
            "the rest is the [tokens, H] x [H, E] GEMM that scores every parent."
        )
    above = [m for m in report["cells"] if m > report["dense_max_cells"]]
    for shape, mode in (("batch", "infer"), ("batch", "train"), ("serve", "infer")):
        pair = [rows.get((shape, above[0], p, mode)) for p in ("dense", "sparse")] if above else []
        if len(pair) == 2 and pair[0] and pair[1]:
            dense, sparse = pair[0]["median_ms"], pair[1]["median_ms"]
            out.append(
                f"- Threshold check ({shape}, {mode}): at M = {above[0]:,}, the first size `auto` runs "
                f"sparse, dense takes {dense:.1f} ms and sparse {sparse:.1f} ms "
                f"({'sparse' if sparse < dense else 'dense'} is faster). DENSE_MAX_CELLS was measured "
                "with C = 3; with C = 4 each token gathers a third more rows."
            )
    out.append(
        f"- auto: up to M = {report['dense_max_cells']:,} the product runs the dense path, which at small M "
        "is far cheaper than any gather, so auto's max/min over all M is large by design; the flatness "
        "goal applies to its sparse region (`auto above threshold`) and to the sparse path."
    )
    out.append("- dense: two GEMMs over all M cells: O(M) time and [tokens, M] working memory, not flat.")
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()

    colors = {
        "sparse": "#1f77b4",
        "dense": "#d62728",
        "auto": "#2ca02c",
        "router": "#9467bd",
        "topk": "#8c564b",
    }
    styles = {"infer": "-", "train": "--"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    rows = [r for r in report["rows"] if r["shape"] == "batch"]
    series = []
    for r in rows:
        if (r["path"], r["mode"]) not in series:
            series.append((r["path"], r["mode"]))
    for path_name, mode in series:
        picked = sorted(
            (r for r in rows if (r["path"], r["mode"]) == (path_name, mode)), key=lambda r: r["cells"]
        )
        xs = [r["cells"] for r in picked]
        style = {"color": colors[path_name], "linestyle": styles[mode], "marker": "o", "markersize": 3}
        label = f"{path_name} {mode}"
        left.plot(xs, [r["median_ms"] for r in picked], label=label, **style)
        left.fill_between(
            xs,
            [r["min_ms"] for r in picked],
            [r["max_ms"] for r in picked],
            color=colors[path_name],
            alpha=0.12,
        )
        mem = [(r["cells"], r["peak_mib"]) for r in picked if r["peak_mib"] is not None]
        if mem:
            right.plot([x for x, _ in mem], [max(y, 0.1) for _, y in mem], label=label, **style)
    tokens = next(s["tokens"] for s in report["shapes"] if s["name"] == "batch")
    for axis, title, unit in ((left, "time per call", "ms"), (right, "peak working memory per call", "MiB")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.axvline(report["dense_max_cells"], color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel(f"M cells (E = M / {report['children']}); dotted: DENSE_MAX_CELLS")
        axis.set_ylabel(unit if unit == "ms" else f"{unit} (below 0.1 drawn at 0.1)")
        axis.set_title(f"{title}, {tokens} tokens, k = {report['top_k']}, H = {report['hidden']}")
        axis.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8, ncol=2)
    fig.suptitle(
        f"Memory layer scaling ({report['date'][:10]}, {report['machine']['torch_threads']} threads; "
        f"band = min..max over {report['rounds']} rounds)"
    )
    harness.save_figure(fig, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 rounds: seconds")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cells", type=int, nargs="+", help=f"M values (multiples of C = {CHILDREN})")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return
    started, wall_start = datetime.now().astimezone(), time.perf_counter()
    load_before = os.getloadavg()[0]
    args.hidden = args.hidden or (32 if args.smoke else 384)
    cells = sorted(args.cells or (SMOKE_CELLS if args.smoke else FULL_CELLS))
    if any(m % CHILDREN or m // CHILDREN < TOP_K for m in cells):
        parser.error(f"every M must be a multiple of C = {CHILDREN} with E = M / C >= k = {TOP_K}")
    rounds = 2 if args.smoke else args.rounds
    all_shapes = shapes(args.smoke)

    cases = [c for shape in all_shapes for m in cells for c in build_cases(m, shape, args.hidden, args.seed)]
    print(f"{len(cases)} contenders, {rounds} rounds", flush=True)
    loads = time_cases(cases, rounds, args.seed, SMOKE_SAMPLE_S if args.smoke else SAMPLE_S)
    peaks, method = measure_memory([c.key for c in cases], args)

    rows = [
        {
            "shape": c.shape,
            "cells": c.cells,
            "parents": c.cells // CHILDREN,
            "path": c.path,
            "mode": c.mode,
            "median_ms": statistics.median(c.samples),
            "min_ms": min(c.samples),
            "max_ms": max(c.samples),
            "runs": len(c.samples),
            "calls_per_run": [min(c.calls), max(c.calls)],
            "peak_mib": peaks.get(c.key),
            "resident_mib": c.resident_bytes / 2**20,
        }
        for c in sorted(cases, key=lambda c: (c.shape != "batch", PATHS.index(c.path), c.mode, c.cells))
    ]
    name = "bench_memory_scaling_smoke" if args.smoke else "bench_memory_scaling"
    command = " ".join(["python", "benchmarks/bench_memory_scaling.py", *sys.argv[1:]])
    report: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "command": command,
        "machine": machine_info(args.threads),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "load_per_round": loads,
        "wall_s": time.perf_counter() - wall_start,
        "cells": cells,
        "children": CHILDREN,
        "top_k": TOP_K,
        "temperature": TEMPERATURE,
        "hidden": args.hidden,
        "dense_max_cells": DENSE_MAX_CELLS,
        "goal_ratio": GOAL,
        "rounds": rounds,
        "sample_ms": 1000 * (SMOKE_SAMPLE_S if args.smoke else SAMPLE_S),
        "memory_method": method,
        "shapes": [
            {"name": s.name, "batch": s.batch, "length": s.length, "tokens": s.tokens, "modes": s.modes}
            for s in all_shapes
        ],
        "plot": f"{name}.png",
        "rows": rows,
        "summary": summarize(rows, DENSE_MAX_CELLS),
    }
    report["notes"] = notes(report)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(report, args.out / f"{name}.png")
    report["wall_s"] = time.perf_counter() - wall_start
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(render(report))
    for entry in report["summary"]:
        print(
            f"{entry['shape']:5} {entry['path']:22} {entry['mode']:5} "
            f"time {fmt_ratio(entry['time']['ratio'])} "
            f"memory {fmt_ratio(entry['memory']['ratio'] if entry['memory'] else None)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
