"""Routing statistics: how often each memory parent is chosen, per label, and how much that says.

Pure math on count tensors, shared by the service (`GET /v1/tasks/{task}/routing`) and
benchmarks/bench_routing.py. A "choice" is one of the top-k parents one real (non-padding) token picks
in one layer, so every token adds k choices per layer. Counts have the shape [layers, labels, parents];
per layer, a [labels, parents] table is the joint distribution of (label, parent) over choices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def count_choices(
    layer_parents: Sequence[torch.Tensor],
    real_tokens: torch.Tensor,
    buckets: torch.Tensor,
    num_buckets: int,
    num_parents: int,
) -> torch.Tensor:
    """Per layer, how often each parent was chosen by the real tokens of each bucket's rows.

    layer_parents: per layer, the chosen parents [rows, seq, k]; real_tokens: [rows, seq], true for
    non-padding tokens; buckets: [rows], each row's bucket (its label, or its document) in
    [0, num_buckets). Returns int64 counts [layers, num_buckets, num_parents].
    """
    parents = torch.stack(list(layer_parents))  # [L, N, S, k]
    num_layers = parents.shape[0]
    # One flat cell index per choice, so a single bincount counts every layer and bucket at once.
    layer_offsets = torch.arange(num_layers).view(-1, 1, 1, 1) * (num_buckets * num_parents)
    bucket_offsets = buckets.to(torch.long).view(1, -1, 1, 1) * num_parents
    cells = parents.to(torch.long) + bucket_offsets + layer_offsets
    keep = real_tokens.to(torch.bool).view(1, *real_tokens.shape, 1).expand_as(parents)
    counts = torch.bincount(cells[keep], minlength=num_layers * num_buckets * num_parents)
    return counts.view(num_layers, num_buckets, num_parents)


def shares_per_label(counts: torch.Tensor) -> torch.Tensor:
    """[labels, parents] counts -> each label's choices as shares of that label's total (rows sum to 1;
    a label with no choices stays all zero)."""
    counts = counts.to(torch.float64)
    totals = counts.sum(-1, keepdim=True)
    return torch.where(totals > 0, counts / totals.clamp_min(1), torch.zeros_like(counts))


def entropy_bits(counts: torch.Tensor) -> float:
    """Entropy (bits) of the distribution proportional to `counts` (any shape); 0 for no counts."""
    p = counts.to(torch.float64).flatten()
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p[p > 0] / total
    return float(-(p * p.log2()).sum())


def mutual_information_bits(counts: torch.Tensor) -> float:
    """I(label; parent) in bits from a [labels, parents] count table; 0 for no counts.

    0 when the parent says nothing about the label; H(label) when every parent is used by one label
    only (the parent then identifies the label).
    """
    joint = counts.to(torch.float64)
    total = joint.sum()
    if total <= 0:
        return 0.0
    joint = joint / total
    independent = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    used = joint > 0  # where joint > 0 both marginals are > 0 too
    return max(0.0, float((joint[used] * (joint[used] / independent[used]).log2()).sum()))


@dataclass(frozen=True)
class LayerRouting:
    """One layer's summary: how evenly the parents are used, and how much they say about the label."""

    parent_entropy_bits: float  # H(parent) over all choices; log2(parents) = perfectly even use
    mutual_information_bits: float  # I(label; parent); at most H(label)


def summarise_layers(counts: torch.Tensor) -> list[LayerRouting]:
    """[layers, labels, parents] counts -> one LayerRouting per layer."""
    return [
        LayerRouting(entropy_bits(layer.sum(0)), mutual_information_bits(layer)) for layer in counts.unbind(0)
    ]


def label_entropy_bits(counts: torch.Tensor) -> float:
    """H(label) over the choices of one layer (the same in every layer: each token makes k per layer)."""
    return entropy_bits(counts[0].sum(-1)) if counts.shape[0] else 0.0


def mutual_information_ceiling_bits(label_entropy: float, num_parents: int, top_k: int) -> float:
    """The most I(label; parent) can reach: min(H(label), log2(num_parents / top_k)).

    A token chooses a parent at most once, so no parent gets more than 1/k of a label's choices:
    H(parent | label) >= log2 k, while H(parent) <= log2 E. With E = 16 and k = 8 that is 1 bit,
    however many labels there are.
    """
    return min(label_entropy, math.log2(num_parents / top_k))
