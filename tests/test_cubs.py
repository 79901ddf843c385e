"""CUBS blocks against hand-written materialised versions of the spec (docs/cubs.md)."""

import itertools
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from common import cubs
from common.cubs import (
    PLACEMENTS,
    VARIANTS,
    CUBSAttention,
    CUBSBlock1,
    CUBSBlock1Plus,
    CUBSBlock2,
    CUBSBlock2Plus,
    PlusGateBlock,
    cubs_resnet18,
    fused_attention,
    similarity_attention,
)
from common.models import ResNet18
from tests.reference import naive_attention, naive_similarity_attention

f64 = torch.float64


# ---------------------------------------------------------------- similarity attention


def _plain_inputs(batch, length, largest_logit, zero_share, generator, dtype=torch.float32):
    """q, k >= 0 with max q * max k = largest_logit per sample and `zero_share` exact zeros
    (as ReLU makes), v in [0, 3], and an upstream gradient."""
    q, k = (torch.rand(batch, length, dtype=dtype, generator=generator) for _ in range(2))
    for t in (q, k):
        t[torch.rand(t.shape, generator=generator) < zero_share] = 0
        t.div_(t.amax(1, keepdim=True).clamp_min(1e-30)).mul_(math.sqrt(largest_logit))
    v = torch.rand(batch, length, dtype=dtype, generator=generator) * 3
    return q, k, v, torch.randn(batch, length, dtype=dtype, generator=generator)


def _relative_errors(attention, q, k, v, upstream):
    """||out - ref|| / ||ref|| of a and of its q, k, v gradients, ref = float64 naive attention."""
    reference_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    reference = naive_similarity_attention(*reference_inputs)
    reference_grads = torch.autograd.grad(reference, reference_inputs, upstream.double())
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*inputs)
    grads = torch.autograd.grad(out, inputs, upstream)
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    # An exactly zero reference (one position: a = v, no q or k gradient) must be met exactly.
    rel = lambda a, b: ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()  # noqa: E731
    return [rel(out, reference)] + [rel(g, r) for g, r in zip(grads, reference_grads)]


