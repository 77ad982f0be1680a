"""Load benchmark of the service: `spartan serve` under closed-loop single-input requests over 16 tasks
(Zipf and uniform popularity; the load generator is this script with --loadgen), beside in-process
contenders, a naive max-batch-1 server, upload-to-first-prediction and the RSS of 1,000 resident tasks.
Method: docs/BENCHMARKS.md, "Service load".

    python benchmarks/bench_service_load.py               # full run, ~4 minutes on 2 cores
    python benchmarks/bench_service_load.py --smoke --out /tmp/bench   # seconds; run by the tests
    python benchmarks/bench_service_load.py --baseline-root DIR --ab-rounds 3   # also against DIR's build
    python benchmarks/bench_service_load.py --under-training   # idle vs while a training job trains
    python benchmarks/bench_service_load.py --infinity   # against infinity-emb (make infinity-env)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness, peer_infinity

NUM_TASKS = 16
TASKS = [f"task{index:02d}" for index in range(NUM_TASKS)]
BATCH_METRICS = ("spartan_batch_size_sum", "spartan_batch_size_count", "spartan_batch_tasks_sum")
FIGURES = ("throughput_rps", "p50_ms", "p99_ms")
INFINITY_VARIANTS: dict[str, dict[str, Any]] = {
    "infinity torch fp32": {"engine": "torch"},
    "infinity torch bf16": {"engine": "torch", "dtype": "bfloat16"},
    "infinity onnx": {"engine": "optimum"},
    "infinity onnx optimised": {"engine": "optimum", "optimize": True},
}
INPROCESS = {
    "bare": "in-process bare backbone (a)",
    "memories": "in-process, mixed memories",
    "bucketed": "in-process, shipped Batcher (mixed memories)",
    "single_row": "in-process, memories, one row at a time",
}


@dataclass(frozen=True)
class Config:
    duration_s: float = 20.0
    warmup_s: float = 4.0
    concurrency: int = 64
    batch_size: int = 32
    max_wait_ms: float = 5.0
    threads: int = 1
    naive_duration_s: float = 15.0
    upload_trials: int = 7
    rss_tasks: int = 1000
    rss_warm_rows: int = 32  # rows of each warm-up request before the backbone-only RSS is read
    inprocess_batches: int = 24
    inprocess_rounds: int = 5
    inprocess_target_s: float = 0.5  # seconds per contender per round
    ab_rounds: int = 3
    server_threads: tuple[int, ...] = ()  # A/B, --infinity: each server at each (default: threads)
    peers: tuple[str, ...] = ()  # --infinity: these engines of INFINITY_VARIANTS only (default: all)

    @classmethod
    def smoke(cls, threads: int) -> Config:
        # Few clients and a window many latencies long: on a busy CI machine a request must still be
        # both sent and answered inside the window, or the percentiles have nothing to measure.
        return cls(
            duration_s=2.0, warmup_s=0.5, concurrency=4, naive_duration_s=1.0, upload_trials=2,
            rss_tasks=12, rss_warm_rows=2, inprocess_batches=2, inprocess_rounds=2, inprocess_target_s=0.05,
            threads=threads,
        )  # fmt: skip


def load_texts(cache_dir: Path) -> tuple[list[str], str]:
    try:
        from app.training.datasets import load_named

        return [ex.text for ex in load_named("movie", cache_dir).test], "movie snippets (test split)"
    except Exception:  # the corpus is a convenience; the benchmark runs on the harness's sentences too
        return harness.SENTENCES * 16, "built-in sentences (movie dataset not fetched)"


async def measure_window(job: dict[str, Any]) -> dict[str, Any]:
    """A closed loop of single-input requests; throughput and latency over the window after the warm-up,
    and the mean rows and tasks per forward pass in it (from the server's batch histograms)."""
    url, warmup, duration = job["url"], job["warmup"], job["duration"]
    texts, rng = json.loads(Path(job["texts"]).read_text()), random.Random(7)
    weights = [1 / rank if job["popularity"] == "zipf" else 1.0 for rank in range(1, NUM_TASKS + 1)]
    peer = job.get("target") == "infinity"  # one classifier behind infinity-emb's /classify

    async def send(client: httpx.AsyncClient, _k: int, _n: int) -> int:
        task, text = rng.choices(TASKS, weights)[0], rng.choice(texts)  # the same draws for every target
        if peer:
            return (await client.post("/classify", json=peer_infinity.classify_body([text]))).status_code
        return (await client.post(f"/v1/tasks/{task}/predict", json={"inputs": [text]})).status_code

    def batch_metrics() -> dict[str, float]:
        return dict.fromkeys(BATCH_METRICS, 0.0) if peer else harness.metric_values(url, BATCH_METRICS)

    async def metrics_at_window_start() -> dict[str, float]:
        await asyncio.sleep(warmup)
        return await asyncio.to_thread(batch_metrics)

    start = time.monotonic()
    window = (start + warmup, start + warmup + duration)
    load = harness.closed_loop(url, job["concurrency"], warmup + duration, send)
    records, before = await asyncio.gather(load, metrics_at_window_start())
    rows, passes, tasks = (value - before[name] for name, value in batch_metrics().items())
    # Throughput: answers completed in the window. Latency: requests sent and answered in the window
    # (a request sent during the warm-up would carry its cold-start wait into the percentiles).
    in_window = [r for r in records if window[0] <= r[1] <= window[1]]
    latencies = [done - sent for sent, done, status in in_window if status == 200 and sent >= window[0]]
    statuses = Counter(status for _, _, status in in_window)
    return {
        "throughput_rps": statuses[200] / duration,
        "p50_ms": harness.percentile(latencies, 50) * 1000,
        "p99_ms": harness.percentile(latencies, 99) * 1000,
        "requests": sum(statuses.values()),
        "statuses": {str(k): v for k, v in statuses.items()},
        "mean_rows_per_pass": rows / passes if passes else 0.0,
        "mean_tasks_per_pass": tasks / passes if passes else 0.0,
        "concurrency": job["concurrency"],
        "window_s": duration,
    }


def run_loadgen(
    server: harness.Process, popularity: str, texts: Path, config: Config, seconds: float, target: str = ""
) -> Any:
    """The load generator in its own process, so that it shares no GIL with anything; the CPU seconds of
    the server and of the load generator over the run."""
    job = {"url": server.url, "popularity": popularity, "texts": str(texts), "warmup": config.warmup_s,
           "concurrency": config.concurrency, "duration": seconds, "target": target}  # fmt: skip
    server_cpu, loadgen_cpu = harness.cpu_seconds(server.pid), children_cpu_seconds()
    command = [sys.executable, __file__, "--loadgen", json.dumps(job)]
    result: dict[str, Any] = harness.run_child(command, timeout_s=600)
    result["popularity"] = popularity
    result["server_runtime"] = target or harness.served_runtime(server.url)
    result["server_cpu_s"] = harness.cpu_seconds(server.pid) - server_cpu
    result["loadgen_cpu_s"] = children_cpu_seconds() - loadgen_cpu
    return result


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def window_rounds(names: Iterable[str], rounds: int, window: Callable[[str], Any]) -> dict[str, Any]:
    """One Zipf window per name per round, in rotated order; each name's figures over rounds."""
    runs = harness.rotated_rounds(list(names), rounds, window)
    figures = {n: {k: harness.spread([r[k] for r in rs]) for k in FIGURES} for n, rs in runs.items()}
    return {"rounds": rounds, "runs": runs, "figures": figures}


def per_round_ratio(runs: dict[str, list[dict[str, Any]]], key: str, top: str, bottom: str) -> Any:
    return harness.spread([a[key] / b[key] for a, b in zip(runs[top], runs[bottom], strict=True)])


def with_threads(name: str, threads: int, server_threads: Iterable[int]) -> str:
    """A server's name, with its thread count where several are compared."""
    return f"{name} t{threads}" if len(tuple(server_threads)) > 1 else name


def best_of(result: dict[str, Any], prefixes: Iterable[str]) -> str:
    """The server (any of `prefixes`, at any thread count) with the highest median rows/s."""
    names = [n for n in result["figures"] for p in prefixes if n == p or n.startswith(f"{p} t")]
    return max(names, key=lambda n: result["figures"][n]["throughput_rps"]["median"])


def figures_table(column: str, figures: dict[str, dict[str, Any]]) -> list[str]:
    fmt = harness.fmt_spread
    rows = [
        (n, fmt(f["throughput_rps"]), fmt(f["p50_ms"], 0), fmt(f["p99_ms"], 0)) for n, f in figures.items()
    ]
    return harness.table((column, "rows/s", "p50 ms", "p99 ms"), rows)


def inprocess_throughput(
    encoder: Any, memories: list[Any], texts: list[str], config: Config
) -> dict[str, Any]:
    """Rows/s of the same batches, each row with one of the memories, through four contenders."""
    import torch

    from app.engine.batcher import Batcher, BatchingConfig
    from app.engine.encoder import RowGroup
    from app.engine.runner import EncoderRunner, Row
    from app.settings import Settings

    rng = random.Random(3)
    batches = [rng.sample(texts, config.batch_size) for _ in range(config.inprocess_batches)]
    # Each batch's rows with their memories, drawn once: every contender gets the same work.
    work = [[(memories[rng.randrange(len(memories))], text) for text in batch] for batch in batches]
    runner = EncoderRunner(encoder)
    serving = replace(
        BatchingConfig.from_settings(Settings()), max_batch_size=config.batch_size,
        max_wait_s=config.max_wait_ms / 1000, max_queue_rows=4 * config.batch_size,
        max_queue_work_s=600.0, request_timeout_s=601.0,
    )  # fmt: skip
    batcher = Batcher(runner, serving)

    def bare(rows: list[tuple[Any, str]]) -> None:
        encoding = encoder.encode([text for _, text in rows], None, 128)
        with torch.inference_mode():
            encoder.forward(encoding, [RowGroup(None, torch.arange(len(rows)))])

    def mixed(rows: list[tuple[Any, str]]) -> None:
        runner.run(runner.prepare([Row(memory, text) for memory, text in rows]))

    def batched(rows: list[tuple[Any, str]]) -> None:  # a full batch is taken without waiting
        for request in [batcher.enqueue(f"t{id(m)}", m, [(text, None)]) for m, text in rows]:
            request.future.result()

    def one_by_one(rows: list[tuple[Any, str]]) -> None:  # the ceiling of batching: each row alone
        for memory, text in rows:
            runner.run(runner.prepare([Row(memory, text)]))

    def cycling(run: Callable[[list[tuple[Any, str]]], None]) -> Callable[[], None]:
        batch = itertools.cycle(work)
        return lambda: run(next(batch))

    contenders = {"bare": bare, "memories": mixed, "bucketed": batched, "single_row": one_by_one}
    batcher.start()
    try:
        per_round = harness.alternate(
            {name: cycling(run) for name, run in contenders.items()}, rounds=config.inprocess_rounds,
            items_per_call=config.batch_size, target_s=config.inprocess_target_s,
        )  # fmt: skip
    finally:
        batcher.stop()
    result: dict[str, Any] = {f"{name}_rows_per_s": statistics.median(v) for name, v in per_round.items()}
    result["spread"] = {name: harness.spread(values) for name, values in per_round.items()}
    result["vs_bare"] = harness.ratios(per_round, "bare")
    return result


def upload_to_first_prediction(server: harness.ServeProcess, encoder: Any, trials: int) -> dict[str, Any]:
    from app.spartan.memfile import memory_to_bytes

    def idle() -> bool:
        return not harness.metric_values(server.url, ["spartan_queue_depth"])["spartan_queue_depth"]

    # Let the last requests of a load run drain: the upload is timed on an idle server.
    harness.wait_until(idle, 60, "an idle queue")
    time.sleep(1.0)
    seconds = []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for trial in range(trials):
            data = memory_to_bytes(harness.fresh_memory(encoder, seed=1000 + trial, noise=0.05))
            started = time.perf_counter()
            put = client.put(f"/v1/tasks/fresh{trial}/memory", content=data)
            answer = client.post(f"/v1/tasks/fresh{trial}/predict", json={"inputs": ["is this live yet?"]})
            seconds.append(time.perf_counter() - started)
            assert put.status_code == 201, put.text
            assert answer.status_code == 200, answer.text
            assert answer.json()["version"] == put.json()["version"]
    return {"median_ms": statistics.median(seconds) * 1000, "max_ms": max(seconds) * 1000, "trials": trials}


def rss_with_many_tasks(workdir: Path, encoder: Any, config: Config) -> dict[str, Any]:
    """A server with `rss_tasks` registered tasks (hard links of one file; each load is separate), every
    one made resident; its RSS against the backbone-only RSS plus the resident memories' bytes."""
    from app.spartan.memfile import save_memory

    names, store = [f"t{index:04d}" for index in range(config.rss_tasks)], workdir / "many"
    save_memory(harness.fresh_memory(encoder, seed=99, noise=0.05), store / f"{names[0]}.safetensors")
    for name in names[1:]:
        os.link(store / f"{names[0]}.safetensors", store / f"{name}.safetensors")
    capacity = {
        "SPARTAN_MAX_LOADED_MEMORIES": f"{config.rss_tasks + 10}",
        "SPARTAN_MAX_LOADED_BYTES": f"{1 << 40}",
    }
    with harness.serve_store(
        store, batch_size=config.batch_size, threads=config.threads, env=capacity
    ) as server:
        client = httpx.Client(base_url=server.url, timeout=120)
        # Full batches of long texts on every stream first: the backbone-only RSS then holds the
        # engine's whole working set, not just the memories'.
        long_batch = {"inputs": [" ".join(["warm up the forward pass"] * 40)] * config.rss_warm_rows}
        asyncio.run(predict_all(server.url, [names[0]] * 12, long_batch, clients=4))
        backbone_rss = harness.rss_bytes(server.pid) - client.get("/v1/tasks").json()["loaded_bytes"]
        started = time.perf_counter()
        asyncio.run(predict_all(server.url, names, {"inputs": ["hello"]}, clients=8))
        touch_seconds, listing = time.perf_counter() - started, client.get("/v1/tasks").json()
        rss, resident = harness.rss_bytes(server.pid), listing["loaded_bytes"]
    return {
        "registered": len(listing["tasks"]), "resident": listing["loaded"], "resident_bytes": resident,
        "backbone_rss_bytes": backbone_rss, "rss_bytes": rss, "budget_bytes": backbone_rss + 1.2 * resident,
        "overhead_ratio": (rss - backbone_rss) / resident if resident else float("nan"),
        "touch_all_seconds": touch_seconds,
    }  # fmt: skip


async def predict_all(url: str, tasks: list[str], body: dict[str, Any], clients: int) -> None:
    """`clients` clients at once post `body` to each task of `tasks` in turn, until none is left."""
    queue = list(tasks)

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            while queue:
                (await client.post(f"/v1/tasks/{queue.pop()}/predict", json=body)).raise_for_status()

    await asyncio.gather(*(worker() for _ in range(clients)))


def against_baseline(store: Path, texts: Path, config: Config, baseline_root: Path) -> dict[str, Any]:
    """The Zipf load against this build's server and one started from `baseline_root` (the same flags),
    both alive side by side: one window each per round, in rotated order."""
    roots = {"current": harness.ROOT, "baseline": baseline_root.resolve()}
    with contextlib.ExitStack() as stack:
        servers = {
            with_threads(name, threads, config.server_threads): stack.enter_context(harness.serve_store(
                store, batch_size=config.batch_size, threads=threads, root=root, wait=False
            ))
            for name, root in roots.items()
            for threads in config.server_threads
        }  # fmt: skip
        for server in servers.values():  # started together, all ready before the first window
            server.wait_ready()
        result = window_rounds(servers, config.ab_rounds, lambda n: zipf_window(servers[n], texts, config))
    commits = {f"{name}_commit": git_commit(root) for name, root in roots.items()}
    best = {name: best_of(result, [name]) for name in roots}  # each build at its best thread count
    ratio = per_round_ratio(result["runs"], "throughput_rps", best["current"], best["baseline"])
    head = {"baseline_root": str(roots["baseline"]), **commits}
    return {**head, **result, "best": best, "throughput_ratio": ratio}


def zipf_window(server: harness.Process, texts: Path, config: Config, target: str = "") -> Any:
    return run_loadgen(server, "zipf", texts, config, config.duration_s, target)


def git_commit(root: Path) -> str | None:
    command = ["git", "-C", str(root), "rev-parse", "--short", "HEAD"]
    return subprocess.run(command, capture_output=True, text=True).stdout.strip() or None


def against_infinity(store: Path, texts: Path, config: Config) -> dict[str, Any]:
    """The Zipf load on this service (16 tasks) and the same requests to infinity-emb serving ONE
    classifier of the same backbone, on each of its CPU engines; the same threads and batch size, all
    servers alive side by side, one window each per round, in rotated order."""
    model_dir = peer_infinity.prepare_classifier()
    peers = [n for n in INFINITY_VARIANTS if not config.peers or n in config.peers]
    with contextlib.ExitStack() as stack:
        servers: dict[str, Any] = {}
        for threads in config.server_threads:
            name = with_threads("spartan", threads, config.server_threads)
            servers[name] = stack.enter_context(
                harness.serve_store(store, batch_size=config.batch_size, threads=threads)
            )
            for peer in peers:
                servers[with_threads(peer, threads, config.server_threads)] = stack.enter_context(
                    peer_infinity.start_infinity(
                        model_dir, threads=threads, batch_size=config.batch_size, **INFINITY_VARIANTS[peer]
                    )
                )

        def window(name: str) -> Any:
            return zipf_window(servers[name], texts, config, "" if name.startswith("spartan") else "infinity")

        result = window_rounds(servers, config.ab_rounds, window)
    best, spartan = best_of(result, peers), best_of(result, ["spartan"])
    ratio = per_round_ratio(result["runs"], "throughput_rps", spartan, best)
    return {**result, "best_spartan": spartan, "best_peer": best, "spartan_over_best_peer": ratio}


def under_training(store: Path, texts: Path, config: Config, cache_dir: Path) -> dict[str, Any]:
    """The Zipf load on one server, idle and while a training job trains (started through the API
    before its window, cancelled after it), one window each per round, in rotated order."""
    rows, jobs = harness.training_rows(cache_dir), []
    with harness.serve_store(store, batch_size=config.batch_size, threads=config.threads) as server:

        def window(condition: str) -> Any:
            if condition == "idle":
                return zipf_window(server, texts, config)
            job = harness.start_training_job(server.url, rows, epochs=1000)
            try:
                return zipf_window(server, texts, config)
            finally:
                jobs.append(harness.stop_training_job(server.url, job))

        result = window_rounds(["idle", "training"], config.ab_rounds, window)
    speed = [job["progress"]["examples_per_s"] or 0.0 for job in jobs]
    p99 = per_round_ratio(result["runs"], "p99_ms", "training", "idle")
    return {**result, "p99_ratio": p99, "job_examples_per_s": speed}


def run_intro(results: dict[str, Any]) -> str:
    env, cfg = results["environment"], results["config"]
    return (
        f"`{results['command']}` ({env['date']}, {env['cpu']}, {env['cpu_count']} CPUs). "
        f"{cfg['concurrency']} closed-loop clients, single-text requests; "
        f"{'/'.join(str(t) for t in cfg.get('server_threads') or [cfg['threads']])} thread(s) (`tN` in a "
        f"name: started with N) and batch {cfg['batch_size']} for every server"
    )


def infinity_markdown(results: dict[str, Any]) -> str:
    peers = results["infinity"]
    return "\n".join([
        "# spartan-serve (16 tasks) against infinity-emb (one classifier)", "",
        f"{run_intro(results)}; spartan-serve serves 16 tasks with Zipf popularity, infinity-emb 0.0.78 one "
        "MiniLM classifier (`/classify`, the same texts); all servers alive side by side, "
        f"{peers['rounds']} rounds of one window each, rotated. Median [min, max].", "",
        *figures_table("server", peers["figures"]), "",
        f"spartan-serve ({peers.get('best_spartan', 'spartan')}) / the best infinity engine "
        f"({peers['best_peer']}), per round: "
        f"{harness.fmt_spread(peers['spartan_over_best_peer'], 2)}.", "",
    ])  # fmt: skip


def under_training_markdown(results: dict[str, Any]) -> str:
    u = results["under_training"]
    return "\n".join([
        "# Serving while a training job trains", "",
        f"{run_intro(results)}; 16 tasks, Zipf; {u['rounds']} rounds of one window idle and one while a job "
        "(200 movie examples, the default recipe, its own process with `SPARTAN_TRAINING_THREADS` and "
        "`SPARTAN_TRAINING_NICE` at their defaults) trains, rotated. Median [min, max] over rounds.", "",
        *figures_table("condition", u["figures"]), "",
        f"p99 training / idle, per round: {harness.fmt_spread(u['p99_ratio'], 2)}; the jobs trained at "
        f"{', '.join(f'{v:.1f}' for v in u['job_examples_per_s'])} examples/s.", "",
    ])  # fmt: skip


def goals(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    service, bare = results["service"]["zipf"]["throughput_rps"], results["inprocess"]["bare_rows_per_s"]
    naive, upload, rss = results["naive"]["throughput_rps"], results["upload"]["median_ms"], results["rss"]
    memory = (
        f"{rss['rss_bytes'] / 2**20:.0f} MiB vs {rss['budget_bytes'] / 2**20:.0f} MiB "
        f"(memories cost {rss['overhead_ratio']:.2f} x their bytes)"
    )
    return [
        (">= 0.9 x in-process bare backbone (Zipf)", f"{service / bare:.2f} x", service >= 0.9 * bare),
        (">= 5 x naive one-at-a-time server", f"{service / naive:.1f} x", service >= 5 * naive),
        ("upload-to-first-prediction <= 100 ms (median)", f"{upload:.0f} ms", upload <= 100),
        ("RSS <= backbone + 1.2 x resident memories", memory, rss["rss_bytes"] <= rss["budget_bytes"]),
    ]


def bars(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every configuration's figures: the in-process ones (rows/s only), then the servers."""
    rows = {
        label: {"throughput_rps": results["inprocess"][f"{key}_rows_per_s"]}
        for key, label in INPROCESS.items()
    }
    rows.update({f"service, {kind}": results["service"][kind.lower()] for kind in ("Zipf", "uniform")})
    return {**rows, "naive server (b)": results["naive"]}


def plot(results: dict[str, Any], path: Path) -> None:
    plt, figures, cfg = harness.pyplot(), bars(results), results["config"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 2]})
    labels = [name.replace(", ", ",\n").replace(" (", "\n(") for name in figures]
    colors = ["#999", "#bbb", "#ccc", "#ddd", "#1f77b4", "#4a90d9", "#d62728"]
    left.bar(labels, [f["throughput_rps"] for f in figures.values()], color=colors)
    left.set(ylabel="rows (requests) per second", title=f"Throughput, batch {cfg['batch_size']}, 16 tasks")
    left.tick_params(axis="x", labelsize=7)
    served = list(figures.items())[len(INPROCESS) :]
    for shift, key in ((-0.2, "p50_ms"), (0.2, "p99_ms")):
        right.bar(
            [i + shift for i in range(len(served))], [f[key] for _, f in served], width=0.4, label=key[:3]
        )
    right.set_xticks(range(len(served)), [name for name, _ in served])
    right.set(ylabel="latency (ms)", title=f"Latency at {cfg['concurrency']} concurrent clients")
    right.legend()
    harness.save_figure(fig, path, dpi=120)


def load_row(name: str, run: dict[str, Any], warmup_s: float) -> tuple[str, ...]:
    """A configuration's row of the main table; in-process ones have rows/s only."""
    if "p50_ms" not in run:
        return (name, f"{run['throughput_rps']:.1f}", "-", "-", "-", "-")
    answered = run["throughput_rps"] * (warmup_s + run["window_s"])  # CPU covers warm-up too
    cpu = "— (no answers)"
    if answered > 0:
        cpu = f"{1000 * run['server_cpu_s'] / answered:.1f} / {1000 * run['loadgen_cpu_s'] / answered:.1f}"
    passes = f"{run['mean_rows_per_pass']:.1f} rows, {run['mean_tasks_per_pass']:.1f} tasks"
    return (name, f"{run['throughput_rps']:.1f}", f"{run['p50_ms']:.0f}", f"{run['p99_ms']:.0f}", passes, cpu)


def markdown(results: dict[str, Any]) -> str:
    cfg, env, upload, rss = results["config"], results["environment"], results["upload"], results["rss"]
    mib = {
        k: f"{rss[k] / 2**20:.0f}"
        for k in ("resident_bytes", "rss_bytes", "backbone_rss_bytes", "budget_bytes")
    }
    gain = results["inprocess"]["bucketed_rows_per_s"] / results["inprocess"]["single_row_rows_per_s"]
    head = ("configuration", "rows/s", "p50 ms", "p99 ms", "mean per forward pass",
            "CPU ms/request: server / load gen.")  # fmt: skip
    lines = [
        "# Service load benchmark",
        "",
        f"{harness.header(results)} The CPUs were {100 * env['idle_before_start']:.0f}% idle just before it "
        f"started; {cfg['threads']} engine thread(s) in the server and in-process; the server's passes ran "
        f"on `{results['service']['zipf'].get('server_runtime', '?')}` (its spartan_build_info).",
        "",
        f"Backbone {env['backbone']}; {NUM_TASKS} task memories of `spartan train`'s shape (E=16, C=3, k=8, "
        f"own LayerNorms), random weights. One text per request, from {env['corpus']}. Closed loop: "
        f"{cfg['concurrency']} clients (async httpx, a separate process), {cfg['warmup_s']:g} s warm-up, "
        f"{cfg['duration_s']:g} s measured ({cfg['naive_duration_s']:g} s for the naive server). Server: max "
        f"batch {cfg['batch_size']}, max wait {cfg['max_wait_ms']:g} ms, one uvicorn worker. In-process "
        f"contenders: medians of {cfg['inprocess_rounds']} rotated rounds.",
        "",
        "![throughput and latency](service_load.png)",
        "",
        *harness.table(head, [load_row(name, run, cfg["warmup_s"]) for name, run in bars(results).items()]),
        "",
        "## Goals",
        "",
        *harness.table(
            ("goal", "measured", ""), [(g, v, "met" if ok else "NOT met") for g, v, ok in goals(results)]
        ),
        "",
        "## Upload and memory",
        "",
        f"- Upload-to-first-prediction (PUT a new 1.7 MB memory, then one prediction with it, idle server): "
        f"median {upload['median_ms']:.0f} ms, max {upload['max_ms']:.0f} ms over {upload['trials']} trials.",
        f"- {rss['registered']} registered tasks, {rss['resident']} resident ({mib['resident_bytes']} MiB of "
        f"parameters and caches): RSS {mib['rss_bytes']} MiB; backbone-only RSS (the engine warmed by full "
        f"batches on every stream, one task's bytes subtracted) {mib['backbone_rss_bytes']} MiB; budget "
        "backbone + 1.2 x resident = "
        f"{mib['budget_bytes']} MiB. Loading all of them on first use took {rss['touch_all_seconds']:.1f} s.",
        "",
        "## Reading the numbers",
        "",
        "- bare backbone -> mixed memories (the same batches through the service's runner): what the "
        "memories cost. Shipped Batcher -> service: what serving costs (HTTP, JSON, queueing, the load "
        "generator on the same CPUs). The service can beat the bare loop, which pads every batch to its "
        "longest text.",
        f"- One row at a time is the ceiling of a server that does not batch: batching gains {gain:.1f}x "
        "in-process here, so no server can be 5x a one-at-a-time server on this CPU (the goal assumes an "
        "accelerator). The service runs are minutes apart; only the A/B section alternates round by round.",
    ]
    return "\n".join(lines + ab_section(results.get("ab"))) + "\n"


def ab_section(ab: dict[str, Any] | None) -> list[str]:
    if ab is None:
        return []

    def label(name: str) -> str:  # the build's commit and what ran its passes
        commit = ab[f"{name.split()[0]}_commit"] or "?"
        return f"{name} ({commit}, {ab['runs'][name][0].get('server_runtime', '?')})"

    builds = {label(name): figures for name, figures in ab["figures"].items()}
    return [
        "",
        "## Against the baseline build",
        "",
        f"The same Zipf load against this build and the build at `{ab['baseline_root']}`, both servers "
        f"started with the same flags, alive side by side; {ab['rounds']} rounds of one window per "
        "server, in rotated order. Median [min, max] over rounds.",
        "",
        *figures_table("build", builds),
        "",
        f"Throughput current / baseline (each at its best thread count: {' / '.join(ab['best'].values())}), "
        f"per round: {harness.fmt_spread(ab['throughput_ratio'], 2)}.",
    ]


def run(args: Any) -> dict[str, Any]:
    import torch

    from app.settings import Settings
    from app.spartan.memfile import save_memory

    threads = args.threads or max(1, (os.cpu_count() or 2) - 1)
    config = replace(
        Config.smoke(threads) if args.smoke else Config(threads=threads), ab_rounds=args.ab_rounds,
        server_threads=tuple(args.server_threads or [threads]), peers=tuple(args.peers or ()),
    )  # fmt: skip
    torch.set_num_threads(config.threads)
    served = Settings()  # the in-process contenders run what the service serves (precision, runtime)
    encoder = harness.encoder(served.precision, name=served.backbone, runtime=served.runtime)
    texts, corpus = load_texts(served.cache_dir)
    env = harness.environment(backbone=encoder.backbone.name, corpus=corpus, threads=config.threads)
    env["idle_before_start"] = harness.cpu_idle_fraction(0.5 if args.smoke else 2.0)
    results: dict[str, Any] = {"config": asdict(config), "environment": env}
    results["command"] = harness.command_line("bench_service_load.py")
    with tempfile.TemporaryDirectory(prefix="spartan-bench-") as tmp:
        workdir = Path(tmp)
        store, texts_file = workdir / "memories", workdir / "texts.json"
        memories = [harness.fresh_memory(encoder, seed=seed, noise=0.05) for seed in range(NUM_TASKS)]
        for task, memory in zip(TASKS, memories, strict=True):
            save_memory(memory, store / f"{task}.safetensors")
        texts_file.write_text(json.dumps(texts))
        if args.infinity:
            print("against infinity-emb ...", flush=True)
            results["infinity"] = against_infinity(store, texts_file, config)
        elif args.under_training:
            print("serving idle and under a training job ...", flush=True)
            results["under_training"] = under_training(store, texts_file, config, served.cache_dir)
        else:
            print("in-process baselines ...", flush=True)
            results["inprocess"] = inprocess_throughput(encoder, memories, texts, config)
            with harness.serve_store(store, batch_size=config.batch_size, threads=config.threads) as server:
                results["service"] = {}
                for popularity in ("zipf", "uniform"):
                    print(f"service, {popularity} ...", flush=True)
                    results["service"][popularity] = run_loadgen(
                        server, popularity, texts_file, config, config.duration_s
                    )
                print("upload to first prediction ...", flush=True)
                results["upload"] = upload_to_first_prediction(server, encoder, config.upload_trials)
            print("naive server (max batch 1) ...", flush=True)
            with harness.serve_store(store, batch_size=1, threads=config.threads) as naive:
                results["naive"] = run_loadgen(naive, "uniform", texts_file, config, config.naive_duration_s)
            print(f"RSS with {config.rss_tasks} tasks ...", flush=True)
            results["rss"] = rss_with_many_tasks(workdir, encoder, config)
            if args.baseline_root is not None:
                print(f"against the baseline build at {args.baseline_root} ...", flush=True)
                results["ab"] = against_baseline(store, texts_file, config, args.baseline_root)
    return results


def main() -> None:
    cli = harness.parser(__doc__, threads=None)
    cli.add_argument("--loadgen", help="(internal) a load generator process for this JSON job")
    cli.add_argument("--threads", type=int, help="torch threads (default: CPUs - 1)")
    ab = "A/B: also the Zipf load against the server of the checkout in DIR (a worktree of an older commit)"
    cli.add_argument("--baseline-root", type=Path, help=ab)
    rounds = "rounds of the A/B, --under-training, --infinity"
    cli.add_argument("--ab-rounds", type=int, default=3, help=rounds)
    job = "only the Zipf load idle and under a training job (service_under_training.*)"
    cli.add_argument("--under-training", action="store_true", help=job)
    peer = "only the Zipf load against infinity-emb's engines (service_vs_infinity.*; make infinity-env)"
    cli.add_argument("--infinity", action="store_true", help=peer)
    each = "A/B and --infinity: start every server once per thread count given (default: --threads)"
    cli.add_argument("--server-threads", type=int, nargs="+", help=each)
    only = "--infinity: only these engines (names as in the report, e.g. 'infinity torch bf16')"
    cli.add_argument("--peers", nargs="+", choices=sorted(INFINITY_VARIANTS), help=only)
    args = cli.parse_args()
    if args.loadgen:
        print(json.dumps(asyncio.run(measure_window(json.loads(args.loadgen)))))
        return
    results = run(args)
    if args.infinity:
        harness.write_report(args.out, "service_vs_infinity", results, infinity_markdown(results))
    elif args.under_training:
        harness.write_report(args.out, "service_under_training", results, under_training_markdown(results))
    else:
        results["environment"]["load_average_end"] = list(os.getloadavg())
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "service_load.json").write_text(json.dumps(results, indent=2) + "\n")
        plot(results, args.out / "service_load.png")
        (args.out / "SERVICE_BENCHMARKS.md").write_text(markdown(results))
        for goal, value, ok in goals(results):
            print(f"{'met    ' if ok else 'NOT met'}  {goal}: {value}")


if __name__ == "__main__":
    main()
