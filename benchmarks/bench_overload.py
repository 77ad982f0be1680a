"""Overload: the service under 5x its measured capacity, then back to normal load.

1. capacity: a closed loop of 16 clients (8-text requests) for a few seconds -> requests/s;
2. overload: an open loop at 5x that rate for 60 s (requests are sent on schedule, whether or not
   earlier ones were answered, as real traffic arrives), every request with a client timeout of
   SPARTAN_REQUEST_TIMEOUT_S + 10 s so that a request the service never answers shows up as "hung";
3. recovery: the closed loop again, in 0.5 s windows, until throughput is back to 90% of capacity.

What must hold (docs/RELIABILITY.md): overload is refused fast with 429 and Retry-After (p99 of the
rejections under 50 ms), every accepted request is answered within its deadline (200, or 504 at the
deadline), none hangs, and throughput recovers within seconds.

    python benchmarks/bench_overload.py                       # ~2 minutes; docs/results/overload.*
    python benchmarks/bench_overload.py --smoke --out /tmp/o  # seconds; run by the tests
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402
from benchmarks.bench_service_load import FALLBACK_TEXTS, Config, start_server  # noqa: E402
from benchmarks.harness import percentile  # noqa: E402

TEXTS_PER_REQUEST = 8
TASK = "sentiment"


@dataclass(frozen=True)
class Plan:
    capacity_s: float = 8.0
    overload_s: float = 60.0
    factor: float = 5.0
    recovery_limit_s: float = 30.0
    clients: int = 16
    request_timeout_s: float = 5.0
    max_queue_rows: int = 256  # 32 requests of 8 rows: ~1 s of work at this machine's capacity
    max_queue_work_s: float = 2.5  # the settings require it below the request timeout
    threads: int = 1

    @classmethod
    def smoke(cls) -> Plan:
        return cls(capacity_s=2.0, overload_s=3.0, recovery_limit_s=15.0, clients=4)


def body(i: int) -> dict[str, Any]:
    start = (i * TEXTS_PER_REQUEST) % len(FALLBACK_TEXTS)
    texts = (FALLBACK_TEXTS * 2)[start : start + TEXTS_PER_REQUEST]
    return {"inputs": texts}


async def closed_loop(url: str, clients: int, seconds: float) -> list[tuple[float, int]]:
    """(completion time, status) of every request `clients` back-to-back clients made in `seconds`."""
    done: list[tuple[float, int]] = []
    end = time.monotonic() + seconds

    async def client_loop(k: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            i = k
            while time.monotonic() < end:
                response = await client.post(f"/v1/tasks/{TASK}/predict", json=body(i))
                done.append((time.monotonic(), response.status_code))
                i += clients

    await asyncio.gather(*(client_loop(k) for k in range(clients)))
    return done


async def open_loop(url: str, rate: float, seconds: float, client_timeout_s: float) -> list[dict[str, Any]]:
    """Send `rate` requests/s on schedule for `seconds`; one record per request."""
    records: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    async with httpx.AsyncClient(base_url=url, timeout=client_timeout_s, limits=limits) as client:

        async def one(i: int, scheduled: float) -> None:
            sent = time.monotonic()
            record: dict[str, Any] = {"scheduled": scheduled, "sent": sent, "start": start}
            try:
                # One deadline for the whole exchange: httpx's own timeouts are per phase (connect,
                # write, read, pool), and a request could wait in several of them in turn.
                response = await asyncio.wait_for(
                    client.post(f"/v1/tasks/{TASK}/predict", json=body(i)), client_timeout_s
                )
                record.update(status=response.status_code, retry_after=response.headers.get("retry-after"))
            except (TimeoutError, httpx.TimeoutException):
                record.update(status="hung")
            except httpx.TransportError as err:
                record.update(status=f"transport:{type(err).__name__}")
            record["seconds"] = time.monotonic() - sent
            records.append(record)

        start = time.monotonic()
        pending = []
        for i in range(int(rate * seconds)):
            scheduled = start + i / rate
            delay = scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.create_task(one(i, scheduled - start)))
        await asyncio.gather(*pending)
    return records


async def recovery(url: str, plan: Plan, capacity: float) -> dict[str, Any]:
    """Seconds after the burst until a 0.5 s window of the closed loop reaches 90% of capacity."""
    start = time.monotonic()
    windows: list[float] = []
    while time.monotonic() - start < plan.recovery_limit_s:
        done = await closed_loop(url, plan.clients, 0.5)
        windows.append(sum(1 for _, status in done if status == 200) / 0.5)
        if windows[-1] >= 0.9 * capacity:
            return {"seconds": time.monotonic() - start, "windows_rps": windows, "recovered": True}
    return {"seconds": None, "windows_rps": windows, "recovered": False}


def summarise(records: list[dict[str, Any]], plan: Plan, capacity: float, rate: float) -> dict[str, Any]:
    statuses = Counter(str(r["status"]) for r in records)
    rejected = [r for r in records if r["status"] == 429]
    accepted = [r for r in records if r["status"] in (200, 504)]
    ok = [r["seconds"] for r in records if r["status"] == 200]
    lag = [r["sent"] - r["start"] - r["scheduled"] for r in records]
    return {
        "requests": len(records),
        # How late the generator sent requests against their schedule (its own event loop's lag).
        "generator_lag_p99_ms": percentile(lag, 99) * 1000,
        "offered_rps": rate,
        "capacity_rps": capacity,
        "statuses": dict(statuses),
        "goodput_rps": len(ok) / plan.overload_s,
        "rejected_share": len(rejected) / len(records) if records else 0.0,
        "rejection_p50_ms": percentile([r["seconds"] for r in rejected], 50) * 1000,
        "rejection_p99_ms": percentile([r["seconds"] for r in rejected], 99) * 1000,
        "rejections_with_retry_after": sum(1 for r in rejected if r["retry_after"]),
        "retry_after_values": sorted({r["retry_after"] for r in rejected if r["retry_after"]}),
        "accepted_p50_ms": percentile(ok, 50) * 1000,
        "accepted_p99_ms": percentile(ok, 99) * 1000,
        "accepted_max_s": max((r["seconds"] for r in accepted), default=0.0),
        "timeouts_504": statuses.get("504", 0),
        "hung": statuses.get("hung", 0),
        "other": {k: v for k, v in statuses.items() if k not in ("200", "429", "504")},
    }


def verdicts(result: dict[str, Any], plan: Plan) -> list[tuple[str, bool]]:
    o = result["overload"]
    return [
        ("overload refused with 429", o["statuses"].get("429", 0) > 0),
        ("every 429 carries Retry-After", o["rejections_with_retry_after"] == o["statuses"].get("429", 0)),
        ("p99 of rejections < 50 ms", o["rejection_p99_ms"] < 50),
        (
            f"accepted requests answered within the {plan.request_timeout_s:g} s deadline (+1 s)",
            o["accepted_max_s"] <= plan.request_timeout_s + 1,
        ),
        ("no request hangs", o["hung"] == 0),
        ("no other outcome (5xx but 504, transport errors)", not o["other"]),
        (
            "throughput back to 90% of capacity within 5 s",
            bool(result["recovery"]["recovered"]) and result["recovery"]["seconds"] <= 5,
        ),
    ]


async def measure(url: str, plan: Plan) -> dict[str, Any]:
    await closed_loop(url, plan.clients, 1.0)  # warm-up
    done = await closed_loop(url, plan.clients, plan.capacity_s)
    capacity = sum(1 for _, status in done if status == 200) / plan.capacity_s
    rate = plan.factor * capacity
    records = await open_loop(url, rate, plan.overload_s, plan.request_timeout_s + 10)
    return {
        "capacity": {"rps": capacity, "statuses": dict(Counter(s for _, s in done))},
        "overload": summarise(records, plan, capacity, rate),
        "recovery": await recovery(url, plan, capacity),
        "timeline": timeline(records),
    }


def timeline(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per second of the burst (by send time): answered 200, 429, other; p99 of the 200s."""
    seconds: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        seconds.setdefault(int(r["scheduled"]), []).append(r)
    rows = []
    for second, group in sorted(seconds.items()):
        ok = [r["seconds"] for r in group if r["status"] == 200]
        rows.append({"second": second, "ok": len(ok), "rejected": sum(r["status"] == 429 for r in group),
                     "other": sum(r["status"] not in (200, 429) for r in group),
                     "ok_p99_ms": percentile(ok, 99) * 1000 if ok else None})  # fmt: skip
    return rows


