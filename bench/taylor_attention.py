"""Plain CUBS similarity attention: the Taylor path's error and speed against the fused kernel.

    python bench/taylor_attention.py [--batch 16] [--n 4096] [--device cpu|cuda] [--time-batch 256]

For logits q_i k_j up to a few values of max q * max k (q, k uniform with 40 % exact zeros,
as ReLU makes; v uniform in [0, 3]), prints the relative L2 error of a and of its three
gradients against float64 naive attention (B x N x N materialised), for:
  taylor    common.cubs.taylor_similarity_attention (v centred on its mean; the default)
  v-raw     the same series without centring v (c = 0)
  k-centred exp(q k) = exp(q kc) exp(q (k - kc)), kc = (min k + max k) / 2: half the range,
            but odd powers of k - kc change sign, so the moments cancel
  fused     fused_attention, what the plain blocks ran before (and the fallback)
then the forward + backward time of taylor and fused at --time-batch x N on --device
(medians, fp32 inputs). docs/cubs.md quotes this table.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.cubs import (TAYLOR_MAX_LOGIT, TAYLOR_TERMS, _fused_similarity_attention,  # noqa: E402
                         taylor_similarity_attention)
from tests.reference import naive_similarity_attention  # noqa: E402


def series(q, k, v, centre_v: bool, centre_k: bool):
    """The Taylor series with the two centring choices (q, k >= 0, fp32)."""
    n = torch.arange(TAYLOR_TERMS, device=q.device, dtype=q.dtype)
    if centre_k:  # exp(q (k - kc)) with |k - kc| <= range / 2; the exp(q kc) factor cancels
        kc = (k.amin(1, keepdim=True) + k.amax(1, keepdim=True)) / 2
        k = k - kc
    coeff = torch.exp(n * math.log(TAYLOR_MAX_LOGIT) - torch.lgamma(n + 1))
    s = q.amax(1, keepdim=True).clamp_min(1e-30)
    query_powers = (q / s)[..., None].pow(n)
    key_terms = (k * (s / TAYLOR_MAX_LOGIT))[..., None].pow(n) * coeff
    c = v.mean(1, keepdim=True).detach() if centre_v else torch.zeros_like(v[:, :1])
    moments = torch.stack((v - c, torch.ones_like(v)), 1) @ key_terms
    weighted = query_powers @ moments.transpose(1, 2)
    return c + weighted[..., 0] / weighted[..., 1]


METHODS = {
    "taylor": taylor_similarity_attention,
    "v-raw": lambda q, k, v: series(q, k, v, centre_v=False, centre_k=False),
    "k-centred": lambda q, k, v: series(q, k, v, centre_v=True, centre_k=True),
    "fused": _fused_similarity_attention,
}


def errors(fn, q, k, v, upstream, reference):
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, upstream)
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    return [rel(out, reference[0])] + [rel(g, r) for g, r in zip(grads, reference[1])]


def timed(fn, q, k, v, upstream, runs: int) -> float:
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    times = []
    for _ in range(runs + 1):
        if q.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.autograd.grad(fn(*inputs), inputs, upstream)
        if q.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--time-batch", type=int, default=None, help="batch of the timing (default --batch)")
    ap.add_argument("--no-errors", action="store_true", help="timing only (the error table runs on the CPU)")
    args = ap.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch sees no GPU here")
    g = torch.Generator().manual_seed(0)
    print(f"B = {args.batch}, N = {args.n}, p = {TAYLOR_TERMS}, Taylor while max logit <= {TAYLOR_MAX_LOGIT}")
    if not args.no_errors:
        print(f"{'max q*k':>8s} {'method':>10s} {'a':>8s} {'dq':>8s} {'dk':>8s} {'dv':>8s}")
    for largest in (1.0, 4.0, 7.0):
        if args.no_errors and largest > 1.0:
            break
        q, k = (torch.rand(args.batch, args.n, generator=g) * math.sqrt(largest) for _ in range(2))
        q[torch.rand(q.shape, generator=g) < 0.4] = 0
        k[torch.rand(k.shape, generator=g) < 0.4] = 0
        v = torch.rand(args.batch, args.n, generator=g) * 3
        upstream = torch.randn(args.batch, args.n, generator=g)
        if args.no_errors:
            continue
        ref_in = [t.double().requires_grad_() for t in (q, k, v)]
        ref = naive_similarity_attention(*ref_in)
        reference = (ref, torch.autograd.grad(ref, ref_in, upstream.double()))
        for name, fn in METHODS.items():
            e = errors(fn, q, k, v, upstream, reference)
            print(f"{largest:8.1f} {name:>10s} " + " ".join(f"{x:8.1e}" for x in e))
    device = torch.device(args.device)
    batch = args.time_batch or args.batch
    q, k, v, upstream = (t.repeat(-(-batch // args.batch), 1)[:batch].to(device) for t in (q, k, v, upstream))
    times = {name: timed(METHODS[name], q, k, v, upstream, args.runs) for name in ("taylor", "fused")}
    print(f"forward + backward at B x N = {batch} x {args.n} on {device}: "
          + ", ".join(f"{name} {t * 1e3:.1f} ms" for name, t in times.items())
          + f"; fused / taylor = {times['fused'] / times['taylor']:.1f}x")


if __name__ == "__main__":
    main()