def _paths_taken(q, k, v):
    """Which kernels similarity_attention ran: 'taylor' (no SDPA call) or 'fused'."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        similarity_attention(q, k, v)
    return "fused" if any("scaled_dot_product" in e.key for e in prof.key_averages()) else "taylor"


def test_taylor_error_bound_is_below_fp32_rounding():
    # Each weight exp(q_i k_j) is underestimated by at most (X^p / p!) of itself, and each
    # weight's derivative (the first p - 1 terms) by at most X^(p-1) / (p-1)!.
    x, p = cubs.TAYLOR_MAX_LOGIT, cubs.TAYLOR_TERMS
    assert x ** (p - 1) / math.factorial(p - 1) < 2.0 ** -24 <= x ** (p - 2) / math.factorial(p - 2)


@pytest.mark.parametrize("largest_logit", [0.0, 1e-12, 0.01, 0.5, 1.0, 1.14, 2.0, 4.0, 7.4, 7.5])
def test_taylor_terms_is_the_fewest_that_meet_the_bound(largest_logit):
    # Brute force with exact factorials: the first p >= 2 with X^(p-1) / (p-1)! < 2^-24.
    expected = next(p for p in range(2, 100)
                    if largest_logit ** (p - 1) / math.factorial(p - 1) < 2.0 ** -24)
    assert cubs.taylor_terms(largest_logit) == expected
    assert cubs.taylor_terms(largest_logit) <= cubs.TAYLOR_TERMS == 33


# Logit ranges on both sides of TAYLOR_MAX_LOGIT (7.5): 0.01-7.4 take the Taylor series,
# 7.6 and 900 the fused fallback. Odd lengths; 60 % exact zeros in q and k. At logits of
# 900 an fp32 rounding of q or k moves exp(q k) by ~900 ulps: the fused kernel's error
# there is 1.2e-6 (a), hence the looser bound.
@pytest.mark.parametrize("largest_logit, path, tolerance", [
    (0.01, "taylor", 1e-6), (1.0, "taylor", 1e-6), (4.0, "taylor", 1e-6), (7.4, "taylor", 1e-6),
    (7.6, "fused", 1e-6), (900.0, "fused", 1e-5)])
def test_similarity_attention_matches_float64_naive_in_values_and_every_gradient(largest_logit, path,
                                                                                 tolerance):
    generator = torch.Generator().manual_seed(int(largest_logit * 100))
    q, k, v, upstream = _plain_inputs(3, 1001, largest_logit, 0.6, generator)
    assert _paths_taken(q, k, v) == path
    errors = _relative_errors(similarity_attention, q, k, v, upstream)
    # fp32 arithmetic: measured <= 2.5e-8 (a) and <= 5e-6 (gradients) on the Taylor path.
    assert errors[0] < tolerance, errors
    assert max(errors[1:]) < 1e-4, errors


# Relative errors (a, dq, dk, dv) against float64 of PyTorch's fused CPU kernel on the inputs
# below (AMD EPYC VM, 2026-12-05): 9.6e-8, 1.4e-5, 1.1e-6, 1.5e-6; the Taylor path's: 2.5e-8,
# 8.8e-7, 2.2e-7, 1.0e-6. Fixed bounds at the fused kernel's level, not its error on the CPU
# at hand: its vectorised exp differs by instruction set.
FUSED_LEVEL = (1e-7, 5e-6, 5e-6, 5e-6)


def test_taylor_path_is_as_accurate_as_the_fused_kernel():
    generator = torch.Generator().manual_seed(5)
    q, k, v, upstream = _plain_inputs(4, 4096, 4.0, 0.4, generator)
    taylor = _relative_errors(cubs.taylor_similarity_attention, q, k, v, upstream)
    assert all(t < bound for t, bound in zip(taylor, FUSED_LEVEL)), taylor


def test_similarity_attention_in_float64_is_exact_to_the_series_fp32_truncation():
    generator = torch.Generator().manual_seed(6)
    q, k, v, upstream = _plain_inputs(2, 37, 5.0, 0.3, generator, dtype=f64)
    errors = _relative_errors(similarity_attention, q, k, v, upstream)
    # Taylor truncation (< 2^-24 of each weight) dominates float64 rounding here.
    assert max(errors) < 1e-7, errors


@pytest.mark.parametrize("case", ["all_zero_q", "all_zero_k", "one_position", "negative_q", "negative_k",
                                  "one_sample_out_of_range"])
def test_similarity_attention_edge_cases(case):
    generator = torch.Generator().manual_seed(7)
    q, k, v, upstream = _plain_inputs(2, 1 if case == "one_position" else 50,
                                      0.5 if case == "one_sample_out_of_range" else 2.0, 0.3, generator)
    if case == "all_zero_q":
        q.zero_()  # every query sees uniform weights: a_i = mean(v) (the q gradient is not zero)
    elif case == "all_zero_k":
        k.zero_()
    elif case == "negative_q":  # outside the series' condition: the fused path, still exact
        q = q - 1.0
        assert _paths_taken(q, k, v) == "fused"
    elif case == "negative_k":
        k = k - 1.0
        assert _paths_taken(q, k, v) == "fused"
    elif case == "one_sample_out_of_range":  # the batch's largest logit decides, not its mean
        q[1], k[1] = q[1] * math.sqrt(24), k[1] * math.sqrt(24)  # sample 1's largest logit: 12
        assert _paths_taken(q, k, v) == "fused"
    errors = _relative_errors(similarity_attention, q, k, v, upstream)
    assert errors[0] < 1e-6 and max(errors[1:]) < 1e-4, errors


@pytest.mark.parametrize("largest_logit, flush_denormal", [(1.0, False), (1e-7, False), (1.0, True)])
def test_an_all_zero_q_beside_another_sample_keeps_an_exact_q_gradient(largest_logit, flush_denormal):
    # Sample 0's q is all zero, sample 1 sets the batch's largest logit X. Scaling k by
    # s = max q (clamped to the smallest normal) made sample 0's keys subnormal: its q
    # gradient was off by 1.2e-3 at X = 1e-7, and 0 where denormals are flushed.
    generator = torch.Generator().manual_seed(12)
    q, k, v, upstream = _plain_inputs(2, 40, largest_logit, 0.3, generator)
    q[0] = 0.0
    if flush_denormal and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals (x86 with SSE3 can)")
    try:
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        d_q = torch.autograd.grad(similarity_attention(*inputs), inputs[0], upstream)[0]
    finally:
        torch.set_flush_denormal(False)
    reference_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    exact = torch.autograd.grad(naive_similarity_attention(*reference_inputs), reference_inputs[0],
                                upstream.double())[0]
    assert exact[0].norm() > 1e-6  # a gradient to get right
    assert ((d_q[0].double() - exact[0]).norm() / exact[0].norm()).item() < 1e-6


@pytest.mark.parametrize("dtype, k_max", [(torch.float32, 3e38), (torch.float32, 1e9), (f64, 1e300)])
def test_an_all_zero_q_batch_with_huge_keys_stays_finite(dtype, k_max):
    # Every q zero (the batch's largest logit 0, so X = 1e-30) and k up to k_max: the keys'
    # scale X / max k underflowed to 0 and gave 0 / 0 (found by a review of the fix above).
    q = torch.zeros(2, 7, dtype=dtype)
    k = torch.linspace(0, 1, 7, dtype=dtype).repeat(2, 1) * k_max
    v = torch.arange(14, dtype=dtype).view(2, 7)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = similarity_attention(*inputs)
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    torch.testing.assert_close(out, v.mean(1, keepdim=True).expand(2, 7))  # uniform weights
    assert all(torch.isfinite(g).all() for g in grads)


def test_similarity_attention_runs_in_fp32_under_autocast():
    generator = torch.Generator().manual_seed(8)
    q, k, v, _ = _plain_inputs(2, 64, 3.0, 0.3, generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = similarity_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.float32
    exact = naive_similarity_attention(*(t.bfloat16().double() for t in (q, k, v)))
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=1e-6)


def test_compiled_similarity_attention_takes_either_branch_without_recompiling():
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    compiled = torch.compile(similarity_attention, backend=counter, fullgraph=True)
    generator = torch.Generator().manual_seed(9)
    for largest_logit in (2.0, 50.0, 0.5):  # Taylor, fused, Taylor
        q, k, v, upstream = _plain_inputs(2, 65, largest_logit, 0.3, generator)
        errors = _relative_errors(compiled, q, k, v, upstream)
        assert errors[0] < 1e-6 and max(errors[1:]) < 1e-4, (largest_logit, errors)
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_guard_takes_the_cuda_layout_of_the_fused_branch(backend, monkeypatch):
    # On CUDA the fused branch pads the head dim to 8, so its slice has stride 8; torch.cond
    # wants both branches' outputs alike (on CUDA it refuses the strided one). Here the CPU
    # runs that CUDA branch, compiled as the scripts compile it. Without C++ vectorisation,
    # which a GPU does not run and which doubled this build's time (27 s against 14 s).
    fused = cubs.fused_attention
    monkeypatch.setattr(cubs, "fused_attention", lambda *a, **kw: fused(*a, **{**kw, "pad_head_dim": True}))
    compiled = torch.compile(similarity_attention, backend=backend, fullgraph=True)
    generator = torch.Generator().manual_seed(10)
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        for largest_logit in (50.0, 2.0):  # fused, then Taylor
            q, k, v, upstream = _plain_inputs(2, 33, largest_logit, 0.3, generator)
            errors = _relative_errors(compiled, q, k, v, upstream)
            assert errors[0] < 1e-6 and max(errors[1:]) < 1e-4, (largest_logit, errors)


def test_deferred_range_check_flags_exactly_the_steps_the_series_cannot_take():
    # cubs.range_check: compiled code always takes the series and writes the flag; the
    # flag must be set exactly when the guard would have taken the fused kernel.
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    torch.manual_seed(0)
    block = CUBSBlock2(4)
    check = cubs.range_check(block)
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    x = torch.rand(2, 4, 5, 5)
    for scale, out_of_range in ((0.1, False), (300.0, True), (0.1, False)):
        out = compiled(x * scale)
        assert check() is out_of_range, scale
        if not out_of_range:  # in range: the series is the exact path
            torch.testing.assert_close(out, block(x * scale), rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1
    # Eager passes branch exactly and leave the flag alone.
    block(x * 300.0)
    assert check() is False
    assert cubs.range_check(ResNet18(10, width=8))() is False  # no plain blocks
    assert "out_of_range" not in block.state_dict()


@pytest.mark.parametrize("form", ["eager matmuls", "compiled sums"])
@pytest.mark.parametrize("largest_logit", [0.01, 1.0, 7.4])
def test_both_forms_of_the_series_match_float64_naive(form, largest_logit, monkeypatch):
    # Eager mode on the CPU runs _TaylorRatio (written-out backward) with the term count of
    # the batch's largest logit; torch.compile traces _taylor_ratio_by_sums with all 33
    # terms. Here both run eagerly on the same inputs, each with its own term count.
    if form == "compiled sums":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        attention = cubs.taylor_similarity_attention
    else:
        attention = lambda q, k, v: cubs.taylor_similarity_attention(  # noqa: E731
            q, k, v, float((q.amax(1) * k.amax(1)).amax().detach()))
    generator = torch.Generator().manual_seed(int(largest_logit * 100) + 11)
    q, k, v, upstream = _plain_inputs(3, 1001, largest_logit, 0.6, generator)
    errors = _relative_errors(attention, q, k, v, upstream)
    assert errors[0] < 1e-7 and max(errors[1:]) < 5e-6, errors


@pytest.mark.parametrize("form", ["eager matmuls", "compiled sums"])
def test_series_is_exact_for_a_large_q_against_an_all_zero_k(form, monkeypatch):
    # Every logit is 0, so a = mean v. The scaling k s / X must not form s / X first:
    # with X floored at 1e-30 and s = 1e10 that quotient overflows fp32 (inf * 0 = nan).
    if form == "compiled sums":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    q = torch.full((2, 5), 1e10)
    k = torch.zeros(2, 5)
    v = torch.arange(10.0).view(2, 5)
    out = cubs.taylor_similarity_attention(q, k, v, 0.0)
    torch.testing.assert_close(out, v.mean(1, keepdim=True).expand(2, 5), rtol=0, atol=1e-6)


@pytest.mark.parametrize("form", ["eager matmuls", "compiled sums"])
def test_series_is_exact_for_a_large_q_against_a_small_k(form, monkeypatch):
    # The largest logit is 1, so 12 terms: q^11 overflows fp32 (1e66) and k^11 underflows
    # (1e-66) unless q is divided by s = max q first and k multiplied by it (q_i k_j is unchanged).
    if form == "compiled sums":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    q = torch.tensor([[1e6, 5e5, 0.0, 2e5]])
    k = torch.tensor([[1e-6, 3e-7, 0.0, 5e-7]])
    v = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out = cubs.taylor_similarity_attention(q, k, v, 1.0)
    exact = naive_similarity_attention(q.double(), k.double(), v.double()).float()
    torch.testing.assert_close(out, exact, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cubs.similarity_attention(q, k, v), exact, rtol=1e-6, atol=1e-6)


def test_taylor_terms_refuses_logits_outside_the_series_range():
    for bad in (-0.1, cubs.TAYLOR_MAX_LOGIT + 0.01, math.inf, math.nan):
        with pytest.raises(ValueError, match="largest logit"):
            cubs.taylor_terms(bad)


def test_taylor_ratio_backward_stays_fp32_inside_autocast():
    # backward() called within a bf16 autocast region must give the fp32 gradients.
    generator = torch.Generator().manual_seed(4)
    query, key, value, upstream = (torch.rand(2, 300, generator=generator) for _ in range(4))
    n = torch.arange(12, dtype=torch.float32)
    coeff = torch.exp(-torch.lgamma(n + 1))                                         # X = 1
    inputs = [t.requires_grad_() for t in (query, key, value)]
    outside = torch.autograd.grad(cubs._TaylorRatio.apply(*inputs, coeff), inputs, upstream)
    out = cubs._TaylorRatio.apply(*inputs, coeff)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = torch.autograd.grad(out, inputs, upstream)
    for a, b in zip(inside, outside):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_taylor_ratio_backward_passes_gradcheck_and_equals_the_sums_form():
    generator = torch.Generator().manual_seed(12)
    # In [0, 1] as taylor_similarity_attention scales them, with exact zeros; value signed.
    query, key = (torch.rand(2, 23, dtype=f64, generator=generator) for _ in range(2))
    query[0, :5] = 0
    key[1, 3:9] = 0
    value = torch.randn(2, 23, dtype=f64, generator=generator)
    n = torch.arange(cubs.TAYLOR_TERMS, dtype=f64)
    coeff = torch.exp(n * math.log(cubs.TAYLOR_MAX_LOGIT) - torch.lgamma(n + 1))
    inputs = [t.requires_grad_() for t in (query, key, value)]
    assert torch.autograd.gradcheck(lambda *t: cubs._TaylorRatio.apply(*t, coeff), inputs)
    upstream = torch.randn(2, 23, dtype=f64, generator=generator)
    eager = cubs._TaylorRatio.apply(*inputs, coeff)
    sums = cubs._taylor_ratio_by_sums(*inputs, coeff)
    for a, b in zip([eager, *torch.autograd.grad(eager, inputs, upstream)],
                    [sums, *torch.autograd.grad(sums, inputs, upstream)]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_similarity_attention_passes_gradcheck():
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.rand(2, 9, dtype=f64, generator=generator).requires_grad_() for _ in range(3)]
    assert torch.autograd.gradcheck(similarity_attention, inputs)


# ---------------------------------------------------------------- fused kernel


def test_multi_head_fused_attention_matches_naive_with_different_query_and_key_lengths():
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 20, 8, dtype=f64, generator=generator).requires_grad_()
    k = torch.randn(2, 3, 7, 8, dtype=f64, generator=generator).requires_grad_()
    v = torch.randn(2, 3, 7, 8, dtype=f64, generator=generator).requires_grad_()
    for scale in (None, 1.0):
        fused = fused_attention(q, k, v, scale)
        naive = naive_attention(q, k, v, scale)
        torch.testing.assert_close(fused, naive, rtol=1e-10, atol=1e-10)
        grads = [torch.autograd.grad(out.sum(), (q, k, v)) for out in (fused, naive)]
        for fused_grad, naive_grad in zip(*grads):
            torch.testing.assert_close(fused_grad, naive_grad, rtol=1e-9, atol=1e-9)
    default = naive_attention(q, k, v, 1 / math.sqrt(8))
    torch.testing.assert_close(fused_attention(q, k, v), default, rtol=1e-10, atol=1e-10)


def test_fused_attention_accepts_non_contiguous_inputs():
    x = torch.randn(2, 3, 8, 10, dtype=f64)
    q = k = v = x.transpose(2, 3)  # last-dim stride 10: SDPA's fused kernels refuse it as is
    torch.testing.assert_close(fused_attention(q, k, v), naive_attention(q, k, v))


def test_zero_padding_the_head_dim_leaves_attention_unchanged():
    # The CUDA path pads head dim 1 to 8; check the arithmetic claim on CPU.
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.rand(2, 1, 30, 1, dtype=f64, generator=generator) * 5 for _ in range(3))
    padded = [F.pad(t, (0, 7)) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*padded, scale=1.0)
    torch.testing.assert_close(out[..., :1], naive_attention(q, k, v, 1.0))
    assert torch.all(out[..., 1:] == 0)


@pytest.mark.parametrize("form", ["padded_pointwise_conv", "channel_matmul"])
def test_both_forms_of_the_pointwise_projection_are_conv2d_in_values_and_gradients(form):
    # Block 2's q, k, v projection runs padded on CUDA and as an einsum elsewhere; both
    # forms are checked here on the CPU against conv2d, with 3 outputs and an odd C.
    generator = torch.Generator().manual_seed(5)
    x, weight, bias = (torch.randn(*shape, dtype=f64, generator=generator, requires_grad=True)
                       for shape in ((2, 5, 7, 6), (3, 5, 1, 1), (3,)))
    out = getattr(cubs, form)(x, weight, bias)
    expected = F.conv2d(x, weight, bias)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(expected.shape, dtype=f64, generator=generator)
    for got, want in zip(torch.autograd.grad(out, (x, weight, bias), upstream),
                         torch.autograd.grad(expected, (x, weight, bias), upstream)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Same parameters as the nn.Conv2d it replaces, so checkpoints load either way.
    conv = nn.Conv2d(5, 3, 1)
    assert {k: v.shape for k, v in cubs.PointwiseConv2d(5, 3).state_dict().items()} == \
        {k: v.shape for k, v in conv.state_dict().items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_attention_on_cuda_matches_naive():
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.rand(2, 1, 300, 1, generator=generator).cuda() * 4 for _ in range(3))
    expected = naive_attention(q.double(), k.double(), v.double(), 1.0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fused_attention(q, k, v, 1.0)
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_similarity_attention_on_cuda_keeps_fp32_accuracy_with_tf32_matmuls_allowed(monkeypatch):
    # A user's code may allow TF32 matmuls (runtime.setup_runtime turns them off); the
    # series must not run in them.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    generator = torch.Generator().manual_seed(6)
    q, k, v, upstream = (t.cuda() for t in _plain_inputs(3, 1001, 1.0, 0.6, generator))
    errors = _relative_errors(similarity_attention, q, k, v, upstream)
    assert errors[0] < 1e-7 and max(errors[1:]) < 5e-6, errors


@pytest.mark.parametrize("make_block", [lambda: CUBSBlock1(8, d=16), lambda: CUBSBlock2(8),
                                        lambda: CUBSBlock1Plus(8, d=64), lambda: CUBSBlock2Plus(8)])
def test_blocks_never_run_the_materialising_math_path(make_block):
    # Plain blocks: the Taylor series (no SDPA) at these logits (q, k near their bias of 1,
    # far below TAYLOR_MAX_LOGIT); plus blocks: the flash kernel.
    torch.manual_seed(0)
    block = make_block()
    x = (0.1 * torch.randn(2, 8, 12, 12)).requires_grad_()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        block(x).sum().backward()
    ops = {event.key for event in prof.key_averages()}
    plus = isinstance(block, (CUBSBlock1Plus, CUBSBlock2Plus))
    assert ("aten::_scaled_dot_product_flash_attention_for_cpu" in ops) == plus
    assert ("aten::_scaled_dot_product_flash_attention_for_cpu_backward" in ops) == plus
    assert "aten::_scaled_dot_product_attention_math" not in ops


# ---------------------------------------------------------------- blocks vs spec


def _naive_block1(block: CUBSBlock1, x: torch.Tensor) -> torch.Tensor:
    g = x.mean(dim=(2, 3))
    q = torch.relu(g @ block.q_proj.weight.T + block.q_proj.bias)
    k = torch.relu(g @ block.k_proj.weight.T + block.k_proj.bias)
    v = torch.relu(g @ block.v_proj.weight.T + block.v_proj.bias)
    similarity = torch.einsum("bi,bj->bij", q, k)  # B x d x d, materialised
    a = torch.einsum("bij,bj->bi", torch.softmax(similarity, dim=2), v)
    gate = torch.sigmoid(a @ block.out_proj.weight.T + block.out_proj.bias + g)
    return x * gate[:, :, None, None]


def _naive_block2(block: CUBSBlock2, x: torch.Tensor) -> torch.Tensor:
    b, _, h, w = x.shape
    weight, bias = block.qkv.weight[:, :, 0, 0], block.qkv.bias
    q, k, v = (torch.relu(torch.einsum("bcn,c->bn", x.flatten(2), weight[i]) + bias[i]) for i in range(3))
    similarity = torch.einsum("bi,bj->bij", q, k)  # B x N x N, materialised
    a = torch.einsum("bij,bj->bi", torch.softmax(similarity, dim=2), v)
    return x * torch.sigmoid(a).view(b, 1, h, w)


def _naive_block1_plus(block: CUBSBlock1Plus, x: torch.Tensor) -> torch.Tensor:
    g = x.mean(dim=(2, 3))
    b, heads = g.shape[0], block.heads
    q, k, v = (
        (g @ proj.weight.T + proj.bias).view(b, -1, heads, 8)  # B x tokens x heads x 8
        for proj in (block.q_proj, block.k_proj, block.v_proj)
    )
    weights = torch.softmax(torch.einsum("bihe,bjhe->bhij", q, k) / math.sqrt(8), dim=3)
    a = torch.einsum("bhij,bjhe->bihe", weights, v).reshape(b, -1)
    logit = a @ block.out_proj.weight.T + block.out_proj.bias + g
    return x * (1 + torch.tanh(block.gamma) * (2 * torch.sigmoid(logit) - 1))[:, :, None, None]


def _naive_block2_plus(block: CUBSBlock2Plus, x: torch.Tensor) -> torch.Tensor:
    b, _, h, w = x.shape
    context = x if block.kv_grid is None else F.adaptive_avg_pool2d(x, (min(h, block.kv_grid), min(w, block.kv_grid)))
    inner = 8 * block.heads
    q = F.conv2d(x, block.q_proj.weight, block.q_proj.bias).flatten(2)  # B x 8h x N
    kv = F.conv2d(context, block.kv_proj.weight, block.kv_proj.bias).flatten(2)
    k, v = kv[:, :inner], kv[:, inner:]  # B x 8h x M
    q, k, v = (t.reshape(b, block.heads, 8, -1) for t in (q, k, v))
    weights = torch.softmax(torch.einsum("bhen,bhem->bhnm", q, k) / math.sqrt(8), dim=3)  # N x M per head
    a = torch.einsum("bhnm,bhem->bhen", weights, v).reshape(b, inner, h, w)
    logit = F.conv2d(a, block.out_proj.weight, block.out_proj.bias)
    return x * (1 + torch.tanh(block.gamma) * (2 * torch.sigmoid(logit) - 1))


def _double_with_random_weights(block: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    block = block.double()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, dtype=f64, generator=generator) * 0.5)
    return block


@pytest.mark.parametrize(
    "block, naive",
    [
        (CUBSBlock1(6, d=24), _naive_block1),
        (CUBSBlock2(6), _naive_block2),
        (CUBSBlock1Plus(6, d=32, heads=2), _naive_block1_plus),
        (CUBSBlock2Plus(6, heads=2, kv_grid=None), _naive_block2_plus),
        (CUBSBlock2Plus(6, heads=2, kv_grid=4), _naive_block2_plus),
    ],
    ids=["block1", "block2", "block1_plus", "block2_plus_all_positions", "block2_plus_pooled_keys"],
)
def test_block_equals_materialised_spec(block, naive):
    block = _double_with_random_weights(block)
    x = torch.randn(3, 6, 9, 11, dtype=f64, generator=torch.Generator().manual_seed(5)) * 2
    expected = naive(block, x)
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(expected, x)  # the gate does something


@pytest.mark.parametrize("shape", [(2, 6, 3, 11), (2, 6, 11, 3)], ids=["wide", "tall"])
def test_block2_plus_pools_keys_when_only_one_side_exceeds_the_grid(shape):
    block = _double_with_random_weights(CUBSBlock2Plus(6, heads=2, kv_grid=4))
    x = torch.randn(shape, dtype=f64, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(block(x), _naive_block2_plus(block, x), rtol=1e-10, atol=1e-10)


def test_plain_gates_start_open_at_sigmoid_of_the_gate_logit():
    # Block 2: q = k = ReLU(bias 1), v = ReLU(bias gate_logit) on a zero input, so a = v.
    # Block 1: out_proj starts at zero weights and the gate-logit bias, so the gate is
    # sigmoid(gate_logit + the channel's mean), whatever q, k and v are. The default gate
    # logit is 3 (gates open at 0.95, docs/cubs.md), which T3's recipe relies on.
    block2 = CUBSBlock2(4)
    with torch.no_grad():
        gate = block2.gate(torch.zeros(1, 4, 5, 5))
    torch.testing.assert_close(gate, torch.full((1, 1, 5, 5), 1 / (1 + math.exp(-3.0))))
    block1 = CUBSBlock1(8, d=16)
    x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(block1.gate(x)[:, :, 0, 0], torch.sigmoid(3.0 + x.mean((2, 3))))


def test_padding_the_head_dim_returns_the_callers_head_dim():
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 1, 5, 3, dtype=f64, generator=generator) for _ in range(3))
    out = fused_attention(q, k, v, pad_head_dim=True)
    assert out.shape == (2, 1, 5, 3)
    torch.testing.assert_close(out, naive_attention(q, k, v, 1 / math.sqrt(3)))


def test_plain_block2_at_64x64_matches_naive():
    # N = 4096: the size of stage 1; the naive version stores 4096 x 4096.
    block = _double_with_random_weights(CUBSBlock2(4))
    x = torch.randn(1, 4, 64, 64, dtype=f64, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(block(x), _naive_block2(block, x), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- placements


def _channel_and_spatial(attention: CUBSAttention) -> tuple[nn.Module, nn.Module]:
    channel = [m for m in attention.children() if isinstance(m, (CUBSBlock1, CUBSBlock1Plus))]
    spatial = [m for m in attention.children() if isinstance(m, (CUBSBlock2, CUBSBlock2Plus))]
    assert len(channel) == len(spatial) == 1
    return channel[0], spatial[0]


def _attention_sharing_weights(placement: str, variant: str, source: CUBSAttention) -> CUBSAttention:
    attention = CUBSAttention(8, placement, variant, d=64).double()
    for target, origin in zip(_channel_and_spatial(attention), _channel_and_spatial(source)):
        target.load_state_dict(origin.state_dict())
    return attention


@pytest.mark.parametrize("variant", VARIANTS)
def test_placements_compute_their_formula_and_differ(variant):
    source = _double_with_random_weights(CUBSAttention(8, "serial", variant, d=64), seed=7)
    channel, spatial = _channel_and_spatial(source)
    x = torch.randn(2, 8, 16, 16, dtype=f64, generator=torch.Generator().manual_seed(8))
    both = channel(x) + spatial(x)
    expected = {
        "serial": spatial(channel(x)),
        "reverse": channel(spatial(x)),
        "parallel": both - x if variant == "plus" else both,
    }
    outputs = {p: _attention_sharing_weights(p, variant, source)(x) for p in PLACEMENTS}
    for placement in PLACEMENTS:
        torch.testing.assert_close(outputs[placement], expected[placement], rtol=1e-12, atol=1e-12)
    for a, b in itertools.combinations(PLACEMENTS, 2):
        assert not torch.allclose(outputs[a], outputs[b], rtol=1e-6, atol=1e-6), (a, b)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("placement, variant", list(itertools.product(PLACEMENTS, VARIANTS)))
def test_every_cubs_parameter_gets_a_nonzero_gradient(placement, variant, threads):
    # Deterministic kernels and two thread counts: a gradient that exists only through
    # rounding noise (e.g. q, k of a one-token softmax) would differ between CPUs.
    old_threads, old_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(9)
        attention = CUBSAttention(8, placement, variant, d=64).double()
        with torch.no_grad():
            for name, p in attention.named_parameters():
                if name.endswith("gamma"):
                    p.fill_(0.7)  # at gamma = 0 only gamma itself can receive a gradient
                elif variant == "plain" and name.endswith("out_proj.weight"):
                    p.normal_(0, 0.3)  # starts at 0 (open gates): only it gets a gradient then
        x = torch.randn(2, 8, 16, 16, dtype=f64)  # 16x16 > kv_grid: pooled keys in plus
        (attention(x) * torch.randn_like(x)).sum().backward()
        for name, p in attention.named_parameters():
            # float64: rounding noise is ~1e-16, so 1e-10 is a real gradient. (Plain Block 1's
            # q, k gradients are small, ~1e-5 here: q, k, v all start near ReLU(1) = 1.)
            assert p.grad is not None and p.grad.abs().max() > 1e-10, (name, p.grad.abs().max())
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_deterministic)


@pytest.mark.parametrize("d, heads", [(32, 4), (48, 4), (8, 1), (12, 1)])
def test_block1_plus_refuses_d_that_leaves_fewer_than_two_tokens(d, heads):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        CUBSBlock1Plus(8, d=d, heads=heads)


def test_block1_plus_q_and_k_matter_with_two_tokens():
    # The smallest accepted d: 2 tokens per head, so the softmax depends on q and k.
    torch.manual_seed(0)
    block = CUBSBlock1Plus(8, d=16, heads=1).double()
    with torch.no_grad():
        block.gamma.fill_(1.0)
    x = torch.randn(3, 8, 4, 4, dtype=f64)
    before = block(x)
    with torch.no_grad():
        block.q_proj.weight.mul_(3.0)
    assert (block(x) - before).abs().max() > 1e-6


def test_every_cubs_parameter_gets_a_gradient_inside_resnet():
    torch.manual_seed(10)
    # zero_init_residual=False: with gamma_bn2 = 0 the attention input is 0 at step one.
    model = ResNet18(width=8, attention=lambda c: CUBSAttention(c, d=32), zero_init_residual=False)
    _first_steps_out_proj(model)
    model(torch.randn(2, 3, 32, 32)).logsumexp(dim=1).sum().backward()
    names = [name for name, _ in model.named_parameters() if ".attention." in name]
    assert len(names) == 8 * 10  # 8 blocks x (4 linears + 1 conv) x (weight, bias)
    for name, p in model.named_parameters():
        if ".attention." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def _first_steps_out_proj(model: nn.Module) -> None:
    # Block 1's out_proj weight starts at 0 (open gates): q, k, v get their first gradient
    # once a step has moved it. Small random values stand for that step.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CUBSBlock1):
                m.out_proj.weight.normal_(0, 0.01)


@pytest.mark.parametrize("seed", range(3))
def test_plain_relu_units_are_alive_from_the_first_steps_of_real_training(seed):
    # With zero-init residual BNs the attention input is ~0 in the first steps, so
    # q, k, v = ReLU(bias): with PyTorch's default signed bias init, about half of the
    # Block 2 maps (each a single unit) and Block 1 units start dead and get no gradient.
    # The plain blocks start their q/k/v biases at 1 so every unit is in its linear range.
    torch.manual_seed(seed)
    model = cubs_resnet18(10, width=8, d=32)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "bn2"):
                m.bn2.weight.fill_(0.05)  # what the first SGD steps make of gamma = 0
    _first_steps_out_proj(model)
    pre_activations = []
    for m in model.modules():
        if isinstance(m, CUBSBlock2):
            m.qkv.register_forward_hook(lambda mod, inp, out: pre_activations.append(out))
        if isinstance(m, CUBSBlock1):
            for proj in (m.q_proj, m.k_proj, m.v_proj):
                proj.register_forward_hook(lambda mod, inp, out: pre_activations.append(out))
    model(torch.randn(4, 3, 32, 32)).logsumexp(dim=1).sum().backward()
    assert len(pre_activations) == 8 * 4
    for z in pre_activations:
        assert (z > 0).all()
    for name, p in model.named_parameters():
        if ".attention." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_plus_attention_is_the_identity_at_init_and_only_gamma_gets_a_gradient():
    torch.manual_seed(11)
    attention = CUBSAttention(8, "serial", "plus", d=64)
    x = torch.randn(2, 8, 16, 16)
    y = attention(x)
    assert torch.equal(y, x)
    (y * torch.randn_like(x)).sum().backward()
    for name, p in attention.named_parameters():
        assert (p.grad.abs().sum() > 0) == name.endswith("gamma"), name


def _unbounded(module: nn.Module) -> nn.Module:
    """`module` with every plus block's scale gamma itself instead of tanh(gamma): the variant
    before the bound, as bench/at_par_ablation.py's `plusraw` builds it."""
    for block in module.modules():
        if isinstance(block, PlusGateBlock):
            block.effective_gamma = types.MethodType(lambda self: self.gamma, block)
    return module


