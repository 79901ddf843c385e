"""Independent references for the CUBS attention kernels (common/cubs.py): the spec's formulas
written out, materialising the L x L matrix. For tests and the benchmarks in bench/ only.

    from tests.reference import naive_attention, naive_similarity_attention
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def naive_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale) v, as cubs.fused_attention: q, k, v B x h x L x e -> B x h x L x e.

    scale defaults to 1/sqrt(e)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v


def naive_similarity_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """a_i = sum_j softmax_j(q_i k_j) v_j, as cubs.similarity_attention: B x L each -> B x L,
    through S = q k^T (B x L x L)."""
    similarity = q[:, :, None] * k[:, None, :]
    return (torch.softmax(similarity, dim=-1) @ v[:, :, None])[:, :, 0]