def plot(result: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()

    rows = result["timeline"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    x = [r["second"] for r in rows]
    series = [[r["ok"] for r in rows], [r["rejected"] for r in rows], [r["other"] for r in rows]]
    colors = ["#4c72b0", "#dd8452", "#c44e52"]
    top.stackplot(x, *series, labels=["200 (served)", "429 (refused)", "other"], colors=colors)
    top.axhline(result["capacity"]["rps"], color="black", linestyle="--", linewidth=1, label="capacity")
    top.set_ylabel("requests sent in that second")
    top.legend(loc="upper right", fontsize=8)
    top.set_title(f"{result['plan']['factor']:g}x capacity for {result['plan']['overload_s']:g} s")
    bottom.plot(x, [r["ok_p99_ms"] for r in rows], marker=".", label="p99 of served requests")
    bottom.axhline(result["plan"]["request_timeout_s"] * 1000, color="black", linestyle="--", linewidth=1,
                   label="request deadline")  # fmt: skip
    bottom.set_ylabel("ms")
    bottom.set_xlabel("second of the burst")
    bottom.legend(loc="upper right", fontsize=8)
    harness.save_figure(fig, path, dpi=110)


def markdown(result: dict[str, Any], png: str) -> str:
    o, rec, plan = result["overload"], result["recovery"], result["plan"]
    recovered = f"{rec['seconds']:.1f} s" if rec["recovered"] else "not within the limit"
    lines = [
        "# Overload: 5x capacity, then recovery",
        "",
        f"{result['date']}, {result['machine']}; command: `{result['command']}`. One server process "
        f"(`spartan serve`, {plan['threads']} torch thread, max_queue_rows {plan['max_queue_rows']}, "
        f"request timeout {plan['request_timeout_s']:g} s); the load generator (async httpx) runs beside "
        f"it on the same machine. Requests carry {TEXTS_PER_REQUEST} texts each. One run.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| capacity (closed loop, {plan['clients']} clients) | {result['capacity']['rps']:.1f} requests/s |",
        f"| offered during the burst | {o['offered_rps']:.1f} requests/s for {plan['overload_s']:g} s "
        f"({o['requests']} requests) |",
        f"| outcomes | {', '.join(f'{k}: {v}' for k, v in sorted(o['statuses'].items()))} |",
        f"| goodput during the burst | {o['goodput_rps']:.1f} requests/s "
        f"({o['goodput_rps'] / result['capacity']['rps']:.0%} of capacity) |",
        f"| 429 latency p50 / p99 | {o['rejection_p50_ms']:.1f} / {o['rejection_p99_ms']:.1f} ms |",
        f"| 429s with Retry-After | {o['rejections_with_retry_after']} of {o['statuses'].get('429', 0)} "
        f"(values {', '.join(o['retry_after_values'])} s) |",
        f"| served (200) latency p50 / p99 / max of accepted | {o['accepted_p50_ms']:.0f} / "
        f"{o['accepted_p99_ms']:.0f} ms / {o['accepted_max_s']:.2f} s |",
        f"| hung (no answer within deadline + 10 s) | {o['hung']} |",
        f"| load generator lag behind its schedule, p99 | {o['generator_lag_p99_ms']:.1f} ms |",
        f"| recovery to 90% of capacity | {recovered} |",
        "",
        "| goal | met |",
        "|---|---|",
        *[f"| {name} | {'yes' if ok else '**no**'} |" for name, ok in result["verdicts"]],
        "",
        f"![requests per second and latency during the burst]({png})",
        "",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan.smoke() if args.smoke else Plan()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "memories"
        shutil.copytree(ROOT / "memories", store)
        env = {
            "SPARTAN_MAX_QUEUE_ROWS": str(plan.max_queue_rows),
            "SPARTAN_REQUEST_TIMEOUT_S": str(plan.request_timeout_s),
            "SPARTAN_MAX_QUEUE_WORK_S": str(plan.max_queue_work_s),
            "OMP_WAIT_POLICY": "PASSIVE",
        }
        server = start_server(store, Config(threads=plan.threads), batch_size=32, extra_env=env)
        try:
            result = asyncio.run(measure(server.url, plan))
        finally:
            server.stop()
    result.update(
        plan=asdict(plan),
        date=str(date.today()),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        command="python benchmarks/bench_overload.py" + (" --smoke" if args.smoke else ""),
        load_average=os.getloadavg(),
    )
    result["verdicts"] = verdicts(result, plan)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for the tests")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overload.json").write_text(json.dumps(result, indent=1, default=str))
    plot(result, args.out / "overload.png")
    (args.out / "overload.md").write_text(markdown(result, "overload.png"))
    for name, ok in result["verdicts"]:
        print(f"{'ok ' if ok else 'NOT'} {name}")
    o = result["overload"]
    print(f"capacity {result['capacity']['rps']:.1f} rps; burst {o['statuses']}; 429 p99 "
          f"{o['rejection_p99_ms']:.1f} ms; recovery {result['recovery']['seconds']}")  # fmt: skip


if __name__ == "__main__":
    main()