@pytest.mark.parametrize("block", [CUBSBlock1Plus(6, d=32, heads=2), CUBSBlock2Plus(6, heads=2)],
                         ids=["block1_plus", "block2_plus"])
def test_plus_gate_stays_in_0_2_however_large_gamma_grows(block):
    # The modulation's scale is tanh(gamma): the gate is in (0, 2), so it never flips the sign
    # of a residual branch. Without the bound (the ablation's plusraw) the same weights give
    # negative gates as soon as |gamma| > 1, which training reached (docs/cubs.md).
    block = _double_with_random_weights(block)
    x = torch.randn(3, 6, 9, 11, dtype=f64, generator=torch.Generator().manual_seed(5)) * 4
    with torch.no_grad():
        block.gamma.fill_(-3.0)
    bounded = block.gate(x)
    assert bounded.min() > 0 and bounded.max() < 2
    torch.testing.assert_close(block.effective_gamma(), torch.tanh(torch.tensor(-3.0, dtype=f64)))
    assert _unbounded(block).gate(x).min() < 0


def test_bounded_gamma_starts_exactly_like_the_unbounded_one():
    # tanh(0) = 0 and tanh'(0) = 1: at init the bound changes neither the output (identity)
    # nor gamma's gradient, so it only acts once |gamma| has grown.
    grads = []
    for bound in (True, False):
        torch.manual_seed(11)
        attention = CUBSAttention(8, "serial", "plus", d=64)
        if not bound:
            _unbounded(attention)
        x = torch.randn(2, 8, 16, 16)
        y = attention(x)
        assert torch.equal(y, x)
        (y * torch.randn_like(x)).sum().backward()
        grads.append([attention.first.gamma.grad, attention.second.gamma.grad])
    for bounded, unbounded in zip(*grads):
        assert bounded != 0 and torch.equal(bounded, unbounded)


