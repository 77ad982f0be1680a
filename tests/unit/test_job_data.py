"""A training job's data: every refusal names its split, row (and the file's line) and a reason code,
before anything is queued; what passes becomes the train/dev/test examples the trainer gets."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from app.errors import TrainingDataInvalid
from app.jobs.data import DataLimits, rows_from_file, rows_from_json, training_data
from app.jobs.options import JobOptions, recipe
from app.training.trainer import FEW_SHOT_EPOCHS, FEW_SHOT_LR, TrainConfig

LIMITS = DataLimits(max_rows=100, max_labels=3, max_text_chars=50, num_layers=6)


def rows(count: int = 20, labels: tuple[str, ...] = ("neg", "pos")) -> list[dict[str, Any]]:
    return [{"text": f"text number {i}", "label": labels[i % len(labels)]} for i in range(count)]


def body(**splits: Any) -> bytes:
    return json.dumps(splits).encode()


def refusal(raw: bytes, options: JobOptions | None = None, limits: DataLimits = LIMITS) -> dict[str, Any]:
    with pytest.raises(TrainingDataInvalid) as refused:
        training_data("t", rows_from_json(raw), options or JobOptions(), limits)
    assert refused.value.details is not None
    return {"message": str(refused.value), **refused.value.details[0]}


def test_json_rows_become_seeded_stratified_splits() -> None:
    data = training_data("t", rows_from_json(body(rows=rows(40))), JobOptions(), LIMITS)
    assert data.labels == ("neg", "pos")
    assert (len(data.train), len(data.dev), len(data.test)) == (32, 4, 4)
    assert {ex.label for ex in data.dev} == {"neg", "pos"}
    again = training_data("t", rows_from_json(body(rows=rows(40))), JobOptions(), LIMITS)
    assert again == data  # the same seed, the same split
    other = training_data("t", rows_from_json(body(rows=rows(40))), JobOptions(seed=7), LIMITS)
    assert other.dev != data.dev


def test_given_dev_and_test_rows_are_kept_and_nothing_is_cut() -> None:
    raw = body(rows=rows(10), dev_rows=rows(4), test_rows=rows(6))
    data = training_data("t", rows_from_json(raw), JobOptions(), LIMITS)
    assert (len(data.train), len(data.dev), len(data.test)) == (10, 4, 6)


def test_few_shot_keeps_a_stratified_sample_of_the_training_rows() -> None:
    data = training_data("t", rows_from_json(body(rows=rows(60))), JobOptions(few_shot=10), LIMITS)
    assert len(data.train) == 10
    assert {str(ex.label) for ex in data.train} == {"neg", "pos"}


def test_pairs_integer_classes_and_regression_follow_the_file_rules() -> None:
    pairs = [{"text": f"q{i}", "text_pair": f"a{i}", "label": i % 2} for i in range(20)]
    data = training_data("t", rows_from_json(body(rows=pairs)), JobOptions(), LIMITS)
    assert data.has_pairs
    assert data.labels == ("0", "1")  # integer labels are classes, named as spartan train names them
    scores = [{"text": f"t{i}", "label": i / 10} for i in range(20)]
    regression = training_data("t", rows_from_json(body(rows=scores)), JobOptions(), LIMITS)
    assert regression.task_type == "regression"
    assert regression.labels == ()


def test_jsonl_and_csv_files_name_their_lines() -> None:
    jsonl = b'{"text": "a", "label": "x"}\n\n{"text": "b"}\n'
    with pytest.raises(TrainingDataInvalid) as refused:
        training_data("t", {"train": rows_from_file(jsonl, "jsonl")}, JobOptions(), LIMITS)
    assert str(refused.value) == "train row 2 (line 3): no label"
    assert refused.value.details == [{"split": "train", "row": 2, "line": 3, "reason": "missing_label"}]
    csv_body = b'text,label\n"one, with a comma",x\n"two\nlines",y\n,x\n'
    with pytest.raises(TrainingDataInvalid) as refused:
        training_data("t", {"train": rows_from_file(csv_body, "csv")}, JobOptions(), LIMITS)
    assert str(refused.value) == "train row 3 (line 5): empty text"
    good = rows_from_file(b"\xef\xbb\xbftext\tlabel\na\tx\nb\ty\n", "tsv")  # a BOM is not a column name
    assert [(r.text, r.label) for r in good] == [("a", "x"), ("b", "y")]


@pytest.mark.parametrize(
    ("raw", "reason", "message"),
    [
        (body(rows=[*rows(4), {"text": "no label here"}]), "missing_label", "train row 5: no label"),
        (body(rows=[*rows(4), {"text": "x", "label": " "}]), "missing_label", "train row 5: empty label"),
        (body(rows=[*rows(3), {"text": "  ", "label": "pos"}]), "empty_text", "train row 4: empty text"),
        (body(rows=[{"label": "pos"}]), "missing_text", "train row 1: no text"),
        (body(rows=[{"text": 3, "label": "pos"}]), "text_not_text", "train row 1: text must be text"),
        (body(rows=[{"text": "x" * 51, "label": "pos"}]), "text_too_long", "train row 1: text has 51"),
        (body(rows=[{"text": "x", "text_pair": "", "label": "pos"}]), "empty_text_pair", "empty text_pair"),
        (body(rows=rows(6, ("a", "b", "c", "d"))), "too_many_labels", "train row 4: label 'd' is class 4"),
        (body(rows=rows(6, ("pos",))), "one_class", "all 6 rows have one class ('pos')"),
        (body(rows=rows(101)), "too_many_rows", "train row 101: more than 100 rows"),
        (body(rows=rows(4), dev_rows=rows(97)), "too_many_rows", "dev row 97: more than 100 rows"),
        (body(rows=[*rows(4), {"text": "x", "label": "a\u200bb"}]), "bad_label", "invisible character"),
        (body(rows=[*rows(4), {"text": "x", "label": [1]}]), "bad_label", "a label is text or a number"),
        (body(rows=[*rows(4), "just text"]), "malformed", "train row 5: not a JSON object"),
        (body(rows=[]), "no_rows", "no training rows"),
        (body(dev_rows=rows(4)), "missing_rows", 'the body has no "rows"'),
        (body(rows=rows(4), options={"epochs": 3}), "unknown_field", "options are query parameters"),
        (b"[1, 2", "malformed", "the body is not valid JSON"),
        (b'{"rows": NaN}', "malformed", "NaN is not JSON"),
        (b"\xff\xfe", "not_utf8", "not UTF-8"),
        (
            body(rows=rows(4), dev_rows=[{"text": "x", "label": "new"}]),
            "class_without_training_rows",
            "'new'",
        ),
    ],
)
def test_each_refusal_names_the_row_and_the_reason(raw: bytes, reason: str, message: str) -> None:
    refused = refusal(raw)
    assert refused["reason"] == reason
    assert message in refused["message"]


def test_options_that_do_not_fit_the_data_are_refused() -> None:
    assert (
        refusal(body(rows=rows(20, ("a", "b", "c"))), JobOptions(few_shot=2))["reason"]
        == "few_shot_too_small"
    )
    regression = [{"text": "x", "label": "high"}, {"text": "y", "label": 0.5}]
    refused = refusal(body(rows=regression), JobOptions(task_type="regression"))
    assert (refused["reason"], refused["row"]) == ("label_not_number", 1)
    assert (
        refusal(body(rows=rows(4)), JobOptions(dev_fraction=0.5, test_fraction=0.5))["reason"]
        == "bad_options"
    )
    assert refusal(body(rows=rows(4)), JobOptions(num_parents=4, top_k=8))["reason"] == "bad_options"


def test_unset_options_are_the_trainers_few_shot_recipe() -> None:
    config = JobOptions().train_config(6)
    assert config == recipe(6)
    assert (config.epochs, config.lr) == (FEW_SHOT_EPOCHS, FEW_SHOT_LR)
    assert config.num_parents == TrainConfig().num_parents
    given = JobOptions(epochs=2, lr=0.01, num_parents=8, num_children=2, top_k=4, temperature=1.0, seed=3)
    chosen = given.train_config(6)
    assert (chosen.epochs, chosen.lr, chosen.num_parents, chosen.num_children) == (2, 0.01, 8, 2)
    assert (chosen.top_k, chosen.temperature, chosen.seed) == (4, 1.0, 3)
    assert given.described(6)["dev_fraction"] == 0.1


def test_a_recipe_the_trainer_makes_per_backbone_is_the_one_jobs_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the trainer has `few_shot_config(num_layers)` (the fast recipe), jobs follow it."""
    from app.training import trainer

    def few_shot_config(num_layers: int, **changes: Any) -> TrainConfig:
        return replace(TrainConfig(epochs=7, lr=0.002, num_children=num_layers), **changes)

    monkeypatch.setattr(trainer, "few_shot_config", few_shot_config, raising=False)
    config = JobOptions(lr=0.005).train_config(4)
    assert (config.epochs, config.lr, config.num_children) == (7, 0.005, 4)
