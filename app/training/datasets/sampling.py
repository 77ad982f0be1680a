"""Seeded splits and few-shot sampling: the same seed always yields the same split or sample."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from app.errors import DatasetError
from app.training.datasets.types import Example, TaskData


def _round(x: float) -> int:
    return math.floor(x + 0.5)  # half up, not Python's banker's rounding: sizes easy to predict


def by_label(examples: Iterable[Example]) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(str(ex.label), []).append(ex)
    return groups


def split_examples(
    examples: Sequence[Example], fractions: Sequence[float], seed: int, *, stratify: bool
) -> list[list[Example]]:
    """Cut examples into len(fractions) parts; part 0 gets what the later parts leave.

    Stratified: every class is cut in the same proportions, so tiny classes stay in part 0.
    Deterministic for a seed (classes are visited in sorted order, one RNG for everything).
    """
    rng = random.Random(seed)
    groups = by_label(examples) if stratify else {"": list(examples)}
    parts: list[list[Example]] = [[] for _ in fractions]
    for key in sorted(groups):
        group = list(groups[key])
        rng.shuffle(group)
        sizes = [_round(len(group) * f) for f in fractions[1:]]
        start = len(group) - sum(sizes)
        parts[0].extend(group[:start])
        for part, size in zip(parts[1:], sizes, strict=True):
            part.extend(group[start : start + size])
            start += size
    for part in parts:
        rng.shuffle(part)  # interleave the classes
    return parts


def _quotas(counts: Mapping[str, int], n: int) -> dict[str, int]:
    """Split a budget of n over classes in proportion to their counts (largest remainder).

    When the budget allows, every class gets at least one example: a class never seen in training
    can never be predicted. Requires n < sum(counts), so no quota exceeds its count.
    """
    total = sum(counts.values())
    exact = {k: n * c / total for k, c in counts.items()}
    quotas = {k: math.floor(v) for k, v in exact.items()}
    order = list(counts)
    by_remainder = sorted(order, key=lambda k: (-(exact[k] - quotas[k]), order.index(k)))
    for k in by_remainder[: n - sum(quotas.values())]:
        quotas[k] += 1
    if n >= len(counts):
        for k in order:
            if quotas[k] == 0:
                donor = max(order, key=lambda d: quotas[d])  # has >= 2: n >= classes
                quotas[donor] -= 1
                quotas[k] = 1
    return quotas


def sample_examples(
    examples: Sequence[Example], n: int, rng: random.Random, *, stratify: bool
) -> list[Example]:
    if n >= len(examples):
        return list(examples)
    if not stratify:
        return rng.sample(list(examples), n)
    groups = by_label(examples)
    keys = sorted(groups)
    quotas = _quotas({k: len(groups[k]) for k in keys}, n)
    picked: list[Example] = []
    for key in keys:
        group = list(groups[key])
        rng.shuffle(group)
        picked.extend(group[: quotas[key]])
    rng.shuffle(picked)
    return picked


def few_shot(data: TaskData, n: int, *, seed: int) -> TaskData:
    """Keep n training examples (stratified by class, at least one per class when n allows).

    Deterministic for a seed; dev, test and the label order are unchanged, so scores stay comparable
    with the full-data model.
    """
    if n <= 0:
        raise DatasetError(f"few-shot size must be positive, got {n}")
    stratify = data.task_type == "classification"
    return replace(data, train=sample_examples(data.train, n, random.Random(seed), stratify=stratify))
