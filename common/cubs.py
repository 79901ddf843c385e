"""CUBS attention blocks for ResNet-18 (spec: docs/cubs.md).

Input and output of every block: x, y of shape B x C x H x W; N = H * W.

Shared kernels
  fused_attention(q, k, v, scale): q, k, v B x h x L x e -> B x h x L x e,
      softmax(q k^T * scale) v per (sample, head), through
      torch.nn.functional.scaled_dot_product_attention. The L x L matrix is never stored
      (CPU: the flash kernel, which accepts e = 1; CUDA: q, k, v are zero-padded to e = 8
      for the flash / memory-efficient kernels, which leaves every dot product unchanged,
      and the output is sliced back). SDPA subtracts the row maximum before exp, so large
      logits (ReLU outputs multiplied together) do not overflow.
  similarity_attention(q, k, v): B x L scalars -> B x L, the head-dim-1 case with scale 1:
      a_i = sum_j softmax_j(q_i k_j) v_j. With scalar q, k the exponential separates,
      exp(q_i k_j) = sum_n q_i^n k_j^n / n!, so a_i = sum_n q_i^n M_n / sum_n q_i^n L_n with
      the moments M_n = sum_j v_j k_j^n / n!, L_n = sum_j k_j^n / n!: O(L p), not O(L^2)
      (taylor_similarity_attention, p <= 33 terms, exact to fp32 rounding while every logit
      is in [0, 7.5]; beyond that, fused_attention; derivation and bound in docs/cubs.md).
      Eager mode runs the series as batched matmuls with a written-out backward
      (_TaylorRatio); torch.compile gets products and sums it fuses (_taylor_ratio_by_sums).

CUBS Block 1, channel attention (CUBSBlock1, d = BLOCK1_D = 512 by default):
  g = avgpool(x)                                  B x C
  q, k, v = ReLU(Linear_{C->d}(g)), 3 layers      B x d each
  a = similarity_attention(q, k, v)               B x d      (d x d logits, never stored)
  gate = sigmoid(Linear_{d->C}(a) + g)            B x C
  y = x * gate[:, :, None, None]                  B x C x H x W
CUBS Block 2, spatial attention (CUBSBlock2):
  q, k, v = ReLU(Conv1x1_{C->1}(x)), flattened    B x N each (one conv with 3 outputs)
  a = similarity_attention(q, k, v)               B x N      (N x N logits, never stored)
  gate = sigmoid(a).view(B, 1, H, W)
  y = x * gate
The q and k biases of both plain blocks start at 1 (RELU_BIAS_INIT); so does Block 1's v bias.
Block 2's v bias starts at the gate logit (GATE_LOGIT_INIT), the value its gate opens at.

Variant "plus" (CUBSBlock1Plus, CUBSBlock2Plus), h heads of e = 8 dims:
  gating y = x * (1 + tanh(gamma) * (2 sigmoid(z) - 1)) with a learnable scalar gamma = 0 at
  init, so every block, and a CUBS ResNet, starts exactly as the vanilla network; the tanh
  keeps the multiplier in (0, 2) (PlusGateBlock.effective_gamma). Logits are 8-dim dot
  products with SDPA's default scale 1/sqrt(8); q, k, v are linear (no ReLU), so
  similarities may be negative.
  Block 1 plus: q, k, v = Linear_{C->d}(g) (B x d) read as L = d / (8h) tokens of h*8 dims,
    i.e. B x h x L x 8; a = fused_attention -> B x d; z = Linear_{d->C}(a) + g.
    Same parameter count as plain (plus gamma); the L tokens are learned summaries of the
    channel descriptor and every head compares all of them in its own 8-dim subspace.
  Block 2 plus: q = Conv1x1_{C->8h}(x)                        B x h x N x 8
    k, v = Conv1x1_{C->8h}(avgpool_to(x, kv_grid))            B x h x M x 8, M <= kv_grid^2
    a = fused_attention(q, k, v)                              B x h x N x 8 -> B x 8h x H x W
    z = Conv1x1_{8h->1}(a)                                    B x 1 x H x W: one logit per
    position, as in plain Block 2 (channel selectivity is Block 1's job).
    Every position still attends over the whole image, but keys/values summarise it on at
    most kv_grid x kv_grid (8 x 8 = 64) cells, as in asymmetric / pooled non-local blocks:
    full N x N attention with 4 heads of 8 dims costs ~2 GFLOP per 64x64 image and block,
    so the two stage-1 blocks alone would match ResNet-18's whole forward pass (2.2 GMACs).
    kv_grid=None gives attention over all N positions.

Placements (CUBSAttention): serial y = B2(B1(x)); reverse y = B1(B2(x));
  parallel y = B1(x) + B2(x) (plain) or B1(x) + B2(x) - x (plus: the sum of the two
  modulations, x * (1 + m1 + m2), so that it is still the identity at init).
The submodule names encode the placement (first/second in that order, or channel/spatial
for parallel), so state dicts of different placements or variants never load strictly
into each other.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.models import ResNet18

PLACEMENTS = ("serial", "reverse", "parallel")
VARIANTS = ("plain", "plus")
# Plain blocks' q, k, v biases: every ReLU unit starts positive; one at 0 gets no gradient (docs/cubs.md).
RELU_BIAS_INIT = 1.0
# Plain gates' initial logit: open (0.95), as a gate scales its residual branch's gradient (docs/cubs.md).
GATE_LOGIT_INIT = 3.0
BLOCK1_D = 512  # Block 1's similarity size d, the spec's (t3_cubs.py --d)
HEAD_DIM = 8  # plus variant; also the head-dim multiple the CUDA fused kernels want
TAYLOR_MAX_LOGIT = 7.5  # the Taylor series up to this logit; beyond it (or for a negative q or k), the fused kernel


def taylor_terms(largest_logit: float) -> int:
    """Fewest Taylor terms p of exp for logits in [0, X], X = largest_logit, such that the
    series and its derivative (the first p - 1 terms) both miss less than fp32's rounding,
    X^(p-1) / (p-1)! < 2^-24 (docs/cubs.md, "Error bound"). 33 at 7.5, 16 at 2, 12 at 1, 2 at 0."""
    if not 0 <= largest_logit <= TAYLOR_MAX_LOGIT:
        raise ValueError(f"the Taylor series is used for logits in [0, {TAYLOR_MAX_LOGIT}], "
                         f"got a largest logit of {largest_logit}")
    terms, remainder = 2, largest_logit                  # X^(p-1) / (p-1)! for p = 2
    while remainder >= 2.0 ** -24:
        remainder *= largest_logit / terms
        terms += 1
    return terms


TAYLOR_TERMS = taylor_terms(TAYLOR_MAX_LOGIT)  # 33: what compiled code always uses (static shapes)


def fused_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
                    pad_head_dim: bool | None = None) -> Tensor:
    """softmax(q k^T * scale) v without storing the Lq x Lk matrix.

    q: B x h x Lq x e, k and v: B x h x Lk x e -> B x h x Lq x e. scale defaults to 1/sqrt(e)
    of the unpadded e. Which SDPA kernel runs is chosen outside traced code: on CUDA,
    runtime.setup_runtime turns off the math backend (it would materialise the matrix,
    B x h x 4096 x 4096 at 64x64) and cuDNN attention, so a shape no fused kernel takes
    raises instead; on the CPU the flash kernel takes every shape used here.
    pad_head_dim: zero-pad e to a multiple of HEAD_DIM; None = on CUDA only, where the
    kernels need it. True on the CPU runs the CUDA branch there (tests).
    """
    head_dim = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    # Every fused kernel needs stride 1 on the last dim; contiguous() is free when it is.
    q, k, v = (t.contiguous() for t in (q, k, v))
    # CUDA flash / memory-efficient kernels need e % 8 == 0. Zero dims add 0 to every q.k
    # and produce zero output columns, sliced off below.
    if pad_head_dim is None:
        pad_head_dim = q.is_cuda
    pad = (-head_dim) % HEAD_DIM if pad_head_dim else 0
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out[..., :head_dim] if pad else out


def similarity_attention(q: Tensor, k: Tensor, v: Tensor,
                         out_of_range: Tensor | None = None) -> Tensor:
    """a_i = sum_j softmax_j(q_i k_j) v_j for B x L scalars q, k, v -> B x L.

    Computed in fp32 (float64 for float64 inputs, the series still truncated at fp32's
    2^-24) whatever the autocast. When every logit
    q_i k_j lies in [0, TAYLOR_MAX_LOGIT] (q, k >= 0, as the plain blocks' ReLUs make them),
    by the truncated Taylor series of exp in O(L p) (taylor_similarity_attention, error
    below fp32 rounding); otherwise by fused_attention, exact for any logit. The branch
    is torch.cond under torch.compile, so a compiled network never recompiles on it; in
    eager mode it is a Python if on the batch's largest logit, which also sets how many
    terms the series needs (taylor_terms: 12-13 for the logits of about 1 seen in training,
    docs/cubs.md, instead of TAYLOR_TERMS = 33 for the whole range).

    out_of_range (a bool scalar, under torch.compile only): take the series without a
    branch and write into it whether the range was left. Each torch.cond reads its
    predicate on the host, forward and backward; this defers that check to one read per
    training step by the caller, who must then redo the step exactly (range_check below).
    """
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = (t.to(dtype) for t in (q, k, v))
        largest_logit = (q.amax(dim=1) * k.amax(dim=1)).amax()  # max_b max_i,j q_i k_j when q, k >= 0
        in_range = (largest_logit <= TAYLOR_MAX_LOGIT) & (q.amin() >= 0) & (k.amin() >= 0)
        if torch.compiler.is_compiling():
            if out_of_range is not None:
                out_of_range.copy_(~in_range)
                return taylor_similarity_attention(q, k, v)
            # One stacked operand: torch.cond refuses operands that share memory, and Block
            # 2's q, k, v are views of one conv output.
            return torch.cond(in_range, lambda qkv: taylor_similarity_attention(*qkv.unbind(0)),
                              lambda qkv: _fused_similarity_attention(*qkv.unbind(0)),
                              (torch.stack((q, k, v)),))
        # Eager: one host sync; torch.cond outside compile would trace both branches per call.
        # inf marks "out of range", so that one read decides the branch and gives the logit.
        largest = float(torch.where(in_range, largest_logit.detach(), math.inf))
        if largest <= TAYLOR_MAX_LOGIT:
            return taylor_similarity_attention(q, k, v, largest)
        return _fused_similarity_attention(q, k, v)


def taylor_similarity_attention(q: Tensor, k: Tensor, v: Tensor,
                                largest_logit: float = TAYLOR_MAX_LOGIT) -> Tensor:
    """similarity_attention by exp(x) = sum_{n<p} x^n / n!, p = taylor_terms(X) (docs/cubs.md).

    B x L each -> B x L. Requires q, k >= 0 and max q * max k <= X = largest_logit <=
    TAYLOR_MAX_LOGIT for every sample (similarity_attention checks it); then every term is
    >= 0 (no cancellation) and each weight exp(q_i k_j) is underestimated by a factor in
    [1 - d, 1], d = X^p / p! < 2^-24, so |a_i - exact| <= d / (1 - d) * (max v - min v).
    Sums over L (the moments, B x p) and over p (each query), instead of L x L logits.
    """
    terms = taylor_terms(largest_logit)
    scale = max(largest_logit, 1e-30)  # > 0 for the logarithm; any X >= the largest logit works
    n = torch.arange(terms, device=q.device, dtype=q.dtype)                         # p
    coeff = torch.exp(n * math.log(scale) - torch.lgamma(n + 1))                    # p: X^n / n!
    # q_i k_j = (q_i / s) (k_j s / X) X with s = max_i q_i: both factors in [0, 1], so no
    # power over- or underflows before the coefficient. a does not depend on s, so s is a
    # constant to autograd (its exact derivative is 0), and a sample whose q is all zero
    # takes s = X / max k, so that its keys k / max k stay normal floats where they can: with
    # s near 0 they were subnormal, and its q gradient lost digits (0 where denormals flush).
    # s within [tiny, max]: an all-zero batch (X = 1e-30) with a huge k must not give s = 0.
    q_max, k_max = q.detach().amax(dim=1, keepdim=True), k.detach().amax(dim=1, keepdim=True)  # B x 1
    finfo = torch.finfo(q.dtype)
    s = torch.where(q_max > 0, q_max, scale / k_max.clamp_min(finfo.tiny)).clamp(finfo.tiny, finfo.max)
    # a_i = c + sum_j w_ij (v_j - c) / sum_j w_ij for any c. With c = mean(v) the sums are
    # of small signed terms and a_i - c is what is rounded, so a and its q gradient lose far
    # less to rounding than with c = 0 (docs/cubs.md, "Numerics"). c is a constant to
    # autograd: the exact derivative of a through c is 1 - sum_j w_ij / sum_j w_ij = 0.
    c = v.detach().mean(dim=1, keepdim=True)                                        # B x 1
    # k s first: k_j s <= X, where s / X alone can overflow when X is tiny.
    query, key, value = q / s, k * s / scale, v - c                                 # B x L each
    # _TaylorRatio's matmuls would run in TF32 on CUDA wherever TF32 matmuls are allowed (a
    # user's setting; runtime turns them off), so CUDA takes the sums, compiled or not.
    if torch.compiler.is_compiling() or q.is_cuda:
        return c + _taylor_ratio_by_sums(query, key, value, coeff)
    return c + _TaylorRatio.apply(query, key, value, coeff)


def _taylor_ratio_by_sums(query: Tensor, key: Tensor, value: Tensor, coeff: Tensor) -> Tensor:
    """r_i = sum_n query_i^n M_n / sum_n query_i^n L_n, M_n = coeff_n sum_j value_j key_j^n,
    L_n = coeff_n sum_j key_j^n. B x L each, coeff p -> B x L. The form for torch.compile:
    products and sums, so that each sum becomes one kernel that computes its powers in
    registers and no B x L x p tensor is stored; autograd derives the backward."""
    n = torch.arange(coeff.numel(), device=query.device, dtype=query.dtype)          # p
    key_terms = key[..., None].pow(n) * coeff                                       # B x L x p
    moment_v = (value[..., None] * key_terms).sum(dim=1, keepdim=True)              # B x 1 x p
    moment_1 = key_terms.sum(dim=1, keepdim=True)                                   # B x 1 x p
    query_powers = query[..., None].pow(n)                                          # B x L x p
    numerator = (query_powers * moment_v).sum(dim=-1)                               # B x L
    denominator = (query_powers * moment_1).sum(dim=-1)                             # B x L, >= L
    return numerator / denominator


def _powers(x: Tensor, p: int) -> Tensor:
    """B x L -> B x p x L: x^0, ..., x^(p-1), p >= 2, by doubling: about log2 p multiplies
    of growing blocks of rows instead of p pows; each power a contiguous row, 5x faster to
    build at L = 4096 than stacking the powers last."""
    out = x.new_empty(x.shape[0], p, x.shape[1])
    out[:, 0] = 1
    out[:, 1] = x
    done = 2
    while done < p:                                                             # x^done.. = x^0.. * x^done
        new = min(done, p - done)
        torch.mul(out[:, :new], out[:, done - 1:done] * x[:, None], out=out[:, done:done + new])
        done += new
    return out


class _TaylorRatio(torch.autograd.Function):
    """_taylor_ratio_by_sums for eager mode on the CPU, where autograd would store every
    power anyway: the powers as B x p x L tensors, the sums over L and over p as batched
    matmuls, and the backward written out (matmuls too), which took a layer-1 block's
    similarity (B = 4, L = 4096) from 8.5-11 ms to 4 ms forward + backward on 2 CPU cores
    (docs/cubs.md, "Two forms of the same sums"). Same function and truncation, so the same
    error bound; only the rounding differs (powers by doubling: up to about 20 ulps at
    n = 32, against 1 for pow). Tests compare both forms with float64 naive attention.

    Backward, with D_i = sum_n Q_in L_n, N_i = sum_n Q_in M_n, r_i = N_i / D_i, Q_in =
    query_i^n, K_jn = key_j^n and g_i the upstream gradient:
      dN_i = g_i / D_i,  dD_i = -g_i r_i / D_i
      d query_i = sum_n n query_i^(n-1) (M_n dN_i + L_n dD_i)
      dM_n = sum_i Q_in dN_i,  dL_n = sum_i Q_in dD_i
      d value_j = sum_n coeff_n K_jn dM_n
      d key_j = sum_n coeff_n n key_j^(n-1) (value_j dM_n + dL_n)
    """

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, coeff: Tensor) -> Tensor:
        p = coeff.numel()
        key_powers, query_powers = _powers(key, p), _powers(query, p)                # B x p x L
        value_and_one = torch.stack((value, torch.ones_like(value)), dim=-1)         # B x L x 2
        moments = key_powers @ value_and_one * coeff[:, None]                       # B x p x 2: M, L
        sums = query_powers.transpose(1, 2) @ moments                               # B x L x 2: N, D
        ctx.save_for_backward(query_powers, key_powers, value_and_one, moments, sums, coeff)
        return sums[..., 0] / sums[..., 1]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        # once_differentiable's guard is not enough: a second derivative taken only with
        # respect to earlier parameters never reaches it and comes out silently wrong.
        if torch.is_grad_enabled():
            raise RuntimeError("similarity_attention: the Taylor series' backward is written out and has no "
                               "derivative itself, so backward with create_graph=True (a gradient penalty, "
                               "a Hessian) is not supported")
        # In fp32 even when backward() is called inside an autocast region.
        with torch.autocast(grad.device.type, enabled=False):
            query_powers, key_powers, value_and_one, moments, sums, coeff = ctx.saved_tensors
            n = torch.arange(1, coeff.numel(), device=grad.device, dtype=grad.dtype)[:, None]  # p-1 x 1
            d_numerator = grad / sums[..., 1]                                           # B x L
            d_denominator = -d_numerator * sums[..., 0] / sums[..., 1]                  # B x L
            d_sums = torch.stack((d_numerator, d_denominator), dim=-1)                  # B x L x 2
            # d/dx of sum_n x^n a_n is sum_{n>=1} x^(n-1) n a_n: the powers up to p-2 times n a_n.
            d_query = ((query_powers[:, :-1].transpose(1, 2) @ (n * moments[:, 1:])) * d_sums).sum(-1)
            d_moments = query_powers @ d_sums * coeff[:, None]              # B x p x 2: coeff dM, coeff dL
            d_value = (key_powers.transpose(1, 2) @ d_moments[..., :1])[..., 0]
            d_key = ((key_powers[:, :-1].transpose(1, 2) @ (n * d_moments[:, 1:])) * value_and_one).sum(-1)
            return d_query, d_key, d_value, None


def _fused_similarity_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """similarity_attention for any logits: fused_attention with one head of dim 1, scale 1."""
    out = fused_attention(q[:, None, :, None], k[:, None, :, None], v[:, None, :, None], 1.0)
    # Contiguous, as the Taylor branch's output: torch.cond wants the same layout from both
    # (on CUDA the zero-padded head dim leaves this slice with stride 8).
    return out[:, 0, :, 0].contiguous()


def check_plus_d(d: int, heads: int = 4) -> None:
    """Block 1 plus reads d as L = d / (8 heads) tokens per head. With L = 1 the softmax over
    one key is the constant 1 and q, k learn nothing, so at least two tokens are required."""
    tokens, remainder = divmod(d, HEAD_DIM * heads)
    if remainder or tokens < 2:
        raise ValueError(f"--d {d} does not fit the plus variant: Block 1 plus needs d to be a "
                         f"multiple of {HEAD_DIM} x {heads} heads = {HEAD_DIM * heads} giving at "
                         f"least 2 tokens per head, so d = {2 * HEAD_DIM * heads}, "
                         f"{3 * HEAD_DIM * heads}, ... (default {BLOCK1_D})")


def _identity_preserving_gate(logit: Tensor, scale: Tensor) -> Tensor:
    # 1 + scale * (2 sigmoid(logit) - 1); 2 sigmoid(z) - 1 == tanh(z / 2), one op.
    # scale = PlusGateBlock.effective_gamma(). With gamma == 0 this is exactly 1, so
    # x * gate is x bit for bit.
    return 1 + scale * torch.tanh(logit / 2)


def _channel_means(x: Tensor) -> Tensor:
    """B x C x H x W -> B x C, the global average pool, as a sum scaled afterwards: mean's
    backward writes a B x C x H x W quotient, sum's is a broadcast view (about 1 ms less per
    layer-1 block, forward + backward at batch 8 on 2 CPU cores). One rounding more than
    mean, harmless."""
    return x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])


def padded_pointwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """conv2d(x, weight, bias) for a 1x1 weight (out x C x 1 x 1), its output channels
    zero-padded to a multiple of 8 inside the convolution and sliced off after it. A C -> 3
    GEMM runs an unaligned fallback kernel on CUDA; C -> 8 has the alignment tensor cores need."""
    pad = (-weight.shape[0]) % 8
    weight = F.pad(weight, (0, 0, 0, 0, 0, 0, 0, pad))                          # (out + pad) x C x 1 x 1
    bias = None if bias is None else F.pad(bias, (0, pad))
    return F.conv2d(x, weight, bias)[:, :weight.shape[0] - pad]


def channel_matmul(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """conv2d(x, weight, bias) for a 1x1 weight (out x C x 1 x 1) as one einsum over channels.
    On 2 CPU cores (Intel VM, 2026-12-05) its forward + backward at B = 8, C = 64, 64 x 64
    took 2.5 ms against 8.1 ms for the oneDNN convolution, whose backward with 3 (or 8)
    output channels is slow."""
    out = torch.einsum("oc,bchw->bohw", weight[:, :, 0, 0], x)                  # B x out x H x W
    return out if bias is None else out + bias[:, None, None]


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 convolution, B x C_in x H x W -> B x C_out x H x W, with the parameters of
    nn.Conv2d(C_in, C_out, 1), run as each device runs Block 2's C -> 3 projection fastest:
    on CUDA with its output channels padded to 8 (padded_pointwise_conv), elsewhere as a
    matmul over channels (channel_matmul). Same function either way."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda:
            return padded_pointwise_conv(x, self.weight, self.bias)
        return channel_matmul(x, self.weight, self.bias)


class GateBlock(nn.Module):
    """A CUBS block: y = x * gate(x), the gate broadcast over channels (B x C x 1 x 1) or
    positions (B x 1 x H x W). Subclasses define gate()."""

    def gate(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        # The gate comes out in fp32 under autocast (the similarity is fp32 by design; CUDA
        # autocast sums in fp32); x * gate would then promote the whole feature map, and
        # every layer after it, to fp32. In x's dtype it stays what autocast made it.
        return x * self.gate(x).to(x.dtype)


class SimilarityGateBlock(GateBlock):
    """A plain block: its gate comes from similarity_attention, whose range check it can
    defer to the training loop under torch.compile (range_check)."""

    def add_range_flag(self) -> None:
        # Not persistent: the state dict stays that of the parameters and nothing else.
        self.register_buffer("out_of_range", torch.zeros((), dtype=torch.bool), persistent=False)
        self.defer_range_check = False

    def deferred_flag(self) -> Tensor | None:
        return self.out_of_range if self.defer_range_check else None


def range_check(model: nn.Module) -> Callable[[], bool]:
    """Defer the plain blocks' Taylor-range check in compiled code to one read per step.

    Returns check(): True when the last compiled forward pass of `model` met a logit beyond
    TAYLOR_MAX_LOGIT in any plain block (or a negative q or k), so that step used the series
    where it is not exact and must be recomputed in eager mode, which branches exactly.
    One host sync per call; eager forward passes leave the flags as they were. A model
    without plain blocks gets a check that is always False.
    """
    blocks = [m for m in model.modules() if isinstance(m, SimilarityGateBlock)]
    for block in blocks:
        block.defer_range_check = True

    def check() -> bool:
        return bool(torch.stack([b.out_of_range for b in blocks]).any()) if blocks else False
    return check


class PlusGateBlock(GateBlock):
    """The plus variant's gate, 1 + tanh(gamma) * tanh(z / 2) in (0, 2): a learnable scalar
    gamma = 0 at init makes the block the identity."""

    def add_gamma(self) -> None:
        """Register gamma; subclasses call it last, so that the parameter order (and with it
        the optimiser state of a saved run) is that of the projections, then gamma."""
        self.gamma = nn.Parameter(torch.zeros(()))

    def effective_gamma(self) -> Tensor:
        """The modulation's scale, tanh(gamma): |.| < 1 keeps the gate in (0, 2), so a block
        never flips the sign of its residual branch (docs/cubs.md, "Variant plus")."""
        return torch.tanh(self.gamma)


class CUBSBlock1(SimilarityGateBlock):
    """Channel attention from the self-similarity of the pooled descriptor. B x C x H x W -> same.

    gate_logit: the gates' initial logit (GATE_LOGIT_INIT): out_proj starts at zero weights
    and this bias. None leaves out_proj at PyTorch's default init.
    """

    def __init__(self, channels: int, d: int = BLOCK1_D, gate_logit: float | None = GATE_LOGIT_INIT) -> None:
        super().__init__()
        self.q_proj = nn.Linear(channels, d)
        self.k_proj = nn.Linear(channels, d)
        self.v_proj = nn.Linear(channels, d)
        self.out_proj = nn.Linear(d, channels)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.constant_(proj.bias, RELU_BIAS_INIT)
        self.add_range_flag()
        if gate_logit is not None:
            # Zero weights: every channel's gate starts at sigmoid(gate_logit) (+ g, ~0 behind
            # a zero-init BN) instead of a random spread; they get gradients from step one.
            nn.init.zeros_(self.out_proj.weight)
            nn.init.constant_(self.out_proj.bias, gate_logit)

    def gate(self, x: Tensor) -> Tensor:
        """B x C x H x W -> the channel gate, B x C x 1 x 1, in (0, 1)."""
        g = _channel_means(x)                                                   # B x C
        q, k, v = (F.relu(proj(g)) for proj in (self.q_proj, self.k_proj, self.v_proj))  # B x d each
        a = similarity_attention(q, k, v, self.deferred_flag())                 # B x d
        return torch.sigmoid(self.out_proj(a) + g)[:, :, None, None]           # B x C x 1 x 1


class CUBSBlock2(SimilarityGateBlock):
    """Spatial attention from the self-similarity of positions. B x C x H x W -> same.

    gate_logit: v's initial bias, so the gate starts near sigmoid(gate_logit) (None: v's bias
    stays at RELU_BIAS_INIT = 1, as q's and k's).
    """

    def __init__(self, channels: int, gate_logit: float | None = GATE_LOGIT_INIT) -> None:
        super().__init__()
        # Output channels 0, 1, 2 are q, k, v: the same maps as three C->1 convs, but x (the
        # largest tensor here) is read once instead of three times.
        self.qkv = PointwiseConv2d(channels, 3)
        nn.init.constant_(self.qkv.bias, RELU_BIAS_INIT)
        self.add_range_flag()
        if gate_logit is not None:
            with torch.no_grad():
                self.qkv.bias[2] = gate_logit

    def gate(self, x: Tensor) -> Tensor:
        """B x C x H x W -> the spatial gate, B x 1 x H x W, in (0, 1)."""
        b, _, h, w = x.shape                                                    # N = H * W
        q, k, v = F.relu(self.qkv(x)).flatten(2).unbind(1)                      # B x N each
        a = similarity_attention(q, k, v, self.deferred_flag())                 # B x N
        return torch.sigmoid(a).view(b, 1, h, w)                                # B x 1 x H x W


class CUBSBlock1Plus(PlusGateBlock):
    """Block 1, plus variant: multi-head 8-dim similarity, identity at init. B x C x H x W -> same."""

    def __init__(self, channels: int, d: int = BLOCK1_D, heads: int = 4) -> None:
        super().__init__()
        check_plus_d(d, heads)
        self.heads = heads
        self.q_proj = nn.Linear(channels, d)
        self.k_proj = nn.Linear(channels, d)
        self.v_proj = nn.Linear(channels, d)
        self.out_proj = nn.Linear(d, channels)
        self.add_gamma()

    def gate(self, x: Tensor) -> Tensor:
        """B x C x H x W -> the channel gate, B x C x 1 x 1, in (0, 2)."""
        g = _channel_means(x)                                                   # B x C
        b, d = g.shape[0], self.out_proj.in_features                           # d = 8h * L

        def heads(t: Tensor) -> Tensor:  # B x d -> B x h x L x 8, L = d / (8h) tokens
            return t.view(b, -1, self.heads, HEAD_DIM).transpose(1, 2)     # via B x L x h x 8

        q, k, v = (heads(proj(g)) for proj in (self.q_proj, self.k_proj, self.v_proj))  # B x h x L x 8
        a = fused_attention(q, k, v).transpose(1, 2).reshape(b, d)             # B x d
        logit = self.out_proj(a) + g                                           # B x C
        return _identity_preserving_gate(logit[:, :, None, None], self.effective_gamma())  # B x C x 1 x 1


class CUBSBlock2Plus(PlusGateBlock):
    """Block 2, plus variant: h heads of 8 dims over positions, identity at init. B x C x H x W -> same.

    Keys and values come from x average-pooled to at most kv_grid x kv_grid cells
    (kv_grid=None: all N positions); queries and the gate stay at full resolution.
    """

    def __init__(self, channels: int, heads: int = 4, kv_grid: int | None = 8) -> None:
        super().__init__()
        self.heads = heads
        self.kv_grid = kv_grid
        inner = heads * HEAD_DIM
        self.q_proj = nn.Conv2d(channels, inner, 1)
        self.kv_proj = nn.Conv2d(channels, 2 * inner, 1)
        self.out_proj = nn.Conv2d(inner, 1, 1)
        self.add_gamma()

    def gate(self, x: Tensor) -> Tensor:
        """B x C x H x W -> the spatial gate, B x 1 x H x W, in (0, 2)."""
        b, _, h, w = x.shape                                                    # N = H * W
        context = x                                                             # B x C x H x W: M = N
        if self.kv_grid is not None and (h > self.kv_grid or w > self.kv_grid):  # pool to the grid
            grid = (min(h, self.kv_grid), min(w, self.kv_grid))                 # H' x W', M = H'W'
            context = F.adaptive_avg_pool2d(x, grid)                            # B x C x H' x W'

        def heads(t: Tensor) -> Tensor:  # B x 8h x H' x W' -> B x h x H'W' x 8
            return t.flatten(2).view(b, self.heads, HEAD_DIM, -1).transpose(2, 3)  # via B x h x 8 x H'W'

        q = heads(self.q_proj(x))                                               # B x h x N x 8
        k, v = (heads(t) for t in self.kv_proj(context).chunk(2, dim=1))       # B x h x M x 8
        a = fused_attention(q, k, v).transpose(2, 3).reshape(b, -1, h, w)      # B x 8h x H x W
        return _identity_preserving_gate(self.out_proj(a), self.effective_gamma())  # B x 1 x H x W


class CUBSAttention(nn.Module):
    """Block 1 and Block 2 combined by placement; the attention module of one BasicBlock.

    B x C x H x W -> same. placement in PLACEMENTS, variant in VARIANTS; d is Block 1's
    inner size; heads only matters for variant="plus".
    """

    def __init__(
        self,
        channels: int,
        placement: str = "serial",
        variant: str = "plain",
        d: int = BLOCK1_D,
        heads: int = 4,
        gate_logit: float | None = GATE_LOGIT_INIT,
    ) -> None:
        super().__init__()
        _check_choice("placement", placement, PLACEMENTS)
        _check_choice("variant", variant, VARIANTS)
        self.placement = placement
        self.variant = variant
        if variant == "plain":
            channel_block: nn.Module = CUBSBlock1(channels, d, gate_logit)
            spatial_block: nn.Module = CUBSBlock2(channels, gate_logit)
        else:
            channel_block = CUBSBlock1Plus(channels, d, heads)
            spatial_block = CUBSBlock2Plus(channels, heads)
        # Attribute names are the state-dict keys: they record the order, so a checkpoint
        # of one placement cannot be strictly loaded into another.
        if placement == "serial":
            self.first, self.second = channel_block, spatial_block
        elif placement == "reverse":
            self.first, self.second = spatial_block, channel_block
        else:
            self.channel, self.spatial = channel_block, spatial_block

    def forward(self, x: Tensor) -> Tensor:
        if self.placement != "parallel":
            return self.second(self.first(x))
        y = self.channel(x) + self.spatial(x)
        # plus blocks return x * (1 + m); summing two of them counts x twice.
        return y - x if self.variant == "plus" else y


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def cubs_resnet18(
    num_classes: int = 200,
    stem: str = "cifar",
    placement: str = "serial",
    variant: str = "plain",
    width: int = 64,
    d: int = BLOCK1_D,
    gate_logit: float | None = GATE_LOGIT_INIT,
) -> ResNet18:
    """ResNet18 with a CUBSAttention on the residual branch of each of its 8 BasicBlocks.

    gate_logit: initial gate logit of the plain blocks (GATE_LOGIT_INIT, reason there)."""
    _check_choice("placement", placement, PLACEMENTS)
    _check_choice("variant", variant, VARIANTS)
    return ResNet18(
        num_classes=num_classes,
        stem=stem,
        width=width,
        attention=lambda channels: CUBSAttention(channels, placement, variant, d, gate_logit=gate_logit),
    )
