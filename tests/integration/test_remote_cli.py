"""`spartan tasks ...` and `spartan predict ...` against a real `spartan serve` process (tiny backbone):
through typer's CliRunner, and once as a real subprocess. Exit codes: 0 ok, 1 refused (4xx), 2 usage,
3 unreachable or 5xx."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from client_services import ADMIN_KEY, PREDICT_KEY, Service, service_fixture  # noqa: F401  (the fixture)
from procs import ROOT
from typer.testing import CliRunner

from app.cli import cli

KEYS = {"SPARTAN_ADMIN_API_KEY": ADMIN_KEY, "SPARTAN_PREDICT_API_KEY": PREDICT_KEY}


@pytest.fixture
def run(service: Service, monkeypatch: pytest.MonkeyPatch):
    def invoke(*args: str, stdin: str | None = None, env: dict[str, str] | None = None):
        for name in KEYS:
            monkeypatch.delenv(name, raising=False)
        return CliRunner().invoke(
            cli, list(args), input=stdin, env={"SPARTAN_URL": service.url, **(env or KEYS)}
        )

    return invoke


def test_tasks_list_show_and_routing(run, service: Service) -> None:
    listed = run("tasks", "list")
    assert listed.exit_code == 0, listed.output
    assert listed.output.splitlines()[0].split()[:3] == ["TASK", "STATUS", "TYPE"]
    assert {"sentiment", "pairs"} <= {line.split()[0] for line in listed.output.splitlines()[1:-1]}
    as_json = json.loads(run("tasks", "list", "--json").output)
    assert {"sentiment", "pairs"} <= {t["name"] for t in as_json["tasks"]}

    shown = json.loads(run("tasks", "show", "sentiment", "--json").output)
    assert shown["labels"] == ["negative", "positive"]
    table = run("tasks", "show", "sentiment").output
    assert ["version", shown["version"]] in [line.split() for line in table.splitlines()]

    assert run("predict", "sentiment", "the film was good").exit_code == 0
    routing = json.loads(run("tasks", "routing", "sentiment", "--json").output)
    assert routing["rows"] >= 1
    assert len(routing["layers"]) == 2
    people = run("tasks", "routing", "sentiment").output
    assert people.splitlines()[1].split()[0] == "LAYER"


def test_upload_replace_and_delete(run, service: Service, tmp_path: Path) -> None:
    memory = tmp_path / "m.safetensors"
    memory.write_bytes(service.other)
    created = run("tasks", "upload", "cli-task", str(memory), "--json")
    assert created.exit_code == 0, created.output
    version = json.loads(created.output)["task"]["version"]
    assert json.loads(created.output)["created"] is True

    newer = tmp_path / "newer.safetensors"
    newer.write_bytes(service.sentiment)
    conflict = run("tasks", "upload", "cli-task", str(newer))  # another file, no --replace
    assert conflict.exit_code == 1
    assert "409 memory_conflict" in conflict.output
    replaced = run("tasks", "upload", "cli-task", str(newer), "--if-match", version)
    assert replaced.exit_code == 0, replaced.output
    assert replaced.output.startswith("replaced cli-task: version ")
    assert version not in replaced.output

    without_key = run("tasks", "delete", "cli-task", env={"SPARTAN_PREDICT_API_KEY": PREDICT_KEY})
    assert without_key.exit_code == 1
    assert "401 authentication_required" in without_key.output
    assert run("tasks", "delete", "cli-task").output.strip() == "deleted cli-task"
    gone = run("tasks", "show", "cli-task")
    assert gone.exit_code == 1
    assert "404 task_not_found" in gone.output


def test_predict_from_arguments_a_file_and_stdin(run, tmp_path: Path) -> None:
    texts = ["the film was good", "what a dull film", "an unexpected delight"]
    by_args = run("predict", "sentiment", *texts, "--all-scores")
    assert by_args.exit_code == 0, by_args.output
    lines = [json.loads(line) for line in by_args.output.splitlines()]
    assert [line["input"] for line in lines] == texts
    assert all(set(line["scores"]) == {"negative", "positive"} for line in lines)

    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(texts) + "\n")
    by_file = run("predict", "sentiment", "--file", str(inputs), "--batch-size", "2")  # two requests
    by_stdin = run("predict", "sentiment", stdin="\n".join(texts))
    labels = [line["label"] for line in lines]
    assert [json.loads(line)["label"] for line in by_file.output.splitlines()] == labels
    assert [json.loads(line)["label"] for line in by_stdin.output.splitlines()] == labels

    pairs = run("predict", "pairs", "--pairs", stdin="how do i reset my card\ti forgot my pin\n")
    assert pairs.exit_code == 0, pairs.output
    assert json.loads(pairs.output)["input"] == ["how do i reset my card", "i forgot my pin"]


@pytest.mark.parametrize(
    ("args", "stdin", "code", "says"),
    [
        (["predict", "nope", "x"], None, 1, "404 task_not_found"),
        (["predict", "sentiment", "x" * 10_001], None, 1, "422 invalid_input"),
        (["predict", "sentiment"], "", 2, "no inputs"),
        (["predict", "sentiment", "a", "--file", "f.txt"], None, 2, "not both"),
        (["predict", "pairs", "--pairs"], "no tab here\n", 2, "no tab"),
        (["tasks", "upload", "t", "/nonexistent/m.safetensors"], None, 2, "cannot read"),
        (["tasks", "frobnicate"], None, 2, "No such command"),
    ],
)
def test_exit_codes(run, args: list[str], stdin: str | None, code: int, says: str) -> None:
    done = run(*args, stdin=stdin)
    assert done.exit_code == code, done.output
    assert says in done.output


def test_unreachable_is_exit_3() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening: refused
        done = CliRunner().invoke(cli, ["tasks", "list", "--url", url])
    assert done.exit_code == 3
    assert "service unreachable" in done.output


def test_a_real_subprocess(service: Service) -> None:
    env = {**os.environ, **KEYS, "SPARTAN_URL": service.url}
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "predict", "sentiment", "the film was good"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout)
    assert line["input"] == "the film was good"
    assert line["label"] in {"negative", "positive"}
    refused = subprocess.run(
        [sys.executable, "-m", "app.cli", "tasks", "show", "nope"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "404 task_not_found" in refused.stderr
