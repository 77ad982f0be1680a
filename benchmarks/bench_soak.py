"""Soak: a server under mixed predict / upload / delete traffic for a long time; does it leak?

Eight clients, each in a loop: 80% predictions (8 texts) on the shipped tasks and on uploaded ones,
10% uploads (a new task, or a new version of one), 10% deletes of uploaded tasks. The server's RSS,
open file descriptors and threads are sampled every few seconds from /proc. After the traffic, every
uploaded task is deleted: its memory must leave the process (spartan_memory_bytes back to the
shipped tasks' bytes, RSS back near the warm-up level).

Goals (docs/RELIABILITY.md): RSS growth <= 5% from the end of the warm-up to the end; no growth of
file descriptors or threads; deleted tasks free their memory.

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


def memory_variants(count: int) -> list[bytes]:
    """`count` valid memory files: the shipped sentiment memory with its tensors perturbed."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load, save

    path = harness.MEMORIES / "sentiment.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors, generator = load(path.read_bytes()), torch.Generator().manual_seed(0)
    noisy = ({name: t + 0.01 * torch.randn(t.shape, generator=generator) for name, t in tensors.items()}
             for _ in range(count))  # fmt: skip
    return [save(t, metadata=metadata) for t in noisy]


def proc_sample(pid: int, start: float) -> dict[str, float]:
    status = harness.proc_status(pid)
    return {"t": time.monotonic() - start, "rss_mib": harness.status_mib("VmRSS", pid),
            "threads": int(status["Threads"]), "fds": len(os.listdir(f"/proc/{pid}/fd"))}  # fmt: skip


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


def analyse(
    result: dict[str, Any], warmup_s: float, shipped_bytes: float, end_bytes: float
) -> dict[str, Any]:
    """Medians over a window right after the warm-up and over the last window of the run, each a
    tenth of the run (at least 3 samples): single samples catch a load or an upload in progress."""
    samples = [s for s in result["samples"] if s["t"] >= warmup_s] or result["samples"][-3:]
    width = max(3, len(samples) // 10)
    analysis: dict[str, Any] = {"window_samples": width}
    for key, name in (("rss_mib", "rss"), ("fds", "fds"), ("threads", "threads")):
        first = statistics.median_high(s[key] for s in samples[:width])
        last = statistics.median_high(s[key] for s in samples[-width:])
        suffix = "_mib" if key == "rss_mib" else ""
        analysis.update({f"{name}_after_warmup{suffix}": first, f"{name}_end{suffix}": last,
                         f"{name}_max{suffix}": max(s[key] for s in samples)})  # fmt: skip
    analysis["rss_growth"] = analysis["rss_end_mib"] / analysis["rss_after_warmup_mib"] - 1
    analysis["rss_after_deletes_mib"] = result["after_deletes"]["rss_mib"]
    return {**analysis, "memory_bytes_shipped": shipped_bytes, "memory_bytes_after_deletes": end_bytes}


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
    plt = harness.pyplot()
    samples = result["samples"]
    minutes = [s["t"] / 60 for s in samples]
    fig, (rss, counts) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
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
    a, settings = result["analysis"], result["settings"]
    outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(result["outcomes"].items()))
    rows = [
        ("RSS (MiB)", f"{a['rss_after_warmup_mib']:.0f}", f"{a['rss_end_mib']:.0f} ({a['rss_growth']:+.1%})",
         f"{a['rss_max_mib']:.0f}"),
        *((name, f"{a[f'{key}_after_warmup']:.0f}", f"{a[f'{key}_end']:.0f}", f"{a[f'{key}_max']:.0f}")
          for name, key in (("open file descriptors", "fds"), ("threads", "threads"))),
    ]  # fmt: skip
    return "\n".join([
        "# Soak: mixed traffic, then every uploaded task deleted",
        "",
        f"{harness.header(result)} One server process (1 torch thread, pinned shipped tasks), {CLIENTS} "
        "clients "
        f"back to back: 80% predictions (8 texts), 10% uploads ({len(UPLOAD_NAMES)} task names, {VARIANTS} "
        f"distinct files), 10% deletes. {settings['minutes']:g} minutes, warm-up "
        f"{settings['warmup_minutes']:g} "
        f"minutes, /proc sampled every {settings['every_s']:g} s. One run.",
        "",
        f"Requests: {sum(result['outcomes'].values())} ({outcomes}).",
        "",
        f"Windows: the median of the {a['window_samples']} samples right after the warm-up, and of the last "
        f"{a['window_samples']}.",
        "",
        *harness.table(("figure", "after warm-up", "end", "max"), rows),
        "",
        f"After deleting every uploaded task: resident memory bytes {a['memory_bytes_after_deletes']:.0f} "
        "(the "
        f"shipped tasks alone: {a['memory_bytes_shipped']:.0f}); RSS {a['rss_after_deletes_mib']:.0f} MiB.",
        "",
        *harness.goal_table(result["verdicts"]),
        "",
        f"![RSS, file descriptors and threads over the soak]({result['name']}.png)",
        "",
    ])  # fmt: skip


def main() -> None:
    cli = harness.parser(__doc__, harness.RESULTS, threads=None)
    cli.add_argument("--minutes", type=float, default=30.0)
    cli.add_argument("--warmup", type=float, default=5.0, help="minutes before the baseline window")
    cli.add_argument("--every", type=float, default=5.0, help="seconds between /proc samples")
    args = cli.parse_args()
    if args.smoke:  # 15 s of traffic, 30 samples
        args.minutes, args.warmup, args.every = 0.25, 0.1, 0.5
    report: dict[str, Any] = {
        "environment": harness.environment(),
        "command": harness.command_line("bench_soak.py"),
    }
    report["settings"] = {"minutes": args.minutes, "warmup_minutes": args.warmup, "every_s": args.every}
    files = memory_variants(VARIANTS)
    env = {"SPARTAN_STORE_POLL_INTERVAL_S": "2", "OMP_WAIT_POLICY": "PASSIVE",
           "SPARTAN_PINNED_TASKS": json.dumps(list(SHIPPED))}  # fmt: skip
    with (
        tempfile.TemporaryDirectory() as tmp,
        harness.serve_store(harness.shipped_store(Path(tmp)), env=env) as server,
    ):
        shipped_bytes = memory_bytes(server.url)
        report.update(asyncio.run(soak(server, args.minutes * 60, args.every, files)))
        end_bytes = memory_bytes(server.url)
    report["analysis"] = analyse(report, args.warmup * 60, shipped_bytes, end_bytes)
    report["verdicts"] = verdicts(report["analysis"], report["outcomes"])
    harness.finish(args.out, "soak", report, markdown, plot)
    a = report["analysis"]
    print(
        f"RSS {a['rss_after_warmup_mib']:.0f} -> {a['rss_end_mib']:.0f} MiB ({a['rss_growth']:+.1%}); "
        f"fds {a['fds_after_warmup']} -> {a['fds_end']}; "
        f"threads {a['threads_after_warmup']} -> {a['threads_end']}"
    )


if __name__ == "__main__":
    main()
