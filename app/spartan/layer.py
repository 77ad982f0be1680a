"""The SPARTAN memory layer: top-k parents, softmax over their children, residual add.

For token states h [N, H] and one layer's parameters P [E, H], K [E, C, H], V [E, C, H]:

    a = P h;  S = topk(a, k);  p = softmax(a[S])
    q_e = softmax(K_e h / T)                     for e in S
    m = sum_{e in S} p_e sum_c q_{e,c} V_{e,c};  h' = h + m

Two implementations with identical results (and gradients):

* `sparse_memory` gathers only the k chosen parents' rows from the *un-expanded* parameters
  (F.embedding, whose backward is an index_add into a [E, C*H] gradient): cost O(N * k * C * H),
  independent of the number of parents E. Nothing of size N * E * C * H is ever built.
* `dense_memory` scores every cell with two small matmuls and multiplies the children by a
  [N, E] parent weight that is zero outside the top-k: cost O(N * E * C * H), but as plain GEMMs it
  beats gathering when E * C is small (the default M = 48).

`memory_forward` picks between them by the number of cells (see DENSE_MAX_CELLS, measured with
benchmarks/bench_memory_scaling.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# Up to this many cells (E * C) the dense formulation is faster on CPU; above it the gather wins.
# Measured with benchmarks/bench_memory_scaling.py --children 3 (batch 16 x len 128, H 384, k 8): dense wins
# up to ~1,536 cells and ties sparse near 3,072; see docs/BENCHMARKS.md.
DENSE_MAX_CELLS = 2048


class MemoryOutput(NamedTuple):
    update: torch.Tensor  # m, [N, H]: what the layer adds to the hidden states
    parents: torch.Tensor  # chosen parent indices, [N, k], best first
    parent_logits: torch.Tensor  # a = P h for every parent, [N, E] (the load-balancing loss needs them)


def _choose_parents(
    h: torch.Tensor, parent_keys: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Parent logits, top-k indices and their softmax weights (one topk call: no overlapping picks)."""
    logits = h @ parent_keys.t()
    top_logits, top_idx = logits.topk(top_k, dim=-1)
    return logits, top_idx, torch.softmax(top_logits, dim=-1)


def sparse_memory(
    h: torch.Tensor,
    parent_keys: torch.Tensor,
    child_keys: torch.Tensor,
    child_values: torch.Tensor,
    top_k: int,
    temperature: float,
) -> MemoryOutput:
    """Gather-based memory: touches only the k chosen parents' children per token."""
    n, hidden = h.shape
    num_parents, num_children, _ = child_keys.shape
    logits, top_idx, parent_w = _choose_parents(h, parent_keys, top_k)
    # [E, C*H] views let F.embedding gather whole parents; its gradient is a sparse index_add.
    keys = F.embedding(top_idx, child_keys.reshape(num_parents, num_children * hidden))
    keys = keys.view(n, top_k * num_children, hidden)
    child_logits = torch.bmm(keys, h.unsqueeze(-1)).view(n, top_k, num_children)
    child_w = torch.softmax(child_logits / temperature, dim=-1)
    weights = (parent_w.unsqueeze(-1) * child_w).view(n, 1, top_k * num_children)
    values = F.embedding(top_idx, child_values.reshape(num_parents, num_children * hidden))
    update = torch.bmm(weights, values.view(n, top_k * num_children, hidden)).squeeze(1)
    return MemoryOutput(update, top_idx, logits)


def dense_memory(
    h: torch.Tensor,
    parent_keys: torch.Tensor,
    child_keys: torch.Tensor,
    child_values: torch.Tensor,
    top_k: int,
    temperature: float,
) -> MemoryOutput:
    """All-cells memory with a [N, M] weight matrix that is zero outside the chosen parents."""
    keys_t, values = child_major(child_keys, child_values, temperature)
    return dense_memory_child_major(h, parent_keys, keys_t, values, child_keys.shape[1], top_k)


