"""The shared benchmark harness: every benchmark is a thin script over this module, so that every figure
in docs/ was measured the same way (method: docs/BENCHMARKS.md, section 4). Runtimes with thread pools of
their own (torch, ONNX Runtime, OpenVINO) each run in a child process: in one process they steal cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = DOCS / "results"
MEMORIES = ROOT / "memories"
_K = TypeVar("_K", bound=Hashable)
_R = TypeVar("_R")
_P = TypeVar("_P", bound="Process")
_S = TypeVar("_S", bound="ServeProcess")


def environment(**extra: Any) -> dict[str, Any]:
    """Date, machine and software of a run; `extra` adds the benchmark's own settings."""
    versions = {}
    for name in ("torch", "transformers", "onnxruntime", "openvino", "adapters", "peft"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    return {
        "date": date.today().isoformat(),
        "platform": platform.platform(),
        "cpu": cpu or platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "packages": versions,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_start": list(os.getloadavg()),
        **extra,
    }


# ---------------------------------------------------------------------------------------- timing


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def seconds_per_call(call: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls


def calibrate(contenders: Mapping[str, Callable[[], object]], target_s: float) -> int:
    """Calls per timing so that one timing lasts about `target_s`, after a warm-up call of each."""
    for call in contenders.values():
        call()  # the first call at a shape allocates and picks kernels
    typical = statistics.median(seconds_per_call(call, 1) for call in contenders.values())
    return max(1, round(target_s / max(typical, 1e-9)))


def rotated_rounds(
    names: Sequence[_K],
    rounds: int,
    measure: Callable[[_K], _R],
    after_round: Callable[[int], None] | None = None,
) -> dict[_K, list[_R]]:
    """`measure(name)` of each contender per round, in an order that rotates; then `after_round(number)`."""
    per_round: dict[_K, list[_R]] = {name: [] for name in names}
    for number in range(rounds):
        shift = number % len(names)
        for name in [*names[shift:], *names[:shift]]:
            per_round[name].append(measure(name))
        if after_round is not None:
            after_round(number)
    return per_round


def alternate(
    contenders: Mapping[str, Callable[[], object]],
    *,
    rounds: int,
    items_per_call: int,
    target_s: float = 0.5,
    calls: int | None = None,
) -> dict[str, list[float]]:
    """Items/s of each contender per rotated round; a timing is `calls` calls (default: about `target_s`)."""
    calls = calls or calibrate(contenders, target_s)
    return rotated_rounds(
        list(contenders), rounds, lambda n: items_per_call / seconds_per_call(contenders[n], calls)
    )


def ratios(per_round: Mapping[str, Sequence[float]], base: str) -> dict[str, dict[str, float]]:
    """Each contender's figure over `base`'s, per round (same round = same machine state)."""
    return {
        name: spread([a / b for a, b in zip(values, per_round[base], strict=True)])
        for name, values in per_round.items()
        if name != base
    }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_child(command: Sequence[str], *, timeout_s: float, env: Mapping[str, str] | None = None) -> Any:
    """Run a benchmark child process; its last stdout line is its JSON result."""
    done = subprocess.run(
        list(command), capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
        env={**os.environ, **(env or {})}, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- reports


def parser(
    doc: str | None,
    out: Path = DOCS,
    name: str | None = None,
    rounds: int | None = None,
    threads: int | None = 2,
) -> Any:
    """--smoke and --out, and --name (the report's file name), --rounds, --threads unless None."""
    cli = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (the tests run it)")
    cli.add_argument("--out", type=Path, default=out, help=f"folder for the report (default {out})")
    if name is not None:
        cli.add_argument("--name", default=name, help=f"the report's file name (default {name})")
    if rounds is not None:
        cli.add_argument("--rounds", type=int, default=rounds)
    if threads is not None:
        cli.add_argument("--threads", type=int, default=threads, help="torch threads")
    return cli


def command_line(script: str, python: str = "python") -> str:
    """The command that reproduces this run, as written in reports."""
    return shlex.join([python, f"benchmarks/{script}", *sys.argv[1:]])


def write_report(out: Path, name: str, report: Mapping[str, Any], markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown)


def finish(
    out: Path,
    name: str,
    report: dict[str, Any],
    render: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], None] | None = None,
    smoke: bool = False,
) -> None:
    """`name`.json, .md (`render`) and .png (`plot`), `_smoke` in the names of a smoke run."""
    name = report["name"] = f"{name}_smoke" if smoke else name
    if "environment" in report:
        report["environment"]["load_average_end"] = list(os.getloadavg())
    out.mkdir(parents=True, exist_ok=True)
    if plot is not None:
        plot(report, out / f"{name}.png")
    write_report(out, name, report, render(report))
    print(f"wrote {out / name}.*", flush=True)


def header(report: Mapping[str, Any]) -> str:
    """The command and the machine of a run: the first paragraph of its report."""
    env = report["environment"]
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items())
    loads = [a[0] for a in (env.get("load_average_start"), env.get("load_average_end")) if a]
    busy = max(loads, default=0.0) > (env["cpu_count"] or 1)
    return (
        f"Command: `{report['command']}` ({env['date']}). Machine: {env['cpu']}, {env['cpu_count']} CPUs, "
        f"{env['platform']}; {packages}. Load average (1 min) {' -> '.join(f'{a:.1f}' for a in loads)}"
        + (": **other jobs oversubscribed the CPUs; times are inflated and noisy**." if busy else ".")
    )


