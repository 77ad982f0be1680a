"""The service's page in a real headless Chromium against a real `spartan serve`: it lists the
shipped tasks, a prediction made through the page gives the API's label, and the routing heatmaps
render."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from procs import Replica

pytestmark = [pytest.mark.model, pytest.mark.slow]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is missing: `make system-deps` installs it (Debian package chromium)")
    return found


def dump_dom(url: str) -> str:
    """The page's DOM after its scripts ran (virtual time lets its fetches finish first)."""
    command = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
               "--dump-dom", url]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def service(repo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("ui")
    store = workdir / "memories"
    shutil.copytree(repo_root / "memories", store, ignore=shutil.ignore_patterns(".*"))
    env = {"SPARTAN_MEMORY_DIR": str(store), "SPARTAN_STORE_POLL_INTERVAL_S": "0"}
    replica = Replica("ui", env, workdir).start_ready()
    yield replica
    replica.stop()


def test_the_page_lists_tasks_predicts_like_the_api_and_draws_routing(service: Replica) -> None:
    text = "my card has not arrived yet"
    api = httpx.post(f"{service.url}/v1/tasks/banking77/predict", json={"inputs": [text]}, timeout=30)
    assert api.status_code == 200, api.text
    expected = api.json()["predictions"][0]["label"]

    dom = dump_dom(f"{service.url}/ui?task=banking77&text={quote(text)}")
    assert 'data-ready="true"' in dom, dom[-2000:]
    assert set(re.findall(r'data-task="([^"]+)"', dom)) == {"banking77", "bbc-news", "sentiment"}
    shown = re.search(r'id="prediction-label">([^<]*)<', dom)
    assert shown is not None, dom[-3000:]
    assert shown.group(1) == expected
    heatmaps = re.findall(r'<svg class="heatmap"', dom)
    assert len(heatmaps) == 6  # one per MiniLM layer
    assert len(re.findall(r"<rect ", dom)) >= 6 * 16  # at least one label row of 16 parents per layer


def test_the_page_and_its_script_come_from_the_service(service: Replica) -> None:
    page = httpx.get(f"{service.url}/ui", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/ui/app.js">' in page.text
    assert "http" not in re.sub(r"http://www\.w3\.org/\S+", "", page.text)  # nothing from elsewhere
    script = httpx.get(f"{service.url}/ui/app.js", timeout=10)
    assert script.status_code == 200
    assert "innerHTML" not in script.text  # data is written as text, never parsed as HTML
    assert httpx.get(f"{service.url}/", timeout=10, follow_redirects=False).headers["location"] == "/ui"