def child_major(
    child_keys: torch.Tensor, child_values: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense path's layout: keys [H, C*E] pre-divided by T, values [C*E, H], cells child-major.

    Child-major cells make the softmax over C reduce over a strided middle axis with E contiguous
    lanes, ~20x faster on CPU than a softmax over a last axis of size 3. Inference caches this layout.
    """
    num_parents, num_children, hidden = child_keys.shape
    cells = num_parents * num_children
    keys_t = (child_keys.transpose(0, 1).reshape(cells, hidden) / temperature).t()
    return keys_t, child_values.transpose(0, 1).reshape(cells, hidden)


def dense_memory_child_major(
    h: torch.Tensor,
    parent_keys: torch.Tensor,
    keys_t: torch.Tensor,
    values: torch.Tensor,
    num_children: int,
    top_k: int,
) -> MemoryOutput:
    n = h.shape[0]
    num_parents = parent_keys.shape[0]
    logits, top_idx, parent_w = _choose_parents(h, parent_keys, top_k)
    child_w = torch.softmax((h @ keys_t).view(n, num_children, num_parents), dim=1)
    # Out-of-place scatter: autograd-safe, and unchosen parents get exactly zero weight and gradient.
    parent_w_full = torch.zeros_like(logits).scatter(1, top_idx, parent_w)
    weights = (parent_w_full.unsqueeze(1) * child_w).view(n, num_children * num_parents)
    return MemoryOutput(weights @ values, top_idx, logits)


def fused_layout(
    parent_keys: torch.Tensor, child_keys: torch.Tensor, child_values: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Serving's layout: [P^T | child keys / T] as one [H, E + C*E] matrix (one GEMM scores every
    parent and every cell), and values [C*E, H], cells child-major as in `child_major`."""
    keys_t, values = child_major(child_keys, child_values, temperature)
    return torch.cat([parent_keys.t(), keys_t], dim=1).contiguous(), values.contiguous()


def dense_memory_fused(
    h: torch.Tensor,
    scores_t: torch.Tensor,
    values: torch.Tensor,
    num_parents: int,
    num_children: int,
    top_k: int,
) -> MemoryOutput:
    """`dense_memory_child_major` over the fused layout: the same numbers in fewer operations (one
    GEMM instead of two, an in-place scatter). Inference only: no autograd through the in-place op."""
    n = h.shape[0]
    scores = h @ scores_t
    logits = scores[:, :num_parents]
    top_logits, top_idx = logits.topk(top_k, dim=-1)
    child_w = torch.softmax(scores[:, num_parents:].view(n, num_children, num_parents), dim=1)
    parent_w = torch.zeros_like(logits).scatter_(1, top_idx, torch.softmax(top_logits, dim=-1))
    weights = (parent_w.unsqueeze(1) * child_w).view(n, num_children * num_parents)
    return MemoryOutput(weights @ values, top_idx, logits)


def uses_dense(num_parents: int, num_children: int) -> bool:
    return num_parents * num_children <= DENSE_MAX_CELLS


def memory_forward(
    h: torch.Tensor,
    parent_keys: torch.Tensor,
    child_keys: torch.Tensor,
    child_values: torch.Tensor,
    top_k: int,
    temperature: float,
) -> MemoryOutput:
    """The memory for token states h [N, H], by whichever implementation is faster at this size."""
    impl = dense_memory if uses_dense(child_keys.shape[0], child_keys.shape[1]) else sparse_memory
    return impl(h, parent_keys, child_keys, child_values, top_k, temperature)


def load_balancing_loss(
    parent_logits: torch.Tensor, parents: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Switch-style balance loss E * sum_e f_e * P_e over real (non-padding) tokens only.

    f_e is the share of top-k picks that went to parent e; P_e the mean *pre*-top-k router probability,
    so the loss also sees parents that are never picked. 1.0 means perfectly uniform usage.
    """
    num_parents = parent_logits.shape[-1]
    mask = valid.to(parent_logits.dtype)
    tokens = mask.sum().clamp_min(1.0)
    probs = torch.softmax(parent_logits, dim=-1) * mask.unsqueeze(-1)
    picks = F.one_hot(parents, num_parents).to(parent_logits.dtype).sum(1) * mask.unsqueeze(-1)
    share = picks.sum(0) / (tokens * parents.shape[-1])
    mean_prob = probs.sum(0) / tokens
    return num_parents * (share * mean_prob).sum()