def table(head: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def goal_table(verdicts: Sequence[tuple[str, bool]]) -> list[str]:
    """Goals as a `| goal | met |` table, each also printed for the console."""
    for name, ok in verdicts:
        print(f"{'ok ' if ok else 'NOT'} {name}")
    return table(("goal", "met"), [(name, "yes" if ok else "**no**") for name, ok in verdicts])


def fmt_spread(entry: Mapping[str, float] | None, digits: int = 1) -> str:
    """`median [min, max]`; — for none."""
    if entry is None:
        return "—"
    return f"{entry['median']:.{digits}f} [{entry['min']:.{digits}f}, {entry['max']:.{digits}f}]"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (none if it does not exist yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only), in the reports' style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False})
    return plt


def save_figure(fig: Any, path: Path, dpi: int = 120) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


# ---------------------------------------------------------------------------------------- inputs, models

SENTENCES = [
    "a gripping, beautifully acted film",
    "dull, predictable and far too long",
    "The plot is thin but the performances carry it from start to finish.",
    "an unexpected delight",
    "Nothing works here: not the jokes, not the pacing, not the ending.",
    "It is the kind of movie you forget before you reach the parking lot.",
    "warm, funny and surprisingly wise about families and the lies they tell",
    "ok",
]
SENTENCE = "the film was a surprisingly moving portrait of grief and hope told with wit and restraint"
WORDS = SENTENCE.split(" ")


def texts_of_length(words: int, count: int) -> list[str]:
    """`count` different texts of `words` words."""
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(words)) for i in range(count)]


def fixed_length_batch(tokenizer: Any, batch: int, length: int) -> dict[str, Any]:
    """`batch` different texts of exactly `length` tokens (no padding: the memories' worst case)."""
    texts = texts_of_length(length, batch)
    return dict(
        tokenizer(texts, truncation=True, max_length=length, padding="max_length", return_tensors="pt")
    )


def encoder(precision: str = "fp32", name: str = "all-MiniLM-L6-v2", runtime: str = "torch") -> Any:
    """The service's encoder on a fresh backbone as `SPARTAN_RUNTIME=runtime` serves it, in one stream."""
    import torch

    from app.engine.serving import serving_encoder
    from app.settings import Settings

    threads = torch.get_num_threads()
    settings = Settings(
        backbone=name, precision=precision, runtime=runtime, torch_threads=threads, engine_streams=1
    )
    return serving_encoder(settings)


def shipped_memories(encoder: Any) -> dict[str, Any]:
    """memories/*.safetensors by task name, loaded against `encoder`'s backbone."""
    from app.spartan.memfile import load_memory_file

    return {p.stem: load_memory_file(p, encoder.identity()) for p in sorted(MEMORIES.glob("*.safetensors"))}


