"""The fast memory implementations against a plain reference written straight from the spec."""

from __future__ import annotations

import pytest
import torch
from parity import assert_f32_close

from app.spartan.layer import dense_memory, load_balancing_loss, memory_forward, sparse_memory


def reference_memory(h, parent_keys, child_keys, child_values, top_k, temperature):
    """Token by token, parent by parent, exactly as shared/SPARTAN.md writes it."""
    outputs = []
    for token in h:
        logits = parent_keys @ token
        chosen = torch.topk(logits, top_k).indices
        parent_w = torch.softmax(logits[chosen], dim=0)
        m = torch.zeros_like(token)
        for weight, parent in zip(parent_w, chosen, strict=True):
            child_w = torch.softmax(child_keys[parent] @ token / temperature, dim=0)
            m = m + weight * (child_w[:, None] * child_values[parent]).sum(0)
        outputs.append(m)
    return torch.stack(outputs)


def make_params(tokens, hidden, parents, children, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=dtype) * scale).requires_grad_()

    return (
        rand(tokens, hidden),
        rand(parents, hidden, scale=0.5),
        rand(parents, children, hidden, scale=0.5),
        rand(parents, children, hidden),
    )


def grads(fn, params, top_k, temperature, upstream):
    for p in params:
        p.grad = None
    out = fn(*params, top_k, temperature)
    out = out.update if hasattr(out, "update") else out
    (out * upstream).sum().backward()
    return out.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("impl", [sparse_memory, dense_memory, memory_forward])
@pytest.mark.parametrize(
    ("parents", "children", "top_k", "temperature"),
    [(16, 3, 8, 1.6), (5, 4, 1, 1.0), (7, 1, 7, 0.5), (32, 2, 4, 2.0)],
)
def test_fast_memory_matches_reference_outputs_and_gradients(impl, parents, children, top_k, temperature):
    params = make_params(tokens=12, hidden=10, parents=parents, children=children)
    upstream = torch.randn(12, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_out, ref_grads = grads(reference_memory, params, top_k, temperature, upstream)
    out, fast_grads = grads(impl, params, top_k, temperature, upstream)
    assert_f32_close(out, ref_out)
    for name, got, want in zip(("h", "P", "K", "V"), fast_grads, ref_grads, strict=True):
        assert_f32_close(got, want, msg=f"gradient of {name}")


def test_sparse_and_dense_agree_at_scale_in_float32():
    # float32, the dtype actually served: both fast paths against each other on a realistic size.
    params = [p.detach().float() for p in make_params(tokens=512, hidden=64, parents=128, children=3, seed=3)]
    sparse = sparse_memory(*params, 8, 1.6)
    dense = dense_memory(*params, 8, 1.6)
    assert torch.equal(sparse.parents, dense.parents)
    assert_f32_close(sparse.update, dense.update)


def test_unchosen_parents_get_no_gradient():
    h, parent_keys, child_keys, child_values = make_params(tokens=1, hidden=6, parents=8, children=2, seed=5)
    out = sparse_memory(h, parent_keys, child_keys, child_values, 2, 1.0)
    out.update.sum().backward()
    chosen = set(out.parents[0].tolist())
    for parent in range(8):
        has_grad = bool(child_values.grad[parent].abs().sum() > 0)
        assert has_grad == (parent in chosen)


def test_sparse_memory_never_materialises_all_cells():
    # With E = 4096 parents the sparse path must only gather k parents per token: its autograd graph
    # holds tensors of N*k*C*H, never N*E*C*H. We check the largest saved activation.
    tokens, hidden, parents, children, top_k = 32, 16, 4096, 3, 4
    params = [p.detach().float().requires_grad_() for p in make_params(tokens, hidden, parents, children)]
    largest = 0

    def pack(t):
        nonlocal largest
        if not any(t is p for p in params):
            largest = max(largest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sparse_memory(*params, top_k, 1.6).update.sum().backward()
    # Allowed: the [N, E] parent logits, parameter-sized views, and the [N, k*C*H] gathered rows.
    assert largest <= max(tokens * parents, parents * children * hidden, tokens * top_k * children * hidden)
    assert largest * hidden < tokens * parents * children * hidden


def test_load_balancing_loss_ignores_padding_and_is_one_when_uniform():
    parents = torch.tensor([[0], [1], [2], [3], [0], [0]])
    logits = torch.zeros(6, 4)
    logits[4:, 0] = 5.0  # padding rows lean on parent 0
    valid = torch.tensor([True, True, True, True, False, False])
    assert load_balancing_loss(logits, parents, valid).item() == pytest.approx(1.0)
    # Counted with the padding rows, usage is no longer uniform.
    assert load_balancing_loss(logits, parents, torch.ones(6, dtype=torch.bool)).item() > 1.0


def test_load_balancing_loss_sees_pre_topk_probabilities():
    parents = torch.tensor([[0], [1]])
    valid = torch.ones(2, dtype=torch.bool)
    flat = load_balancing_loss(torch.zeros(2, 4), parents, valid)
    peaked = load_balancing_loss(torch.tensor([[5.0, 5.0, -5.0, -5.0]] * 2), parents, valid)
    assert peaked > flat  # probability mass concentrated on the used parents raises the loss


def test_memory_layer_inference_cache_follows_in_place_updates():
    from app.spartan.memory import MemoryLayer

    layer = MemoryLayer(hidden=10, num_parents=6, num_children=3, top_k=2, temperature=1.6)
    h = torch.randn(5, 10)
    with torch.no_grad():
        cached = layer(h).update  # served path: cached child-major layout
        layer.child_values.mul_(3.0)  # an in-place update (e.g. a reload) must invalidate the cache
        after = layer(h).update
    reference = reference_memory(h, layer.parent_keys, layer.child_keys, layer.child_values, 2, 1.6).detach()
    assert_f32_close(after, reference)
    assert_f32_close(after, cached * 3.0)


@pytest.mark.parametrize("changed", ["parent_keys", "child_keys", "child_values"])
def test_memory_layer_inference_cache_holds_the_fused_layout_and_follows_updates(changed: str):
    from app.spartan.layer import child_major, uses_dense
    from app.spartan.memory import MemoryLayer

    # What the cache holds: [P^T | child keys / T] and the child-major values. Each of the three can be
    # updated in place (a reload copies in place), and the cache must follow.
    layer = MemoryLayer(hidden=10, num_parents=6, num_children=3, top_k=2, temperature=1.6)
    assert uses_dense(6, 3)  # the size takes the dense path, the only one with a cache
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(5, 10, generator=gen)
    with torch.no_grad():
        for param in layer.parameters():  # unit scale: the children's softmax is far from uniform
            param.copy_(torch.randn(param.shape, generator=gen))
        before = layer(h).update
        scores_t, values = layer._inference_layout()
        want_keys_t, want_values = child_major(layer.child_keys, layer.child_values, 1.6)
        assert torch.equal(scores_t[:, :6], layer.parent_keys.t())
        assert torch.equal(scores_t[:, 6:], want_keys_t)
        assert torch.equal(values, want_values)
        assert layer._inference_layout()[0] is scores_t  # unchanged parameters: the cache is reused
        assert layer.inference_cache_bytes() == scores_t.nbytes + values.nbytes

        getattr(layer, changed).mul_(-2.0)
        after = layer(h).update
    reference = reference_memory(h, layer.parent_keys, layer.child_keys, layer.child_values, 2, 1.6).detach()
    assert_f32_close(after, reference)
    assert (after - before).abs().max() > 0.1  # the update changed the answer: a stale cache would show
    assert layer._inference_layout()[0] is not scores_t