# ---------------------------------------------------------------- in ResNet-18


@pytest.mark.parametrize("placement, variant", list(itertools.product(PLACEMENTS, VARIANTS)))
def test_cubs_resnet_starts_from_the_vanilla_tensors_of_the_same_seed(placement, variant):
    # T3 against T2 is then paired: the two runs differ only by the attention modules.
    torch.manual_seed(5)
    vanilla = ResNet18(10, width=8).state_dict()
    torch.manual_seed(5)
    cubs = cubs_resnet18(10, placement=placement, variant=variant, width=8, d=64).state_dict()
    assert set(cubs) - set(vanilla) == {k for k in cubs if ".attention." in k} != set()
    for key, tensor in vanilla.items():
        assert torch.equal(cubs[key], tensor), key
    torch.manual_seed(6)  # and a different seed draws different tensors
    assert not torch.equal(ResNet18(10, width=8).state_dict()["layer1.0.conv1.weight"],
                           vanilla["layer1.0.conv1.weight"])


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_cubs_resnet_plus_is_exactly_vanilla_resnet_at_init(placement):
    torch.manual_seed(12)
    vanilla = ResNet18(width=8, zero_init_residual=False)  # non-zero residual branches
    with torch.no_grad():
        for m in vanilla.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    plus = cubs_resnet18(placement=placement, variant="plus", width=8, d=64)
    missing, unexpected = plus.load_state_dict(vanilla.state_dict(), strict=False)
    assert unexpected == [] and missing and all(".attention." in key for key in missing)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for mode in (False, True):
            assert torch.equal(plus.train(mode)(x), vanilla.train(mode)(x)), f"train={mode}"


