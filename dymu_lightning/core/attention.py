"""Proportional attention over a padded variable-length batch.

A merged token that stands for ``s`` patches should draw the attention those ``s`` patches would
have drawn together, so ``log(s)`` is added to every logit of that key *before* the softmax
(``e^{q.k + log s} = s * e^{q.k}``). Padding keys get ``-inf`` in the same bias.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

Backend = Literal["sdpa", "eager"]
BACKENDS: tuple[str, ...] = ("sdpa", "eager")


def attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor | None = None, backend: Backend = "sdpa"
) -> Tensor:
    """Softmax attention with an optional additive key bias.

    Args:
        q, k, v: ``[B, H, L, d]``.
        scale: logit scale, usually ``d ** -0.5``.
        bias: ``[B, 1, 1, L]`` additive key bias (``log(size)``, ``-inf`` for padding), or None.
        backend: ``"sdpa"`` (fused kernels) or ``"eager"`` (explicit softmax, the reference).

    Returns:
        ``[B, H, L, d]``.
    """
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    if backend != "eager":
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1) @ v
