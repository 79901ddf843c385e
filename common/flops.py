"""FLOP counting with torch.utils.flop_counter, including the CPU fused-attention kernel.

FlopCounterMode knows matrix products, convolutions and the CUDA attention kernels (one
multiply-add = 2 FLOPs) but has no entry for the flash-attention kernel that
scaled_dot_product_attention runs on CPU (the plus blocks, and the plain blocks above their
Taylor range: common/cubs.py). `FLOP_FORMULAS` gives
it the same formulas as the CUDA kernels; pass it as `custom_mapping`.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def _cpu_flash_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args,
                        out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}


def forward_flops(model: torch.nn.Module, image_size: int) -> float:
    """Forward FLOPs of one 3 x S x S image through `model` in eval mode."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        model(torch.zeros(1, 3, image_size, image_size))
    return float(counter.get_total_flops())
