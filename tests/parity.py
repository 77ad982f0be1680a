"""How close two float32 computations of the same value must be, stated once for every parity test.

Two runs of the same float32 forward pass that differ only in how their sums are ordered (another
batch composition or padding width, another thread count and so another GEMM blocking, a gathered
versus a dense memory) differ by rounding alone. float32 keeps a 24-bit significand, eps = 2**-23 ~
1.2e-7. A dot product of K terms carries a reordering error of about sqrt(K) * eps relative to the
magnitude of its terms (random-walk rounding; K * eps is the never-reached worst case); MiniLM's longest
reduction is its FFN's K = 1536, and 6 layers compound it roughly as sqrt(6): sqrt(1536 * 6) * eps ~
1.1e-5. So:

* RTOL = 2e-5: twice that estimate, relative to the value compared;
* ATOL = 1e-5: an absolute floor for values near zero, where the error is set by the size of the terms
  that were summed, not by the (small) result.

A parity test that needs more than this has found a real difference, not rounding.
"""

from __future__ import annotations

import torch

F32_RTOL = 2e-5
F32_ATOL = 1e-5


def assert_f32_close(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
    """Equal up to float32 rounding of differently ordered sums (see the module docstring)."""
    torch.testing.assert_close(actual, expected, rtol=F32_RTOL, atol=F32_ATOL, msg=msg)