def test_state_dicts_of_different_placements_or_variants_do_not_load_strictly():
    configurations = list(itertools.product(PLACEMENTS, VARIANTS))
    models = {c: CUBSAttention(8, *c, d=64) for c in configurations}
    for source, target in itertools.permutations(configurations, 2):
        with pytest.raises(RuntimeError, match="Error\\(s\\) in loading state_dict"):
            models[target].load_state_dict(models[source].state_dict(), strict=True)
    for c in configurations:  # each loads into a fresh model of its own kind
        CUBSAttention(8, *c, d=64).load_state_dict(models[c].state_dict(), strict=True)


def test_plain_resnet_state_dict_does_not_load_strictly_into_plus():
    plain = cubs_resnet18(variant="plain", width=8, d=64)
    plus = cubs_resnet18(variant="plus", width=8, d=64)
    with pytest.raises(RuntimeError, match="gamma"):
        plus.load_state_dict(plain.state_dict(), strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "stem, size, expected",
    [
        ("cifar", 64, [(1, 8, 64, 64), (1, 16, 32, 32), (1, 32, 16, 16), (1, 64, 8, 8)]),
        ("imagenet", 224, [(1, 8, 56, 56), (1, 16, 28, 28), (1, 32, 14, 14), (1, 64, 7, 7)]),
    ],
)
def test_cubs_resnet_stage_shapes(variant, stem, size, expected):
    model = cubs_resnet18(num_classes=10, stem=stem, variant=variant, width=8, d=64).eval()
    shapes = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(model, name).register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    with torch.no_grad():
        logits = model(torch.randn(1, 3, size, size))
    assert shapes == expected
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()


def test_bad_choices_are_rejected_with_the_valid_ones_named():
    with pytest.raises(ValueError, match="serial, reverse, parallel"):
        CUBSAttention(8, placement="sideways")
    with pytest.raises(ValueError, match="plain, plus"):
        cubs_resnet18(variant="deluxe", width=8)
    with pytest.raises(ValueError, match="multiple"):
        CUBSAttention(8, variant="plus", d=20)


def test_taylor_series_refuses_a_second_derivative_instead_of_a_silently_wrong_one():
    """_TaylorRatio's backward is written out and not itself differentiable. A gradient
    penalty with respect to the parameters before it never reached once_differentiable's
    guard and came out wrong (e.g. -1.008 for -1.000); it must raise instead."""
    block = CUBSBlock2(4)
    x = torch.rand(2, 4, 5, 5)
    (grad,) = torch.autograd.grad(block(x).square().sum(), block.qkv.weight)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0  # first order: as always
    with pytest.raises(RuntimeError, match="the Taylor series' backward is written out and has no derivative"):
        torch.autograd.grad(block(x).square().sum(), block.qkv.weight, create_graph=True)
