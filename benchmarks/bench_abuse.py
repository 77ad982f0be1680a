"""One client against the others: 16 huge requests (64 texts x 10,000 characters) for one task beside a
one-row client of another task, then bursts of concurrent ~62 MB memory uploads (plain and retrying
clients), the server's RSS sampled every 20 ms. Goals and results: docs/RELIABILITY.md (promises 4, 7).

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
from benchmarks.harness import ServeProcess, percentile

WORDS = ["the", "service", "keeps", "one", "frozen", "backbone", "and", "a", "memory", "per", "task"]
BIG_TASK, SMALL_TASK = "bbc-news", "banking77"
RSS_KEYS = ("before", "peak", "after_uploads", "after_deletes")


def long_text(seed: int, chars: int) -> str:
    return " ".join(WORDS[(seed + 7 * i) % len(WORDS)] for i in range(chars // 3))[:chars]


def statuses(records: list[dict[str, Any]], key: str = "status") -> dict[str, int]:
    return dict(sorted(Counter(str(r[key]) for r in records).items()))


def spread_ms(seconds: list[float]) -> dict[str, float]:
    return {k: v if k == "runs" else v * 1000 for k, v in harness.spread(seconds).items()} if seconds else {}


async def huge(url: str, big: int, texts: int, chars: int) -> dict[str, Any]:
    big_done: list[dict[str, Any]] = []
    small_done: list[dict[str, Any]] = []
    finished = asyncio.Event()
    limits = httpx.Limits(max_connections=big + 8, max_keepalive_connections=big + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def predict(task: str, inputs: list[str], done: list[dict[str, Any]]) -> None:
            sent = time.monotonic()
            response = await client.post(f"/v1/tasks/{task}/predict", json={"inputs": inputs})
            record = {"status": response.status_code, "s": time.monotonic() - sent}
            done.append(record | {"retry_after": response.headers.get("retry-after")})

        async def one_big(i: int) -> None:
            await predict(BIG_TASK, [long_text(i * texts + j, chars) for j in range(texts)], big_done)

        async def small_client() -> None:
            i = 0
            while not finished.is_set():
                await predict(SMALL_TASK, [f"card {i}"], small_done)
                i += 1
                await asyncio.sleep(0.25)

        for task in (SMALL_TASK, BIG_TASK):  # warm both tasks up (resident, kernels picked)
            await client.post(f"/v1/tasks/{task}/predict", json={"inputs": [long_text(0, chars)] * 8})
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


def big_memory(parents: int) -> bytes:
    """The shipped banking77 memory grown to `parents` parents (~62 MB at 950): valid, served as is."""
    from app.spartan.memfile import load_memory, memory_to_bytes
    from app.spartan.memory import TaskMemory

    shipped = load_memory((harness.MEMORIES / f"{SMALL_TASK}.safetensors").read_bytes())
    grown = TaskMemory(dataclasses.replace(shipped.spec, num_parents=parents))
    grown.layernorms = shipped.layernorms
    grown.head.load_state_dict(shipped.head.state_dict())
    return memory_to_bytes(grown)


async def uploads(
    server: ServeProcess, data: bytes, count: int, retry: bool, settle_s: float
) -> dict[str, Any]:
    """`count` concurrent uploads; RSS sampled every 20 ms, `settle_s` after the uploads and the deletes."""
    rss, samples, stop = {"before": harness.rss_bytes(server.pid)}, [], threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            samples.append(harness.rss_bytes(server.pid))

    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    headers = {"content-type": "application/octet-stream"}
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits, headers=headers) as client:

        async def upload(i: int) -> dict[str, Any]:
            tries = [await client.put(f"/v1/tasks/big-{i}/memory", content=data)]
            while retry and tries[-1].status_code == 429:
                await asyncio.sleep(float(tries[-1].headers.get("retry-after", "1")))
                tries.append(await client.put(f"/v1/tasks/big-{i}/memory", content=data))
            return {"first": tries[0].status_code, "status": tries[-1].status_code, "tries": len(tries)}

        started = time.monotonic()
        records = await asyncio.gather(*(upload(i) for i in range(count)))
    seconds = time.monotonic() - started
    await asyncio.sleep(settle_s)
    rss["after_uploads"] = harness.rss_bytes(server.pid)
    for i in range(count):
        httpx.delete(f"{server.url}/v1/tasks/big-{i}", timeout=60)
    await asyncio.sleep(settle_s)
    stop.set()
    sampler.join()
    rss |= {"peak": max(samples, default=rss["before"]), "after_deletes": harness.rss_bytes(server.pid)}
    return {
        "uploads": count,
        "retry": retry,
        "seconds": seconds,
        "first_try": statuses(records, "first"),
        "final": statuses(records),
        "tries": sum(r["tries"] for r in records),
        "rss_mib": {k: rss[k] / 2**20 for k in RSS_KEYS},
    }


def huge_row(number: int, r: dict[str, Any]) -> tuple[object, ...]:
    refused = harness.fmt_spread(r["big_refused_ms"] or None, 0)
    small = " / ".join(f"{r['small_ms'][k]:.0f}" for k in ("median", "p99", "max"))
    return (number, r["big"], refused, f"{r['big_served_max_s']:.1f} s", r["small"], f"{small} ms")


def upload_row(u: dict[str, Any]) -> tuple[object, ...]:
    retry, rss = "yes" if u["retry"] else "no", " / ".join(f"{u['rss_mib'][k]:.0f}" for k in RSS_KEYS)
    return (u["uploads"], retry, u["first_try"], u["final"], rss, f"{u['seconds']:.1f}")


def markdown(report: dict[str, Any]) -> str:
    huge_head = ("round", "huge: outcomes", "429 latency ms, median [min, max]", "served huge: slowest")
    rss_head = "RSS MiB before / peak / with the tasks resident / after deleting them"
    upload_head = ("uploads", "clients retry on 429", "first try", "final", rss_head, "seconds")
    huge_rows = [huge_row(n, r) for n, r in enumerate(report["huge"], 1)]
    setup = (
        "One `spartan serve` (2 torch threads, default limits: 30 s deadline, queue work budget 10 s, "
        "128 MiB of uploads in flight); the load generator runs beside it."
    )
    return "\n\n".join(
        [
            "# One client against the others: huge requests and large-upload bursts",
            f"{harness.header(report)} {setup}",
            f"## Huge requests ({report['shape']}) beside one-row requests of another task",
            "\n".join(harness.table((*huge_head, "small: outcomes", "small p50 / p99 / max"), huge_rows)),
            f"## Concurrent uploads of a {report['file_mb']:.1f} MB memory file",
            "\n".join(harness.table(upload_head, map(upload_row, report["uploads"]))) + "\n",
        ]
    )


def main() -> None:
    args = harness.parser(__doc__, harness.RESULTS, rounds=3, threads=None).parse_args()
    rounds, big, texts, parents = (1, 4, 8, 40) if args.smoke else (args.rounds, 16, 64, 950)
    bursts = ((6, False), (6, True)) if args.smoke else ((16, False), (32, False), (16, True))
    data = big_memory(parents)
    report = {"environment": harness.environment(), "command": harness.command_line("bench_abuse.py")}
    report |= {"file_mb": len(data) / 1e6, "shape": f"{big} x {texts} texts x 10,000 characters"}
    report |= {"huge": [], "uploads": []}
    # Smoke: a budget of two small files in flight, so that the burst meets it as the real one does.
    env = {"SPARTAN_MAX_UPLOAD_BYTES_IN_FLIGHT": str(2 * len(data) + 1024)} if args.smoke else {}
    with tempfile.TemporaryDirectory() as tmp:
        store = harness.shipped_store(Path(tmp))
        for number in range(rounds):  # a fresh server per round: rounds do not share a warm heap
            with harness.serve_store(store, threads=2, env=env) as server:
                report["huge"].append(asyncio.run(huge(server.url, big, texts, 10_000)))
                for count, retry in bursts if number == rounds - 1 else ():
                    settle_s = 1.0 if args.smoke else 3.0
                    report["uploads"].append(asyncio.run(uploads(server, data, count, retry, settle_s)))
    harness.finish(args.out, "abuse", report, markdown)


if __name__ == "__main__":
    main()
