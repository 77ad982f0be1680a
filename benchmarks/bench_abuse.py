"""One client against the others: huge requests beside small ones, and bursts of large uploads.

1. huge: 16 concurrent requests of 64 texts x 10,000 characters for one task, while another client
   sends one-row requests of another task every 0.25 s (the hardening issue's defect 4). Wanted: the
   excess refused at once (429 + Retry-After), accepted work answered within its deadline, and the
   small requests not queued behind the huge ones (batches are fair by task).
2. uploads: N concurrent uploads of a valid ~62 MB memory file (defect 7), as a burst and with clients
   that retry after Retry-After until stored; RSS of the server sampled every 20 ms, then every
   uploaded task deleted. Wanted: bounded upload bytes in flight, RSS back near its level before.

    python benchmarks/bench_abuse.py                      # ~3 minutes; docs/results/abuse.*
    python benchmarks/bench_abuse.py --smoke --out /tmp/a # seconds; run by the tests
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness
from benchmarks.harness import percentile

WORDS = ["the", "service", "keeps", "one", "frozen", "backbone", "and", "a", "memory", "per", "task"]
BIG_TASK, SMALL_TASK = "bbc-news", "banking77"


def long_text(seed: int, chars: int) -> str:
    words = [WORDS[(seed + 7 * i) % len(WORDS)] for i in range(chars // 3)]
    return " ".join(words)[:chars]


def statuses(records: list[dict[str, Any]], key: str = "status") -> dict[str, int]:
    return dict(sorted(Counter(str(r[key]) for r in records).items()))


async def huge(url: str, big: int, texts: int, chars: int) -> dict[str, Any]:
    big_done: list[dict[str, Any]] = []
    small_done: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=big + 8, max_keepalive_connections=big + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        for task in (SMALL_TASK, BIG_TASK):  # warm both tasks up (resident, kernels picked)
            await client.post(f"/v1/tasks/{task}/predict", json={"inputs": [long_text(0, chars)] * 8})
        finished = asyncio.Event()

        async def one_big(i: int) -> None:
            body = {"inputs": [long_text(i * texts + j, chars) for j in range(texts)]}
            sent = time.monotonic()
            response = await client.post(f"/v1/tasks/{BIG_TASK}/predict", json=body)
            big_done.append({"status": response.status_code, "s": time.monotonic() - sent,
                             "retry_after": response.headers.get("retry-after")})  # fmt: skip

        async def small_client() -> None:
            i = 0
            while not finished.is_set():
                sent = time.monotonic()
                response = await client.post(
                    f"/v1/tasks/{SMALL_TASK}/predict", json={"inputs": [f"card {i}"]}
                )
                small_done.append({"status": response.status_code, "s": time.monotonic() - sent})
                i += 1
                await asyncio.sleep(0.25)

        smalls = asyncio.create_task(small_client())
        await asyncio.sleep(0.5)
        await asyncio.gather(*(one_big(i) for i in range(big)))
        await asyncio.sleep(1.0)
        finished.set()
        await smalls
    refused = [r for r in big_done if r["status"] == 429]
    served = [r["s"] for r in small_done if r["status"] == 200]
    return {
        "big": statuses(big_done),
        "big_refused_ms": spread_ms([r["s"] for r in refused]),
        "big_refused_with_retry_after": sum(1 for r in refused if r["retry_after"]),
        "big_served_max_s": max((r["s"] for r in big_done if r["status"] == 200), default=0.0),
        "small": statuses(small_done),
        "small_ms": spread_ms(served) | {"p99": percentile(served, 99) * 1000},
    }


def spread_ms(seconds: list[float]) -> dict[str, float]:
    return {k: v * 1000 if k != "runs" else v for k, v in harness.spread(seconds).items()} if seconds else {}


def big_memory(parents: int) -> bytes:
    """The shipped banking77 memory grown to `parents` parents (~62 MB at 950): valid, served as is."""
    from app.spartan.memfile import load_memory, memory_to_bytes
    from app.spartan.memory import TaskMemory

    shipped = load_memory((harness.MEMORIES / f"{SMALL_TASK}.safetensors").read_bytes())
    grown = TaskMemory(dataclasses.replace(shipped.spec, num_parents=parents))
    grown.layernorms = shipped.layernorms
    grown.head.load_state_dict(shipped.head.state_dict())
    return memory_to_bytes(grown)


async def upload_all(url: str, data: bytes, count: int, retry: bool) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def one(i: int) -> dict[str, Any]:
            tries: list[int] = []
            while not tries or (retry and tries[-1] == 429):
                response = await client.put(f"/v1/tasks/big-{i}/memory", content=data,
                                            headers={"content-type": "application/octet-stream"})  # fmt: skip
                tries.append(response.status_code)
                if response.status_code == 429 and retry:
                    await asyncio.sleep(float(response.headers.get("retry-after", "1")))
            return {"first": tries[0], "status": tries[-1], "tries": len(tries)}

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def uploads(
    server: harness.ServeProcess, data: bytes, count: int, retry: bool, settle_s: float
) -> dict[str, Any]:
    """`count` concurrent uploads; RSS sampled every 20 ms, `settle_s` after the uploads and the deletes."""
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            samples.append(harness.rss_bytes(server.pid))

    before = harness.rss_bytes(server.pid)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    records = asyncio.run(upload_all(server.url, data, count, retry))
    seconds = time.monotonic() - started
    time.sleep(settle_s)
    resident = harness.rss_bytes(server.pid)
    for i in range(count):
        httpx.delete(f"{server.url}/v1/tasks/big-{i}", timeout=60)
    time.sleep(settle_s)
    stop.set()
    sampler.join()
    mib = 2**20
    return {
        "uploads": count, "retry": retry, "seconds": seconds, "first_try": statuses(records, "first"),
        "final": statuses(records), "tries": sum(r["tries"] for r in records),
        "rss_mib": {"before": before / mib, "peak": max(samples, default=before) / mib,
                    "after_uploads": resident / mib, "after_deletes": harness.rss_bytes(server.pid) / mib},
    }  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    huge = [
        (n, r["big"], harness.fmt_spread(r["big_refused_ms"] or None, 0), f"{r['big_served_max_s']:.1f} s",
         r["small"], " / ".join(f"{r['small_ms'][k]:.0f}" for k in ("median", "p99", "max")) + " ms")
        for n, r in enumerate(report["huge"], 1)
    ]  # fmt: skip
    uploads = [
        (u["uploads"], "yes" if u["retry"] else "no", u["first_try"], u["final"],
         " / ".join(f"{u['rss_mib'][k]:.0f}" for k in ("before", "peak", "after_uploads", "after_deletes")),
         f"{u['seconds']:.1f}")
        for u in report["uploads"]
    ]  # fmt: skip
    return "\n".join([
        "# One client against the others: huge requests and large-upload bursts",
        "",
        f"{harness.header(report)} One `spartan serve` (2 torch threads, default limits: 30 s deadline, "
        "queue work budget 10 s, 128 MiB of uploads in flight); the load generator runs beside it.",
        "",
        f"## Huge requests ({report['shape']}) beside one-row requests of another task",
        "",
        *harness.table(("round", "huge: outcomes", "429 latency ms, median [min, max]",
                        "served huge: slowest", "small: outcomes", "small p50 / p99 / max"), huge),
        "",
        f"## Concurrent uploads of a {report['file_mb']:.1f} MB memory file",
        "",
        *harness.table(("uploads", "clients retry on 429", "first try", "final", "RSS MiB before / peak / "
                        "with the tasks resident / after deleting them", "seconds"), uploads),
    ]) + "\n"  # fmt: skip


def main() -> None:
    args = harness.parser(__doc__, harness.RESULTS, rounds=3, threads=None).parse_args()
    rounds, big, texts, parents = (1, 4, 8, 40) if args.smoke else (args.rounds, 16, 64, 950)
    data = big_memory(parents)
    report: dict[str, Any] = {
        "environment": harness.environment(),
        "command": harness.command_line("bench_abuse.py"),
    }
    report.update(
        file_mb=len(data) / 1e6, shape=f"{big} x {texts} texts x 10,000 characters", huge=[], uploads=[]
    )
    bursts = ((6, False), (6, True)) if args.smoke else ((16, False), (32, False), (16, True))
    # Smoke: a budget of two small files in flight, so that the burst meets it as the real one does.
    env = {"SPARTAN_MAX_UPLOAD_BYTES_IN_FLIGHT": str(2 * len(data) + 1024)} if args.smoke else {}
    with tempfile.TemporaryDirectory() as tmp:
        store = harness.shipped_store(Path(tmp))
        for number in range(rounds):  # a fresh server per round: rounds do not share a warm heap
            with harness.serve_store(store, threads=2, env=env) as server:
                report["huge"].append(asyncio.run(huge(server.url, big, texts, 10_000)))
                for count, retry in bursts if number == rounds - 1 else ():
                    report["uploads"].append(uploads(server, data, count, retry, 1.0 if args.smoke else 3.0))
    harness.finish(args.out, "abuse", report, markdown)


if __name__ == "__main__":
    main()