def fresh_memory(
    encoder: Any, spec: Any = None, seed: int = 0, noise: float = 0.0, layernorms: bool = True
) -> Any:
    """A new memory in eval mode: `spec`'s shape or `spartan train`'s default, the backbone's LayerNorms
    (the task's own unless `layernorms` is off), then N(0, `noise`) added to every parameter."""
    import torch

    from app.spartan.memory import MemorySpec, TaskMemory

    backbone = encoder.backbone
    spec = spec or MemorySpec(
        num_layers=backbone.num_layers, hidden_size=backbone.hidden_size, pooling=backbone.pooling,
        backbone_id=backbone.name, backbone_fingerprint=backbone.fingerprint,
        layernorm_names=tuple(encoder.layernorm_names) if layernorms else (),
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        memory = TaskMemory(spec)
    memory.init_layernorms(encoder.base_layernorms())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in memory.parameters() if noise else ():
            param.add_(torch.randn(param.shape, generator=generator) * noise)
    return memory.eval()


def int8_backbone(root: Any, scheme: str, names: Sequence[str] | None = None) -> dict[str, Any]:
    """torch's int8 dynamic quantisation, in place, with "per-tensor" or "per-channel" weight scales, of
    the backbone Linears `names` in `root` (default: all its plain Linears). A peer's own modules stay
    float32: PEFT's LoRA wrapper gets its base_layer quantised; an `adapters` LoRALinear with no LoRA in
    it becomes a plain Linear first; anything else is skipped and listed."""
    import warnings

    import torch
    from torch import nn
    from torch.ao.nn.quantized import dynamic as nnqd
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    names = names or [name for name, module in root.named_modules() if type(module) is nn.Linear]
    qconfig = {"per-tensor": default_dynamic_qconfig, "per-channel": per_channel_dynamic_qconfig}[scheme]
    targets, how, skipped = [], {}, {}
    for name in names:
        module = root.get_submodule(name)
        # `adapters` wraps every Linear in a LoRALinear; with bottleneck adapters only, it holds no LoRA
        empty_lora = type(module).__module__.startswith("adapters.") and not getattr(module, "loras", True)
        if type(module) is nn.Linear:
            target, kind = name, "plain Linear"
        elif type(getattr(module, "base_layer", None)) is nn.Linear:
            target, kind = f"{name}.base_layer", "PEFT base_layer (LoRA A/B stay float32)"
        elif isinstance(module, nn.Linear) and empty_lora and not getattr(module, "fan_in_fan_out", False):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.weight, plain.bias = module.weight, module.bias
            parent, _, attr = name.rpartition(".")
            setattr(root.get_submodule(parent) if parent else root, attr, plain)
            target, kind = name, "adapters LoRALinear without LoRA -> plain Linear"
        else:
            skipped[name] = type(module).__name__
            continue
        targets.append(target)
        how[kind] = how.get(kind, 0) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        quantize_dynamic(root, qconfig_spec=dict.fromkeys(targets, qconfig), dtype=torch.qint8, inplace=True)
    return {
        "backbone_linears": len(names), "scheme": scheme, "how": how, "skipped": skipped,
        "quantized": sum(isinstance(m, nnqd.Linear) for m in root.modules()),
        "backbone_float_linears_left": sum(type(m) is nn.Linear for m in root.modules()),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.1) -> float:
    """Seconds until `check()` held; AssertionError naming `what` if it never did."""
    import httpx

    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        with contextlib.suppress(httpx.TransportError, OSError):
            if check():
                return time.monotonic() - started
        time.sleep(every_s)
    raise AssertionError(f"{what}: not within {timeout_s} s")


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


class Process:
    """A child process with its output in `log`, started in `cwd`."""

    def __init__(
        self, command: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> None:
        self.command, self.log, self.env, self.cwd = command, log, env, cwd
        self.process: Any = None  # a subprocess.Popen once started

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_alive(self) -> None:
        if not self.alive:
            code = self.process.returncode if self.process else None
            raise AssertionError(f"{self.command[0]} exited ({code}):\n{tail(self.log)}")

    def send(self, sig: int) -> None:
        if self.alive:
            self.process.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        return int(self.process.wait(timeout_s))

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> None:
        if self.alive:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def __enter__(self: _P) -> _P:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServeProcess(Process):
    """`python -m app.cli serve` of the checkout at `root` (this one, or another build for an A/B run) on
    its own loopback port; `args` are further flags, `env` SPARTAN_* settings."""

    def __init__(
        self, log: Path, args: Sequence[str] = (), env: Mapping[str, str] | None = None, root: Path = ROOT
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = root
        settings = {"PYTHONPATH": str(root), "SPARTAN_HOST": "127.0.0.1", "SPARTAN_PORT": str(self.port)}
        command = [sys.executable, "-m", "app.cli", "serve", *args]
        super().__init__(command, log, {**os.environ, **settings, **(env or {})}, cwd=root)

    def start_ready(self: _S, timeout_s: float = 180) -> _S:
        self.start()
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 180) -> None:
        import httpx

        def ready() -> bool:
            self.check_alive()
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200

        wait_until(ready, timeout_s, f"server at {self.url} ({self.root}) ready")


def serve_store(
    store: Path,
    *,
    batch_size: int = 32,
    threads: int = 1,
    env: Mapping[str, str] | None = None,
    root: Path = ROOT,
    wait: bool = True,
) -> ServeProcess:
    """Every benchmark's server (so an A/B run starts both builds alike): the checkout at `root` over
    the memories in `store`, max wait 5 ms, open writes, its log beside `store`; ready unless not `wait`."""
    flags = [
        "--memory-dir", str(store), "--max-batch-size", str(batch_size), "--max-wait-ms",
        "5" if batch_size > 1 else "0", "--threads", str(threads), "--allow-unauthenticated-writes",
        "--log-level", "warning",
    ]  # fmt: skip
    settings = {"SPARTAN_STORE_POLL_INTERVAL_S": "0", "SPARTAN_MAX_QUEUE_ROWS": "4096", **(env or {})}
    server = ServeProcess(store.parent / f"server-{free_port()}.log", flags, settings, root)
    server.start()
    if wait:
        server.wait_ready()
    return server


def shipped_store(folder: Path) -> Path:
    """A copy of memories/ in `folder`: a benchmark's writes never touch the shipped files."""
    return Path(shutil.copytree(MEMORIES, folder / "memories"))


# ---------------------------------------------------------------------------------------- training jobs


def training_rows(cache_dir: Path, count: int = 200, seed: int = 1) -> list[dict[str, Any]]:
    """`count` labelled rows of the movie dataset (a few-shot sample): the data of a training job."""
    from app.training.datasets import few_shot, load_named

    data = few_shot(load_named("movie", cache_dir), count, seed=seed)
    return [{"text": ex.text, "label": ex.label} for ex in data.train]


def start_training_job(
    url: str, rows: Sequence[Mapping[str, Any]], *, admin_key: str | None = None,
    task: str = "bench-training", running_within_s: float = 180, **options: Any,
) -> str:  # fmt: skip
    """Submit a training job (`options`: epochs=1000 keeps it training through any window; cancel it
    afterwards) and return its id once its worker steps."""
    from app.client import Client

    with Client(url, admin_key=admin_key) as client:
        job = client.submit_job(task, rows, replace=True, **options)

        def training() -> bool:
            found = client.get_job(job.id)
            if found.finished:
                raise AssertionError(f"training job {job.id} ended before the window: {found.error}")
            return found.state == "running" and found.progress.step > 0

        wait_until(training, running_within_s, f"training job {job.id} training", every_s=0.25)
    return job.id


def stop_training_job(url: str, job_id: str, *, admin_key: str | None = None) -> dict[str, Any]:
    """Cancel the job (if it still runs) and return its record, as JSON."""
    from app.client import Client, JobFinished

    with Client(url, admin_key=admin_key) as client:
        with contextlib.suppress(JobFinished):  # it ended by itself: nothing to cancel
            client.cancel_job(job_id)
        return client.get_job(job_id).model_dump(mode="json")


def served_runtime(url: str) -> str:
    """What runs a server's passes, from its `spartan_build_info` (older builds: no label)."""
    import httpx

    found = re.search(r'spartan_build_info\{[^}]*runtime="([^"]+)"', httpx.get(f"{url}/metrics").text)
    return found.group(1) if found else "unlabelled (torch, before the graph)"


# ---------------------------------------------------------------------------------------- /proc, peak memory


def proc_status(pid: int | str = "self") -> dict[str, str]:
    """/proc/PID/status as field -> value text (Linux)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in lines if ":" in line}


def status_mib(field_name: str, pid: int | str = "self") -> float:
    """A /proc/PID/status memory field (VmRSS, VmHWM, ...) in MiB; NaN where unavailable."""
    value = proc_status(pid).get(field_name)
    return int(value.split()[0]) / 1024 if value else float("nan")


def rss_bytes(pid: int) -> int:
    return int(status_mib("VmRSS", pid) * 1024 * 1024)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_idle_fraction(seconds: float = 2.0) -> float:
    """Share of the machine's CPU time that was idle over a short span (other jobs show here)."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(1, total1 - total0)


# A peak-memory child runs with this: glibc then maps every buffer of 64 KiB or more on its own and
# hands it back to the OS when freed, so each measurement starts from a true baseline.
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def reset_peak() -> bool:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return abs(status_mib("VmHWM") - status_mib("VmRSS")) < 1.0


def peak_mib(call: Callable[[], object]) -> float | None:
    """Working memory of one `call()` (VmHWM during it minus VmRSS before); None if VmHWM won't reset."""
    if not reset_peak():
        return None
    before = status_mib("VmRSS")
    call()
    return max(0.0, status_mib("VmHWM") - before)


# ---------------------------------------------------------------------------------------- load over HTTP


def metric_values(url: str, names: Iterable[str]) -> dict[str, float]:
    """The samples called `names` in the server's /metrics (summed over their labels)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name in values:
                values[sample.name] += sample.value
    return values


async def closed_loop(
    url: str, clients: int, seconds: float, send: Callable[[Any, int, int], Awaitable[Any]]
) -> list[tuple[float, float, Any]]:
    """(sent, answered, outcome) in monotonic seconds of every request of `clients` clients, each sending
    its next (`send(client, k, n)`: client k's n-th, on its httpx.AsyncClient) once answered, for `seconds`.
    A connection per client: a shared pool costs httpx ms of CPU per request, taken from the server."""
    import httpx

    records: list[tuple[float, float, Any]] = []
    end = time.monotonic() + seconds

    async def client_loop(k: int) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
            number = 0
            while time.monotonic() < end:
                sent = time.monotonic()
                outcome = await send(client, k, number)
                records.append((sent, time.monotonic(), outcome))
                number += 1

    await asyncio.gather(*(client_loop(k) for k in range(clients)))
    return records
