"""The shared benchmark harness: environment, alternating rounds, spread, child processes, reports.

Every benchmark is a thin script over this module, so that every figure in docs/ was measured the same
way: contenders alternate inside each round (machine noise hits them alike), ratios are taken per
round, and every figure comes with its spread over rounds and the machine it ran on. Runtimes that
bring their own thread pools (torch, ONNX Runtime, OpenVINO) each run in a child process of their
own: in one process their pools steal each other's cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def package_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return platform.processor()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


def environment(**extra: Any) -> dict[str, Any]:
    """Date, machine and software of a run; `extra` adds the benchmark's own settings."""
    packages = ("torch", "transformers", "onnxruntime", "openvino", "adapters", "peft")
    return {
        "date": date.today().isoformat(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "packages": {name: v for name in packages if (v := package_version(name)) is not None},
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        **extra,
    }


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max over rounds, and how many rounds."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
    }


def seconds_per_call(call: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls


def calibrate(contenders: Mapping[str, Callable[[], object]], target_s: float) -> int:
    """Warm every contender up (first calls at a shape allocate and pick kernels), then pick the number
    of calls per timing so that one timing lasts about `target_s` (the same for every contender)."""
    for call in contenders.values():
        call()
    typical = statistics.median(seconds_per_call(call, 1) for call in contenders.values())
    return max(1, round(target_s / max(typical, 1e-9)))


def alternate(
    contenders: Mapping[str, Callable[[], object]],
    *,
    rounds: int,
    items_per_call: int,
    target_s: float = 0.5,
) -> dict[str, list[float]]:
    """Throughput (items/s) of each contender per round; inside a round, the contenders take turns,
    and the order rotates from round to round so that none always runs first."""
    calls = calibrate(contenders, target_s)
    names = list(contenders)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    for number in range(rounds):
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            per_round[name].append(items_per_call / seconds_per_call(contenders[name], calls))
    return per_round


def ratios(per_round: Mapping[str, Sequence[float]], base: str) -> dict[str, dict[str, float]]:
    """Each contender's throughput over `base`'s, per round (same round = same machine state)."""
    return {
        name: spread([a / b for a, b in zip(values, per_round[base], strict=True)])
        for name, values in per_round.items()
        if name != base
    }


def run_child(command: Sequence[str], *, timeout_s: float, env: Mapping[str, str] | None = None) -> Any:
    """Run a benchmark child process; its last stdout line is its JSON result."""
    done = subprocess.run(
        list(command),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def command_line(script: str) -> str:
    """The command that reproduces this run, as written in reports."""
    return " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]])


def write_report(out: Path, name: str, report: Mapping[str, Any], markdown: str) -> None:
    """`name`.json (every number) and `name`.md (the tables) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)


def fmt_spread(entry: Mapping[str, float], digits: int = 1) -> str:
    """`median [min, max]`."""
    return f"{entry['median']:.{digits}f} [{entry['min']:.{digits}f}, {entry['max']:.{digits}f}]"


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`th percentile (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def load_warning(cpus: int | None, load: float, text: str) -> list[str]:
    """`text` as a bold markdown warning (and a blank line) when the load average exceeded the CPUs."""
    return [f"**Warning: {text}**", ""] if load > (cpus or 1) else []


# ---------------------------------------------------------------------------------------- records


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines results file (none if it does not exist yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------- plots


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display), in the reports' style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False})
    return plt


def save_figure(fig: Any, path: Path, dpi: int = 120) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)


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
        try:
            if check():
                return time.monotonic() - started
        except (httpx.TransportError, OSError):
            pass
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
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_alive(self) -> None:
        if not self.alive:
            code = self.process.returncode if self.process else None
            raise AssertionError(f"{self.command[0]} exited ({code}):\n{tail(self.log)}")

    def send(self, sig: int) -> None:
        if self.alive:
            assert self.process is not None
            self.process.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout_s)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> None:
        if not self.alive:
            return
        assert self.process is not None
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)


_Serve = TypeVar("_Serve", bound="ServeProcess")


class ServeProcess(Process):
    """`python -m app.cli serve` of the checkout at `root` (this one by default, or another build for an
    A/B run) on its own loopback port; `args` are further command-line flags, `env` SPARTAN_* settings."""

    def __init__(
        self,
        log: Path,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        root: Path = ROOT,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = root
        settings = {
            "PYTHONPATH": str(root),
            "SPARTAN_HOST": "127.0.0.1",
            "SPARTAN_PORT": str(self.port),
            **(env or {}),
        }
        command = [sys.executable, "-m", "app.cli", "serve", *args]
        super().__init__(command, log, {**os.environ, **settings}, cwd=root)

    def start_ready(self: _Serve, timeout_s: float = 180) -> _Serve:
        self.start()
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 180) -> None:
        import httpx

        def ready() -> bool:
            self.check_alive()
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200

        wait_until(ready, timeout_s, f"server at {self.url} ({self.root}) ready")

    def __enter__(self: _Serve) -> _Serve:
        return self.start_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
    """Submit a training job to the service at `url` and return its id once it trains (its worker
    process stepping): what a serving-under-training measurement starts before its window. Options
    are the job's (epochs=1000 keeps it training through any window; cancel it afterwards)."""
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


# ---------------------------------------------------------------------------------------- /proc


def proc_status(pid: int | str = "self") -> dict[str, str]:
    """/proc/PID/status as field -> value text (Linux)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in lines if ":" in line}


def rss_bytes(pid: int) -> int:
    return int(proc_status(pid)["VmRSS"].split()[0]) * 1024


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
