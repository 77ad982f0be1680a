"""`spartan train` and `spartan eval` end to end on the real MiniLM backbone, on small handmade files."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.spartan.memfile import load_memory_file

POSITIVE = ["great", "wonderful", "brilliant", "moving", "delightful", "superb", "funny", "charming"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "tedious", "clumsy", "lifeless", "painful"]


def sentiment_rows(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = "pos" if i % 2 else "neg"
        word = rng.choice(POSITIVE if label == "pos" else NEGATIVE)
        rows.append((f"the film was {word} and the acting was {rng.choice(['', 'very '])}{word}", label))
    return rows


def write_csv(path, rows) -> None:
    path.write_text("text,label\n" + "".join(f'"{t}",{label}\n' for t, label in rows))


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str) -> str:
    result = runner.invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout  # stderr has what was read from each file


@pytest.mark.model
@pytest.mark.slow
def test_train_writes_memory_and_report_and_eval_rescores_it(runner, tmp_path, cache_dir):
    write_csv(tmp_path / "train.csv", sentiment_rows(48, 1))
    write_csv(tmp_path / "dev.csv", sentiment_rows(16, 2))
    write_csv(tmp_path / "test.csv", sentiment_rows(16, 3))
    memory_path = tmp_path / "toy.safetensors"
    files = ["--train-file", str(tmp_path / "train.csv"), "--dev-file", str(tmp_path / "dev.csv")]
    files += ["--test-file", str(tmp_path / "test.csv")]
    output = invoke(
        runner, "train", *files, "-o", str(memory_path), "--epochs", "2", "--lr", "3e-3",
        "--batch-size", "8", "--max-length", "32", "--cache-dir", str(cache_dir), "--quiet",
    )  # fmt: skip
    assert "best epoch" in output
    report = json.loads((tmp_path / "toy.json").read_text())
    assert report["train_examples"] == 48
    assert len(report["epochs"]) == 2
    assert all(e["seconds"] > 0 for e in report["epochs"])
    assert report["trainable_parameters"] > 200_000
    assert report["memory_bytes"] == memory_path.stat().st_size
    assert report["test"]["accuracy"] >= 0.9  # the toy task is trivially separable
    memory = load_memory_file(memory_path)
    assert memory.spec.labels == ("neg", "pos")
    assert memory.spec.max_length == 32
    assert memory.spec.training["dataset"] == tmp_path.name  # a file named train.* takes its folder name
    scored = json.loads(invoke(runner, "eval", str(memory_path), *files, "--cache-dir", str(cache_dir)))
    assert scored["examples"] == 16
    assert scored["file"] == str(tmp_path / "test.csv")
    assert scored["accuracy"] == pytest.approx(report["test"]["accuracy"])
    assert scored["macro_f1"] == pytest.approx(report["test"]["macro_f1"])


@pytest.mark.model
@pytest.mark.slow
def test_train_on_a_glue_pair_regression_folder(runner, tmp_path, cache_dir):
    folder = tmp_path / "STS-B"
    folder.mkdir()
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rng = random.Random(0)
    lines = []
    for i in range(40):
        a = rng.choice(POSITIVE + NEGATIVE)
        same = i % 2 == 0
        b = a if same else rng.choice(POSITIVE + NEGATIVE)
        lines.append(f"{i}\tmain\tf\t2012\t{i}\ts\ts\ta {a} movie\ta {b} movie\t{5.0 if same else 1.0}\n")
    (folder / "train.tsv").write_text(header + "".join(lines[:30]))
    (folder / "dev.tsv").write_text(header + "".join(lines[30:]))
    memory_path = tmp_path / "stsb.safetensors"
    invoke(
        runner, "train", "--glue", str(folder), "-o", str(memory_path), "--epochs", "1", "--batch-size", "8",
        "--max-length", "32", "--cache-dir", str(cache_dir), "--quiet",
    )  # fmt: skip
    memory = load_memory_file(memory_path)
    assert memory.spec.task_type == "regression"
    assert memory.spec.text_pairs
    report = json.loads((tmp_path / "stsb.json").read_text())
    assert {"pearson", "spearman", "mse"} <= report["test"].keys()


def test_train_refuses_two_data_sources(runner, tmp_path):
    result = runner.invoke(
        cli, ["train", "--dataset", "movie", "--glue", str(tmp_path), "-o", "x.safetensors"]
    )
    assert result.exit_code != 0
    assert "exactly one of" in result.output


def test_eval_reports_a_corrupt_memory_file_cleanly(runner, tmp_path, cache_dir):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 10)
    write_csv(tmp_path / "t.csv", sentiment_rows(8, 0))
    result = runner.invoke(
        cli, ["eval", str(bad), "--train-file", str(tmp_path / "t.csv"), "--cache-dir", str(cache_dir)]
    )
    assert result.exit_code == 2
    assert "error:" in result.output
    assert "Traceback" not in result.output
