"""Secrets never reach the logs or /metrics of a real process; task names cannot leave the store;
keys are compared in constant time."""

from __future__ import annotations

import asyncio
import hmac
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from procs import ROOT, Replica

pytestmark = pytest.mark.model

ADMIN_KEY = f"admin-{uuid.uuid4().hex}"
PREDICT_KEY = f"predict-{uuid.uuid4().hex}"
METRICS_KEY = f"metrics-{uuid.uuid4().hex}"


@pytest.mark.slow
def test_secrets_never_appear_in_logs_or_metrics(seaweed: Any, tmp_path: Path) -> None:
    s3_secret = seaweed.SECRET_KEY
    env = {
        **seaweed.settings_env(seaweed.bucket, f"secrets-{uuid.uuid4().hex[:8]}/"),
        "SPARTAN_ADMIN_API_KEY": ADMIN_KEY,
        "SPARTAN_PREDICT_API_KEY": PREDICT_KEY,
        "SPARTAN_METRICS_API_KEY": METRICS_KEY,
        "SPARTAN_LOG_LEVEL": "debug",  # the most the service ever logs
        "SPARTAN_STORE_POLL_INTERVAL_S": "0.2",
    }
    replica = Replica("secrets", env, tmp_path).start_ready()
    try:
        url = replica.url
        memory = (ROOT / "memories" / "sentiment.safetensors").read_bytes()
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        for headers in (
            {},
            {"Authorization": "Bearer wrong-key-0123456789"},
            {"Authorization": f"Bearer {PREDICT_KEY}"},
        ):
            assert httpx.put(f"{url}/v1/tasks/t/memory", content=memory, headers=headers).status_code == 401
        assert httpx.put(f"{url}/v1/tasks/t/memory", content=memory, headers=admin).status_code == 201
        assert httpx.put(f"{url}/v1/tasks/bad/memory", content=b"junk", headers=admin).status_code == 422
        reader = {"Authorization": f"Bearer {PREDICT_KEY}"}
        assert (
            httpx.post(f"{url}/v1/tasks/t/predict", json={"inputs": ["fine"]}, headers=reader).status_code
            == 200
        )
        assert httpx.post(f"{url}/v1/tasks/t/predict", json={"inputs": ["fine"]}).status_code == 401
        assert httpx.get(f"{url}/metrics").status_code == 401
        scraped = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
        assert scraped.status_code == 200
        metrics = scraped.text
        assert "spartan_requests_total" in metrics  # the exposition is really there
    finally:
        replica.stop()
    log = replica.log.read_text()
    assert "Application startup complete" in log  # the log is really there
    for secret in (ADMIN_KEY, PREDICT_KEY, METRICS_KEY, s3_secret):
        assert secret not in log, "a secret was logged"
        assert secret not in metrics, "a secret is in /metrics"


@pytest.mark.parametrize(
    "name",
    ["..", "../etc", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "a%2Fb", "a%00b", "-rf", ".hidden", "a.b",
     "x" * 65, "%C3%A9t%C3%A9", "a%5Cb"],
)  # fmt: skip
def test_task_names_cannot_escape_the_store(name: str, settings_for: Any, serve: Any, tmp_path: Path) -> None:
    settings = settings_for()
    memory = (ROOT / "memories" / "sentiment.safetensors").read_bytes()

    async def scenario() -> None:
        async with serve(settings) as (_, client):
            response = await client.put(f"/v1/tasks/{name}/memory", content=memory)
            assert response.status_code in (404, 422), response.text  # 404: the router saw a '/'
            assert response.json()["error"]["type"] in ("invalid_task_name", "not_found")

    asyncio.run(scenario())
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".safetensors"]
    assert written == [], written


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.security import HTTPAuthorizationCredentials
    from pydantic import SecretStr

    from app.api import deps

    calls: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest  # the real one: the spy below replaces the module attribute

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", spy)
    given = HTTPAuthorizationCredentials(scheme="Bearer", credentials="guess-0123456789")
    assert not deps._key_matches(given, SecretStr("right-0123456789"))
    assert calls == [(b"guess-0123456789", b"right-0123456789")]


@pytest.mark.slow
def test_keys_in_query_strings_never_reach_the_access_log(tmp_path: Path) -> None:
    memories = tmp_path / "memories"
    memories.mkdir()
    env = {
        "SPARTAN_MEMORY_DIR": str(memories),
        "SPARTAN_STORE_POLL_INTERVAL_S": "0",
        "SPARTAN_ADMIN_API_KEY": ADMIN_KEY,
        "SPARTAN_PREDICT_API_KEY": PREDICT_KEY,
    }
    replica = Replica("query-keys", env, tmp_path).start_ready()
    try:
        url = replica.url
        memory = (ROOT / "memories" / "sentiment.safetensors").read_bytes()
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        reader = {"Authorization": f"Bearer {PREDICT_KEY}"}
        # Refused: the key in the query string is not a way in.
        assert httpx.get(f"{url}/v1/tasks?api_key={PREDICT_KEY}").status_code == 401
        assert httpx.put(f"{url}/v1/tasks/t/memory?token={ADMIN_KEY}", content=memory).status_code == 401
        # Authenticated, with a key in the query string as well, and the API's own parameter.
        assert httpx.get(f"{url}/v1/tasks?access_token={PREDICT_KEY}", headers=reader).status_code == 200
        put = httpx.put(
            f"{url}/v1/tasks/t/memory?replace=true&key={ADMIN_KEY}", content=memory, headers=admin
        )
        assert put.status_code == 201
    finally:
        replica.stop()
    log = replica.log.read_text()
    for secret in (ADMIN_KEY, PREDICT_KEY):
        assert secret not in log, "a key sent in a query string was logged"
    assert '"GET /v1/tasks?api_key=[redacted] HTTP/1.1" 401' in log  # the access log is really there
    assert '"PUT /v1/tasks/t/memory?replace=true&key=[redacted] HTTP/1.1" 201' in log
