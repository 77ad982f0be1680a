"""`spartan train` and `spartan eval` on the user's own files, as a new user runs them: scoring a
file of one's own, per-example predictions, the few-shot recipe, label mismatches, suspicious CSVs.

Plumbing, so the tiny random backbone (built in the test session): the numbers do not matter, only
what is read, scored and written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from app.cli import cli
from app.spartan.memfile import load_memory_file

WORDS = {"pos": ["good", "fine", "great"], "neg": ["bad", "dull", "awful"]}


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("text,label\n" + "".join(f'"{text}",{label}\n' for text, label in rows))
    return path


def rows(count: int, offset: int = 0) -> list[tuple[str, str]]:
    labels = ["pos", "neg"]
    return [
        (f"it was {WORDS[labels[i % 2]][i % 3]} number {i + offset}", labels[i % 2]) for i in range(count)
    ]


def run(*args: str | Path, code: int = 0) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


@pytest.fixture
def common(tiny_backbone_dir: Path, cache_dir: Path) -> list[str]:
    return ["--backbone", str(tiny_backbone_dir), "--cache-dir", str(cache_dir)]


@pytest.fixture
def trained(tmp_path: Path, common: list[str]) -> Path:
    memory = tmp_path / "toy.safetensors"
    train = write_csv(tmp_path / "toy.csv", rows(40))
    run(
        "train",
        "--train-file",
        train,
        "-o",
        memory,
        "--epochs",
        "1",
        "--max-length",
        "16",
        "--quiet",
        *common,
    )
    return memory


def test_eval_scores_every_row_of_a_test_file_given_alone(tmp_path, trained, common) -> None:
    held_out = write_csv(tmp_path / "held_out.csv", rows(13, offset=100))
    scored = json.loads(run("eval", trained, "--test-file", held_out, *common).stdout)
    assert scored["examples"] == 13
    assert scored["file"] == str(held_out)
    assert scored["split"] == "test"
    assert scored["scored"] == f"every row of {held_out}"


def test_eval_on_the_training_file_says_it_scored_a_seeded_cut_of_it(tmp_path, trained, common) -> None:
    result = run("eval", trained, "--train-file", tmp_path / "toy.csv", *common)
    scored = json.loads(result.stdout)
    assert scored["examples"] == 4  # 10% of 40, not the file
    assert scored["file"] == str(tmp_path / "toy.csv")
    assert scored["scored"].startswith(
        f"a seeded test split cut from the training file {tmp_path / 'toy.csv'}"
    )
    assert "note: scored a seeded test split" in result.stderr


def test_eval_writes_one_prediction_line_per_scored_example(tmp_path, trained, common) -> None:
    held_out = write_csv(tmp_path / "held_out.csv", rows(11, offset=100))
    out = tmp_path / "predictions.jsonl"
    scored = json.loads(run("eval", trained, "--test-file", held_out, "--predictions", out, *common).stdout)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 11
    assert [(p["text"], p["label"]) for p in lines] == rows(11, offset=100)  # the file's order
    assert all(
        p["pair"] is None and p["predicted"] in ("neg", "pos") and 0.5 <= p["score"] <= 1 for p in lines
    )
    correct = sum(p["predicted"] == p["label"] for p in lines)
    assert scored["accuracy"] == pytest.approx(correct / 11, abs=1e-12)


def test_train_writes_the_test_predictions_of_the_kept_epoch(tmp_path, common) -> None:
    out = tmp_path / "predictions.jsonl"
    test = write_csv(tmp_path / "test.csv", rows(9, offset=50))
    run(
        "train", "--train-file", write_csv(tmp_path / "t.csv", rows(30)), "--test-file", test,
        "-o", tmp_path / "m.safetensors", "--epochs", "1", "--max-length", "16", "--quiet",
        "--predictions", out, *common,
    )  # fmt: skip
    report = json.loads((tmp_path / "m.json").read_text())
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 9
    correct = sum(p["predicted"] == p["label"] for p in lines)
    assert report["test"]["accuracy"] == pytest.approx(correct / 9, abs=1e-12)


def test_few_shot_uses_the_few_shot_recipe_unless_told_otherwise(tmp_path, common) -> None:
    """--few-shot: lr 3e-3, 10 epochs, dev after epochs 5 and 10, the top half of the layers trained
    (on this 2-layer backbone: LayerNorm copies in layer 1, memories after layers 0 and 1, layer 0 run
    once per example); options override it; without --few-shot, the full-data defaults."""
    train = write_csv(tmp_path / "t.csv", rows(40))
    base = ["train", "--train-file", train, "--few-shot", "6", "--max-length", "16", "--quiet", *common]
    run(*base, "-o", tmp_path / "fs.safetensors")
    report = json.loads((tmp_path / "fs.json").read_text())
    config = report["config"]
    assert (config["lr"], config["epochs"], config["eval_every"]) == (3e-3, 10, 5)
    assert (config["memory_layers"], config["layernorm_layers"]) == (2, 1)
    assert [bool(epoch["dev"]) for epoch in report["epochs"]] == [False] * 4 + [True] + [False] * 4 + [True]
    assert report["cached_bytes"] > 0  # layer 0's output, computed once
    spec = load_memory_file(tmp_path / "fs.safetensors").spec
    assert spec.first_memory_layer == 0
    assert spec.layernorm_names
    assert all(name.startswith("encoder.layer.1.") for name in spec.layernorm_names)
    run(*base, "--lr", "1e-4", "--epochs", "2", "--memory-layers", "1", "-o", tmp_path / "mine.safetensors")
    config = json.loads((tmp_path / "mine.json").read_text())["config"]
    assert (config["lr"], config["epochs"]) == (1e-4, 2)
    assert (config["memory_layers"], config["layernorm_layers"]) == (1, None)
    assert load_memory_file(tmp_path / "mine.safetensors").spec.first_memory_layer == 1
    run(
        "train",
        "--train-file",
        train,
        "--max-length",
        "16",
        "--quiet",
        *common,
        "-o",
        tmp_path / "full.safetensors",
    )
    config = json.loads((tmp_path / "full.json").read_text())["config"]
    assert (config["lr"], config["epochs"], config["eval_every"], config["memory_layers"]) == (
        1e-3,
        3,
        1,
        None,
    )
    assert load_memory_file(tmp_path / "full.safetensors").spec.first_memory_layer == 0
    result = run(*base, "--memory-layers", "3", "-o", tmp_path / "deep.safetensors", code=2)
    assert "--memory-layers 3: the backbone has 2 layers" in result.output


def test_a_label_mismatch_names_only_the_labels_that_differ(tmp_path, common) -> None:
    classes = [f"intent_{i}" for i in range(64)]
    train = write_csv(tmp_path / "intents.csv", [(f"ask {c} {k}", c) for c in classes for k in range(2)])
    memory = tmp_path / "intents.safetensors"
    run(
        "train",
        "--train-file",
        train,
        "-o",
        memory,
        "--epochs",
        "1",
        "--max-length",
        "16",
        "--quiet",
        *common,
    )
    renamed = [(f"ask {c}", c) for c in classes[:60]] + [("ask x", "intent_x"), ("ask y", "intent_y")]
    result = run("eval", memory, "--test-file", write_csv(tmp_path / "renamed.csv", renamed), *common, code=2)
    assert "extra labels 'intent_x', 'intent_y' (2)" in result.output
    assert "missing labels 'intent_60', 'intent_61', 'intent_62', 'intent_63' (4)" in result.output
    assert "intent_17" not in result.output
    # A test file with only some of the classes is scored, under the memory's class order.
    some = write_csv(tmp_path / "some.csv", [(f"ask {c} 0", c) for c in classes[:10]])
    assert json.loads(run("eval", memory, "--test-file", some, *common).stdout)["examples"] == 10


def test_a_csv_whose_quote_swallows_rows_is_reported_with_its_row_count(tmp_path, common) -> None:
    lines = ["text,label", *(f"row {i},{'pos' if i % 2 else 'neg'}" for i in range(20))]
    lines += ['"a quote that never closes,pos', *(f"swallowed {i},neg" for i in range(500)), 'end" here,pos']
    train = tmp_path / "broken.csv"
    train.write_text("\n".join(lines) + "\n")
    result = run(
        "train", "--train-file", train, "-o", tmp_path / "b.safetensors", "--epochs", "1",
        "--max-length", "16", "--quiet", *common,
    )  # fmt: skip
    assert f"read {train}: 21 rows read (523 lines)" in result.stderr
    assert "warning: " in result.stderr
    assert "spanning 502 lines: an unbalanced quote swallows the rows after it" in result.stderr
