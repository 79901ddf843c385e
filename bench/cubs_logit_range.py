"""Logit range of trained plain CUBS blocks, and what bf16 rounding of q and k does there.

    python t3_cubs.py --smoke --epochs 3 --placement serial --out /tmp/h3/t3
    python bench/cubs_logit_range.py /tmp/h3/t3/serial_plain/best.pt [--images 16]
    python bench/cubs_logit_range.py runs/t3/serial_plain/best.pt --data data/tiny-imagenet-200

Loads a plain-variant T3 checkpoint, runs `--images` test images (eval mode, fp32; the
smoke run's own, or `--data`'s) and records every plain block's q, k, v. The scale-1
logits are q_i k_j >= 0, so the largest is max(q) * max(k) per sample. For each block it prints that maximum and
the output error of similarity attention when q and k are rounded to bf16 first (what
autocast does to the projection's output) against fp32: max |a_bf16(q,k) - a_fp32|, with
v and the softmax kept in fp32, so the figure is the rounding of q and k alone.
docs/cubs.md ("Precision under autocast") quotes these figures.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.checkpoint import load_checkpoint  # noqa: E402
from common.cubs import CUBSBlock1, CUBSBlock2, cubs_resnet18  # noqa: E402
from common.datasets import load_tiny_imagenet  # noqa: E402
from common.loader import ImageLoader, LoaderSettings  # noqa: E402
from tests.reference import naive_similarity_attention  # noqa: E402


def record_qkv(model: torch.nn.Module) -> dict[str, list[tuple[Tensor, Tensor, Tensor]]]:
    """Forward hooks on every plain block's projections; name -> [(q, k, v) per batch], B x L."""
    seen: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {}
    for name, block in model.named_modules():
        if isinstance(block, CUBSBlock2):
            def hook2(_m, _i, out: Tensor, name: str = name) -> None:
                seen.setdefault(name, []).append(tuple(F.relu(out).flatten(2).unbind(1)))
            block.qkv.register_forward_hook(hook2)
        elif isinstance(block, CUBSBlock1):
            def hook1(m: CUBSBlock1, inputs: tuple[Tensor], _out: Tensor, name: str = name) -> None:
                g = inputs[0].mean(dim=(2, 3))
                seen.setdefault(name, []).append(
                    tuple(F.relu(p(g)) for p in (m.q_proj, m.k_proj, m.v_proj)))
            block.register_forward_hook(hook1)
    return seen


def bf16_qk_error(q: Tensor, k: Tensor, v: Tensor) -> float:
    """max |a(bf16(q), bf16(k), v) - a(q, k, v)|, computed in float64 after the rounding."""
    exact = naive_similarity_attention(q.double(), k.double(), v.double())
    rounded = naive_similarity_attention(q.bfloat16().double(), k.bfloat16().double(), v.double())
    return (rounded - exact).abs().max().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--data", type=Path, help="tiny-imagenet-200 folder (default: the smoke data "
                   "that t3 --smoke wrote beside the checkpoint's folder)")
    args = p.parse_args()
    ck = load_checkpoint(args.checkpoint)
    meta = ck["meta"]
    if meta.get("variant") != "plain":
        sys.exit("needs a plain-variant T3 checkpoint (the plus blocks use 8-dim heads, scale 1/sqrt(8))")
    model = cubs_resnet18(meta["num_classes"], placement=meta["placement"], width=meta["width"], d=meta["d"])
    model.load_state_dict(ck["model"])
    model.eval()
    # The smoke run's own data sits beside its placement folders (t3 --smoke writes it there).
    root = args.data or (args.checkpoint.resolve().parents[1] / "smoke_data" / f"{meta['image_size']}px"
                         / "tiny-imagenet-200")
    split = load_tiny_imagenet(root, holdout_per_class=0).test
    loader = ImageLoader(split.files[:args.images], split.labels[:args.images],
                         LoaderSettings(batch_size=args.images,
                                        train=False, image_size=meta["image_size"], backend="torch", workers=0))
    seen = record_qkv(model)
    with torch.no_grad():
        for images, _ in loader.epoch():
            model(images)
    print(f"{args.checkpoint} ({meta['model']}), {args.images} test images, eval mode")
    print(f"{'block':34s} {'L':>5s} {'max logit':>10s} {'median max':>11s} {'bf16 q,k error':>15s}")
    for name, batches in seen.items():
        q, k, v = (torch.cat(t) for t in zip(*batches))
        per_sample = q.amax(1) * k.amax(1)  # q, k >= 0: the largest logit q_i k_j of each sample
        print(f"{name:34s} {q.shape[1]:5d} {per_sample.max().item():10.2f} "
              f"{per_sample.median().item():11.2f} {bf16_qk_error(q, k, v):15.2e}")


if __name__ == "__main__":
    main()
