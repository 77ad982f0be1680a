"""Soak: a server under mixed predict / upload / delete traffic for a long time; does it leak?

Eight clients, each in a loop: 80% predictions (8 texts) on the shipped tasks and on uploaded ones,
10% uploads (a new task, or a new version of one), 10% deletes of uploaded tasks. The server's RSS,
open file descriptors and threads are sampled every few seconds from /proc. After the traffic, every
uploaded task is deleted: its memory must leave the process (spartan_memory_bytes back to the
shipped tasks' bytes, RSS back near the warm-up level).

Goals (docs/RELIABILITY.md): RSS growth <= 5% from the end of the warm-up to the end; no growth of
file descriptors or threads; deleted tasks free their memory.

    python benchmarks/bench_soak.py --minutes 30          # the real soak; docs/results/soak.*
    python benchmarks/bench_soak.py --smoke --out /tmp/s  # ~40 s, run by the tests
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import struct
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402
from benchmarks.bench_service_load import FALLBACK_TEXTS, Config, start_server  # noqa: E402
from benchmarks.harness import ServeProcess, proc_status  # noqa: E402

SHIPPED = ("sentiment", "banking77", "bbc-news")
CLIENTS = 8
VARIANTS = 12  # distinct memory files the uploads cycle through
UPLOAD_NAMES = 24  # uploaded task names in play: uploads create or replace, deletes remove


def memory_variants(source: Path, count: int) -> list[bytes]:
    """`count` valid memory files: the shipped `source` with its tensors perturbed (no backbone needed)."""
    import torch
    from safetensors.torch import load, save

    data = source.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + size])["__metadata__"]
    tensors = load(data)
    generator = torch.Generator().manual_seed(0)
    return [
        save(
            {name: t + 0.01 * torch.randn(t.shape, generator=generator) for name, t in tensors.items()},
            metadata=metadata,
        )
        for _ in range(count)
    ]


def proc_sample(pid: int) -> dict[str, float]:
    status = proc_status(pid)
    return {
        "t": time.monotonic(),
        "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
        "threads": int(status["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def memory_bytes(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)
    return next(s.value for f in families for s in f.samples if s.name == "spartan_memory_bytes")


async def traffic(url: str, seconds: float, files: list[bytes], seed: int) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    end = time.monotonic() + seconds
    names = [f"soak-{i:02d}" for i in range(UPLOAD_NAMES)]

    async def client_loop(k: int) -> None:
        rng = random.Random(seed * 100 + k)
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            while time.monotonic() < end:
                roll = rng.random()
                if roll < 0.8:
                    # Half on the shipped tasks, half on uploaded names (some deleted meanwhile: 404).
                    task = rng.choice(SHIPPED) if rng.random() < 0.5 else rng.choice(names)
                    texts = rng.sample(FALLBACK_TEXTS, 8)
                    response = await client.post(f"/v1/tasks/{task}/predict", json={"inputs": texts})
                    kind = "predict"
                elif roll < 0.9:
                    task = rng.choice(names)
                    response = await client.put(f"/v1/tasks/{task}/memory?replace=true",
                                                content=rng.choice(files))  # fmt: skip
                    kind = "upload"
                else:
                    response = await client.delete(f"/v1/tasks/{rng.choice(names)}")
                    kind = "delete"
                outcomes[f"{kind} {response.status_code}"] += 1

    await asyncio.gather(*(client_loop(k) for k in range(CLIENTS)))
    return outcomes


async def sample_while(
    pid: int, every_s: float, until: asyncio.Task[Any], samples: list[dict[str, float]]
) -> None:
    while not until.done():
        samples.append(proc_sample(pid))
        await asyncio.sleep(every_s)


async def soak(server: ServeProcess, seconds: float, every_s: float, files: list[bytes]) -> dict[str, Any]:
    samples: list[dict[str, float]] = []
    pid = server.pid
    start = time.monotonic()
    load = asyncio.create_task(traffic(server.url, seconds, files, seed=1))
    await sample_while(pid, every_s, load, samples)
    outcomes = load.result()
    # Every uploaded task goes; what stays resident must be the shipped tasks only.
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        listing = (await client.get("/v1/tasks")).json()["tasks"]
        for task in listing:
            if task["name"] not in SHIPPED:
                await client.delete(f"/v1/tasks/{task['name']}")
    await asyncio.sleep(2)
    after_deletes = proc_sample(pid)
    for sample in samples:
        sample["t"] -= start
    after_deletes["t"] -= start
    return {"samples": samples, "after_deletes": after_deletes, "outcomes": dict(outcomes)}


def window_median(samples: list[dict[str, float]], key: str) -> float:
    values = sorted(s[key] for s in samples)
    return values[len(values) // 2]


def analyse(
    result: dict[str, Any], warmup_s: float, shipped_bytes: float, end_bytes: float
) -> dict[str, Any]:
    """Medians over a window right after the warm-up and over the last window of the run, each a
    tenth of the run (at least 3 samples): single samples catch a load or an upload in progress."""
    samples = [s for s in result["samples"] if s["t"] >= warmup_s] or result["samples"][-3:]
    width = max(3, len(samples) // 10)
    first, last = samples[:width], samples[-width:]
    return {
        "window_samples": width,
        "rss_after_warmup_mib": window_median(first, "rss_mib"),
        "rss_end_mib": window_median(last, "rss_mib"),
        "rss_growth": window_median(last, "rss_mib") / window_median(first, "rss_mib") - 1,
        "rss_max_mib": max(s["rss_mib"] for s in samples),
        "fds_after_warmup": window_median(first, "fds"),
        "fds_end": window_median(last, "fds"),
        "fds_max": max(s["fds"] for s in samples),
        "threads_after_warmup": window_median(first, "threads"),
        "threads_end": window_median(last, "threads"),
        "threads_max": max(s["threads"] for s in samples),
        "rss_after_deletes_mib": result["after_deletes"]["rss_mib"],
        "memory_bytes_shipped": shipped_bytes,
        "memory_bytes_after_deletes": end_bytes,
    }


def verdicts(a: dict[str, Any], outcomes: dict[str, int]) -> list[tuple[str, bool]]:
    bad = {k: v for k, v in outcomes.items() if not k.endswith((" 200", " 201", " 204", " 404"))}
    return [
        ("RSS growth after warm-up <= 5%", a["rss_growth"] <= 0.05),
        ("no file descriptor growth", a["fds_end"] <= a["fds_after_warmup"]),
        ("no thread growth", a["threads_end"] <= a["threads_after_warmup"]),
        (
            "deleted tasks free their memory (resident bytes back to the shipped tasks')",
            a["memory_bytes_after_deletes"] <= a["memory_bytes_shipped"],
        ),
        ("every request got a promised answer (200, 201, 204, or 404 for a deleted task)", not bad),
    ]


def run(minutes: float, warmup_min: float, every_s: float) -> dict[str, Any]:
    files = memory_variants(ROOT / "memories" / "sentiment.safetensors", VARIANTS)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "memories"
        shutil.copytree(ROOT / "memories", store)
        env = {"SPARTAN_STORE_POLL_INTERVAL_S": "2", "OMP_WAIT_POLICY": "PASSIVE",
               "SPARTAN_PINNED_TASKS": json.dumps(list(SHIPPED))}  # fmt: skip
        server = start_server(store, Config(threads=1), batch_size=32, extra_env=env)
        try:
            shipped_bytes = memory_bytes(server.url)
            result = asyncio.run(soak(server, minutes * 60, every_s, files))
            end_bytes = memory_bytes(server.url)
        finally:
            server.stop()
    result["analysis"] = analyse(result, warmup_min * 60, shipped_bytes, end_bytes)
    result["verdicts"] = verdicts(result["analysis"], result["outcomes"])
    return result


def plot(result: dict[str, Any], warmup_s: float, path: Path) -> None:
    plt = harness.pyplot()

    samples = result["samples"]
    minutes = [s["t"] / 60 for s in samples]
    fig, (rss, counts) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    rss.plot(minutes, [s["rss_mib"] for s in samples], label="RSS")
    rss.axvline(warmup_s / 60, color="grey", linestyle=":", label="end of warm-up")
    rss.set_ylabel("MiB")
    rss.legend(fontsize=8)
    rss.set_title("server under mixed predict / upload / delete traffic")
    counts.plot(minutes, [s["fds"] for s in samples], label="open file descriptors")
    counts.plot(minutes, [s["threads"] for s in samples], label="threads")
    counts.set_xlabel("minutes")
    counts.legend(fontsize=8)
    harness.save_figure(fig, path, dpi=110)


def markdown(result: dict[str, Any], args: argparse.Namespace, png: str) -> str:
    a = result["analysis"]
    total = sum(result["outcomes"].values())
    lines = [
        "# Soak: mixed traffic, then every uploaded task deleted",
        "",
        f"{result['date']}, {result['machine']}; command: `{result['command']}`. One server process "
        f"(1 torch thread, pinned shipped tasks), {CLIENTS} clients back to back: 80% predictions "
        f"(8 texts), 10% uploads ({UPLOAD_NAMES} task names, {VARIANTS} distinct files), 10% deletes. "
        f"{args.minutes:g} minutes, warm-up {args.warmup:g} minutes, /proc sampled every {args.every:g} s. "
        "One run.",
        "",
        f"Requests: {total} ({', '.join(f'{k}: {v}' for k, v in sorted(result['outcomes'].items()))}).",
        "",
        f"Windows: the median of the {a['window_samples']} samples right after the warm-up, and of the "
        f"last {a['window_samples']}.",
        "",
        "| figure | after warm-up | end | max |",
        "|---|---|---|---|",
        f"| RSS (MiB) | {a['rss_after_warmup_mib']:.0f} | {a['rss_end_mib']:.0f} ({a['rss_growth']:+.1%}) "
        f"| {a['rss_max_mib']:.0f} |",
        f"| open file descriptors | {a['fds_after_warmup']:.0f} | {a['fds_end']:.0f} | {a['fds_max']:.0f} |",
        f"| threads | {a['threads_after_warmup']:.0f} | {a['threads_end']:.0f} | {a['threads_max']:.0f} |",
        "",
        f"After deleting every uploaded task: resident memory bytes {a['memory_bytes_after_deletes']:.0f} "
        f"(the shipped tasks alone: {a['memory_bytes_shipped']:.0f}); "
        f"RSS {a['rss_after_deletes_mib']:.0f} MiB.",
        "",
        "| goal | met |",
        "|---|---|",
        *[f"| {name} | {'yes' if ok else '**no**'} |" for name, ok in result["verdicts"]],
        "",
        f"![RSS, file descriptors and threads over the soak]({png})",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0, help="minutes before the baseline window")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between /proc samples")
    parser.add_argument("--smoke", action="store_true", help="~40 s: 0.5 min, 0.2 min warm-up")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()
    if args.smoke:
        args.minutes, args.warmup, args.every = 0.5, 0.2, 1.0
    result = run(args.minutes, args.warmup, args.every)
    result.update(
        date=str(date.today()),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        command="python benchmarks/bench_soak.py "
        + (" --smoke" if args.smoke else f"--minutes {args.minutes:g}"),
        load_average=os.getloadavg(),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=1))
    plot(result, args.warmup * 60, args.out / "soak.png")
    (args.out / "soak.md").write_text(markdown(result, args, "soak.png"))
    for name, ok in result["verdicts"]:
        print(f"{'ok ' if ok else 'NOT'} {name}")
    a = result["analysis"]
    print(f"RSS {a['rss_after_warmup_mib']:.0f} -> {a['rss_end_mib']:.0f} MiB ({a['rss_growth']:+.1%}); "
          f"fds {a['fds_after_warmup']} -> {a['fds_end']}; "
          f"threads {a['threads_after_warmup']} -> {a['threads_end']}")  # fmt: skip


if __name__ == "__main__":
    main()
