"""Soak: 8 clients of mixed traffic (80% predictions, 10% uploads, 10% deletes of uploaded tasks) for a
long time, the server's RSS, open file descriptors and threads sampled from /proc; then every uploaded
task is deleted and its memory must leave the process. Goals and results: docs/RELIABILITY.md.

    python benchmarks/bench_soak.py --minutes 30          # the real soak; docs/results/soak.*
    python benchmarks/bench_soak.py --smoke --out /tmp/s  # ~25 s, run by the tests
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness

SHIPPED = ("sentiment", "banking77", "bbc-news")
CLIENTS = 8
VARIANTS = 12  # distinct memory files the uploads cycle through
UPLOAD_NAMES = [f"soak-{i:02d}" for i in range(24)]  # uploaded task names in play: created, replaced, deleted
# (name, unit suffix, table row) of the /proc figures; a sample holds each as name + suffix
FIGURES = (("rss", "_mib", "RSS (MiB)"), ("fds", "", "open file descriptors"), ("threads", "", "threads"))


def memory_variants(count: int) -> list[bytes]:
    """`count` valid memory files: the shipped sentiment memory with its tensors perturbed."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load, save

    path = harness.MEMORIES / "sentiment.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors, generator = load(path.read_bytes()), torch.Generator().manual_seed(0)

    def noisy(t: torch.Tensor) -> torch.Tensor:
        return t + 0.01 * torch.randn(t.shape, generator=generator)

    return [save({n: noisy(t) for n, t in tensors.items()}, metadata=metadata) for _ in range(count)]


def proc_sample(pid: int, start: float) -> dict[str, float]:
    threads, fds = int(harness.proc_status(pid)["Threads"]), len(os.listdir(f"/proc/{pid}/fd"))
    rss = harness.status_mib("VmRSS", pid)
    return {"t": time.monotonic() - start, "rss_mib": rss, "threads": threads, "fds": fds}


def memory_bytes(url: str) -> float:
    return harness.metric_values(url, ["spartan_memory_bytes"])["spartan_memory_bytes"]


async def soak(
    server: harness.ServeProcess, seconds: float, every_s: float, files: list[bytes]
) -> dict[str, Any]:
    rngs, start, samples = [random.Random(100 + k) for k in range(CLIENTS)], time.monotonic(), []

    async def send(client: httpx.AsyncClient, k: int, _n: int) -> str:
        rng, roll = rngs[k], rngs[k].random()
        if roll < 0.8:  # half on the shipped tasks, half on uploaded names (some deleted meanwhile: 404)
            task = rng.choice(SHIPPED) if rng.random() < 0.5 else rng.choice(UPLOAD_NAMES)
            body = {"inputs": rng.sample(harness.SENTENCES, 8)}
            return f"predict {(await client.post(f'/v1/tasks/{task}/predict', json=body)).status_code}"
        if roll < 0.9:
            url = f"/v1/tasks/{rng.choice(UPLOAD_NAMES)}/memory?replace=true"
            return f"upload {(await client.put(url, content=rng.choice(files))).status_code}"
        return f"delete {(await client.delete(f'/v1/tasks/{rng.choice(UPLOAD_NAMES)}')).status_code}"

    load = asyncio.create_task(harness.closed_loop(server.url, CLIENTS, seconds, send))
    while not load.done():
        samples.append(proc_sample(server.pid, start))
        await asyncio.sleep(every_s)
    outcomes = Counter(outcome for _, _, outcome in load.result())
    # Every uploaded task goes; what stays resident must be the shipped tasks only.
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        for task in (await client.get("/v1/tasks")).json()["tasks"]:
            if task["name"] not in SHIPPED:
                await client.delete(f"/v1/tasks/{task['name']}")
    await asyncio.sleep(2)
    return {"samples": samples, "after_deletes": proc_sample(server.pid, start), "outcomes": dict(outcomes)}


