"""The routing statistics' math: counting choices, per-label shares, entropy, mutual information."""

from __future__ import annotations

import math

import pytest
import torch

from app.spartan.routing_stats import (
    count_choices,
    entropy_bits,
    label_entropy_bits,
    mutual_information_bits,
    mutual_information_ceiling_bits,
    shares_per_label,
    summarise_layers,
)


def test_mutual_information_of_an_independent_table_is_zero() -> None:
    # Every label uses the parents in the same proportions: the parent says nothing about the label.
    usage = torch.tensor([5, 1, 3, 7])
    table = torch.stack([usage * 2, usage * 3, usage])
    assert mutual_information_bits(table) == pytest.approx(0.0, abs=1e-12)


def test_mutual_information_of_a_specialised_table_is_the_label_entropy() -> None:
    # Each parent serves one label only: knowing the parent is knowing the label.
    table = torch.tensor([[6, 2, 0, 0, 0], [0, 0, 3, 0, 0], [0, 0, 0, 4, 5]])
    label_entropy = entropy_bits(table.sum(1))
    assert mutual_information_bits(table) == pytest.approx(label_entropy, abs=1e-12)
    assert label_entropy == pytest.approx(-sum(p * math.log2(p) for p in (8 / 20, 3 / 20, 9 / 20)))


def test_mutual_information_by_hand() -> None:
    # Joint [[1/2, 0], [1/4, 1/4]]: p(label) = (1/2, 1/2), p(parent) = (3/4, 1/4).
    # I = 1/2 log2((1/2)/(3/8)) + 1/4 log2((1/4)/(3/8)) + 1/4 log2((1/4)/(1/8)) = 0.3113 bits
    table = torch.tensor([[2, 0], [1, 1]])
    expected = 0.5 * math.log2(4 / 3) + 0.25 * math.log2(2 / 3) + 0.25 * math.log2(2)
    assert mutual_information_bits(table) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.3113, abs=1e-4)


def test_empty_tables_give_zero_not_nan() -> None:
    assert mutual_information_bits(torch.zeros(3, 4, dtype=torch.long)) == 0.0
    assert entropy_bits(torch.zeros(4)) == 0.0
    assert shares_per_label(torch.zeros(2, 3)).sum() == 0


def test_entropy_of_even_use_is_log2_of_the_parents() -> None:
    assert entropy_bits(torch.full((16,), 7)) == pytest.approx(4.0)
    assert entropy_bits(torch.tensor([0, 9, 0])) == pytest.approx(0.0)


def test_shares_are_normalised_per_label() -> None:
    shares = shares_per_label(torch.tensor([[1, 3], [0, 0], [5, 5]]))
    expected = torch.tensor([[0.25, 0.75], [0.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(shares, expected)


def test_count_choices_counts_real_tokens_per_layer_bucket_and_parent() -> None:
    # 2 rows of 3 positions, k = 2, 4 parents; row 1's last position is padding.
    layer0 = torch.tensor([[[0, 1], [0, 2], [3, 0]], [[1, 2], [1, 3], [0, 0]]])
    layer1 = torch.tensor([[[3, 2], [3, 2], [3, 2]], [[0, 1], [0, 1], [3, 3]]])
    real = torch.tensor([[1, 1, 1], [1, 1, 0]])
    buckets = torch.tensor([2, 0])  # row 0 is in bucket 2, row 1 in bucket 0 (bucket 1 is empty)
    counts = count_choices([layer0, layer1], real, buckets, num_buckets=3, num_parents=4)
    assert counts.shape == (2, 3, 4)
    assert counts.dtype == torch.long
    assert counts[0, 2].tolist() == [3, 1, 1, 1]  # row 0, layer 0
    assert counts[0, 0].tolist() == [0, 2, 1, 1]  # row 1, layer 0, padding not counted
    assert counts[1, 2].tolist() == [0, 0, 3, 3]
    assert counts[1, 0].tolist() == [2, 2, 0, 0]
    assert counts[:, 1].sum() == 0
    # Every layer holds exactly real tokens x k choices.
    assert counts.sum((1, 2)).tolist() == [5 * 2, 5 * 2]


def test_summaries_per_layer() -> None:
    counts = torch.stack(
        [
            torch.tensor([[4, 4, 0, 0], [0, 0, 4, 4]]),  # specialised: I = H(label) = 1 bit
            torch.tensor([[2, 2, 2, 2], [2, 2, 2, 2]]),  # independent: I = 0
        ]
    )
    first, second = summarise_layers(counts)
    assert first.mutual_information_bits == pytest.approx(1.0)
    assert second.mutual_information_bits == pytest.approx(0.0)
    assert first.parent_entropy_bits == pytest.approx(2.0)
    assert second.parent_entropy_bits == pytest.approx(2.0)
    assert label_entropy_bits(counts) == pytest.approx(1.0)


def test_the_ceiling_is_reached_when_labels_use_disjoint_halves_of_the_parents() -> None:
    # k = 2 of E = 4: label 0's tokens always choose parents {0, 1}, label 1's always {2, 3}.
    counts = torch.tensor([[[5, 5, 0, 0], [0, 0, 5, 5]]])
    ceiling = mutual_information_ceiling_bits(label_entropy_bits(counts), num_parents=4, top_k=2)
    assert ceiling == pytest.approx(1.0)
    assert mutual_information_bits(counts[0]) == pytest.approx(ceiling)
    # With 5 balanced labels, 16 parents and k = 8 the parents cap it at 1 bit, below H(label).
    assert mutual_information_ceiling_bits(math.log2(5), 16, 8) == pytest.approx(1.0)
    assert mutual_information_ceiling_bits(0.5, 16, 8) == pytest.approx(0.5)
