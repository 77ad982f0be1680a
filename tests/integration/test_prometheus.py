"""A real Prometheus (Debian's package) scrapes a real `spartan serve` process with the project's own
alert rules loaded and the deployed job's Bearer metrics key, and PromQL gives the p99 latency the
dashboard and the alerts rely on."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from procs import ROOT, Process, Replica, free_port, wait_until

pytestmark = [pytest.mark.model, pytest.mark.slow]

METRICS_KEY = f"metrics-{uuid.uuid4().hex}"
P99 = "histogram_quantile(0.99, sum by (le, task) (rate(spartan_request_duration_seconds_bucket[20s])))"


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    workdir = tmp_path_factory.mktemp("prometheus-replica")
    shutil.copytree(ROOT / "memories", workdir / "memories")
    env = {
        "SPARTAN_MEMORY_DIR": str(workdir / "memories"),
        "SPARTAN_STORE_POLL_INTERVAL_S": "0",
        "SPARTAN_METRICS_API_KEY": METRICS_KEY,  # as deployed: /metrics needs the key
    }
    running = Replica("scraped", env, workdir).start_ready()
    yield running
    running.stop()


def prometheus_config(target: str, rules: Path, key_file: Path) -> dict[str, Any]:
    """The deployed scrape job (deploy/prometheus/prometheus.yml), pointed at the loopback replica,
    its key read from `key_file` (compose mounts it as a secret), and scraping every second so that
    the test does not wait for the production interval."""
    deployed = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    job = next(job for job in deployed["scrape_configs"] if job["job_name"] == "spartan")
    assert job["authorization"]["type"] == "Bearer"
    authorization = {**job["authorization"], "credentials_file": str(key_file)}
    job = {**job, "scrape_interval": "1s", "scrape_timeout": "1s", "static_configs": [{"targets": [target]}],
           "authorization": authorization}  # fmt: skip
    return {"global": {"evaluation_interval": "1s"}, "rule_files": [str(rules)], "scrape_configs": [job]}


def query(url: str, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    assert response.status_code == 200, response.text
    return list(response.json()["data"]["result"])


def test_prometheus_scrapes_the_service_and_promql_gives_the_p99_latency(
    replica: Replica, tmp_path: Path
) -> None:
    prometheus_bin = shutil.which("prometheus")
    assert prometheus_bin, "prometheus is missing: `make test` installs Debian's package (make system-deps)"
    config = tmp_path / "prometheus.yml"
    rules = ROOT / "deploy" / "prometheus" / "alerts.yml"
    key_file = tmp_path / "metrics_key"
    key_file.write_text(METRICS_KEY)
    config.write_text(yaml.safe_dump(prometheus_config(f"127.0.0.1:{replica.port}", rules, key_file)))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    prometheus = Process(
        [
            prometheus_bin,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        tmp_path / "prometheus.log",
    )
    prometheus.start()
    try:
        wait_until(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 60, "prometheus ready")
        wait_until(lambda: [r["value"][1] for r in query(url, 'up{job="spartan"}')] == ["1"], 30,
                   "the replica scraped and up")  # fmt: skip
        deadline = time.monotonic() + 60
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not result:
            for text in ("a wonderful film", "dull and far too long"):
                response = httpx.post(f"{replica.url}/v1/tasks/sentiment/predict", json={"inputs": [text]})
                assert response.status_code == 200
            result = [r for r in query(url, P99) if r["metric"].get("task") == "sentiment"
                      and r["value"][1] not in ("NaN", "+Inf")]  # fmt: skip
            time.sleep(0.5)
        assert result, f"no p99 latency from PromQL within 60 s:\n{prometheus.log.read_text()[-2000:]}"
        p99 = float(result[0]["value"][1])
        assert 0 < p99 < 30, p99  # seconds: a real latency, inside the request timeout

        groups = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        alerts = {rule["name"] for group in groups for rule in group["rules"] if rule["type"] == "alerting"}
        assert {"SpartanReplicaDown", "SpartanQueueSaturated", "SpartanHighP99Latency"} <= alerts
        health = {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}
        wait_until(
            lambda: all(h == "ok" for h in _rule_health(url).values()), 20, f"rules evaluate: {health}"
        )
    finally:
        prometheus.stop()


def _rule_health(url: str) -> dict[str, str]:
    groups = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    return {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}