def analyse(result: dict[str, Any], warmup_s: float, shipped: float, end: float) -> dict[str, Any]:
    """Medians over a window right after the warm-up and over the last window of the run, each a
    tenth of the run (at least 3 samples): single samples catch a load or an upload in progress."""
    samples = [s for s in result["samples"] if s["t"] >= warmup_s] or result["samples"][-3:]
    width = max(3, len(samples) // 10)
    analysis: dict[str, Any] = {"window_samples": width}
    for name, suffix, _ in FIGURES:
        values = [s[name + suffix] for s in samples]
        analysis[f"{name}_after_warmup{suffix}"] = statistics.median_high(values[:width])
        analysis[f"{name}_end{suffix}"] = statistics.median_high(values[-width:])
        analysis[f"{name}_max{suffix}"] = max(values)
    analysis["rss_growth"] = analysis["rss_end_mib"] / analysis["rss_after_warmup_mib"] - 1
    analysis["rss_after_deletes_mib"] = result["after_deletes"]["rss_mib"]
    return {**analysis, "memory_bytes_shipped": shipped, "memory_bytes_after_deletes": end}


def verdicts(a: dict[str, Any], outcomes: dict[str, int]) -> list[tuple[str, bool]]:
    bad = {k: v for k, v in outcomes.items() if not k.endswith((" 200", " 201", " 204", " 404"))}
    freed = "deleted tasks free their memory (resident bytes back to the shipped tasks')"
    return [
        ("RSS growth after warm-up <= 5%", a["rss_growth"] <= 0.05),
        ("no file descriptor growth", a["fds_end"] <= a["fds_after_warmup"]),
        ("no thread growth", a["threads_end"] <= a["threads_after_warmup"]),
        (freed, a["memory_bytes_after_deletes"] <= a["memory_bytes_shipped"]),
        ("every request got a promised answer (200, 201, 204, or 404 for a deleted task)", not bad),
    ]


def plot(result: dict[str, Any], path: Path) -> None:
    samples = result["samples"]
    minutes = [s["t"] / 60 for s in samples]
    fig, (rss, counts) = harness.pyplot().subplots(2, 1, figsize=(8, 5), sharex=True)
    rss.plot(minutes, [s["rss_mib"] for s in samples], label="RSS")
    rss.axvline(result["settings"]["warmup_minutes"], color="grey", linestyle=":", label="end of warm-up")
    rss.set(ylabel="MiB", title="server under mixed predict / upload / delete traffic")
    counts.plot(minutes, [s["fds"] for s in samples], label="open file descriptors")
    counts.plot(minutes, [s["threads"] for s in samples], label="threads")
    counts.set_xlabel("minutes")
    for axis in (rss, counts):
        axis.legend(fontsize=8)
    harness.save_figure(fig, path, dpi=110)


def markdown(result: dict[str, Any]) -> str:
    a, settings, width = result["analysis"], result["settings"], result["analysis"]["window_samples"]
    outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(result["outcomes"].items()))
    rows = [
        [title, *(f"{a[f'{name}_{at}{suffix}']:.0f}" for at in ("after_warmup", "end", "max"))]
        for name, suffix, title in FIGURES
    ]
    rows[0][2] += f" ({a['rss_growth']:+.1%})"
    setup = (
        f"One server process (1 torch thread, pinned shipped tasks), {CLIENTS} clients back to back: 80% "
        f"predictions (8 texts), 10% uploads ({len(UPLOAD_NAMES)} task names, {VARIANTS} distinct files), "
        f"10% deletes. {settings['minutes']:g} minutes, warm-up {settings['warmup_minutes']:g} minutes, "
        f"/proc sampled every {settings['every_s']:g} s. One run."
    )
    after = (
        f"After deleting every uploaded task: resident memory bytes {a['memory_bytes_after_deletes']:.0f} "
        f"(the shipped tasks alone: {a['memory_bytes_shipped']:.0f}); "
        f"RSS {a['rss_after_deletes_mib']:.0f} MiB."
    )
    return "\n\n".join(
        [
            "# Soak: mixed traffic, then every uploaded task deleted",
            f"{harness.header(result)} {setup}",
            f"Requests: {sum(result['outcomes'].values())} ({outcomes}).",
            f"Windows: the median of the {width} samples right after the warm-up, and of the last {width}.",
            "\n".join(harness.table(("figure", "after warm-up", "end", "max"), rows)),
            after,
            "\n".join(harness.goal_table(result["verdicts"])),
            f"![RSS, file descriptors and threads over the soak]({result['name']}.png)\n",
        ]
    )


def main() -> None:
    cli = harness.parser(__doc__, harness.RESULTS, threads=None)
    cli.add_argument("--minutes", type=float, default=30.0)
    cli.add_argument("--warmup", type=float, default=5.0, help="minutes before the baseline window")
    cli.add_argument("--every", type=float, default=5.0, help="seconds between /proc samples")
    args = cli.parse_args()
    if args.smoke:  # 15 s of traffic, 30 samples
        args.minutes, args.warmup, args.every = 0.25, 0.1, 0.5
    report = {"environment": harness.environment(), "command": harness.command_line("bench_soak.py")}
    report["settings"] = {"minutes": args.minutes, "warmup_minutes": args.warmup, "every_s": args.every}
    files = memory_variants(VARIANTS)
    env = {"SPARTAN_STORE_POLL_INTERVAL_S": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    env["SPARTAN_PINNED_TASKS"] = json.dumps(list(SHIPPED))
    with (
        tempfile.TemporaryDirectory() as tmp,
        harness.serve_store(harness.shipped_store(Path(tmp)), env=env) as server,
    ):
        shipped_bytes = memory_bytes(server.url)
        report.update(asyncio.run(soak(server, args.minutes * 60, args.every, files)))
        end_bytes = memory_bytes(server.url)
    report["analysis"] = a = analyse(report, args.warmup * 60, shipped_bytes, end_bytes)
    report["verdicts"] = verdicts(a, report["outcomes"])
    harness.finish(args.out, "soak", report, markdown, plot)
    rss = f"RSS {a['rss_after_warmup_mib']:.0f} -> {a['rss_end_mib']:.0f} MiB ({a['rss_growth']:+.1%})"
    fds, threads = (f"{n} {a[f'{n}_after_warmup']} -> {a[f'{n}_end']}" for n in ("fds", "threads"))
    print(f"{rss}; {fds}; {threads}")


if __name__ == "__main__":
    main()
