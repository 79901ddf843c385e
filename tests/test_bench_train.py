"""bench/bench_train.py on CPU: a tiny run writes sane JSON, and the FLOP count behind MFU is exact."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import bench_train
from common.synthetic import make_tiny_imagenet


def test_main_writes_one_positive_entry_per_model_and_config(tmp_path, capsys):
    out = tmp_path / "bench.json"
    models = ["custom_cnn"]  # one model keeps this under 20 s on a busy 2-core machine
    data_dir = make_tiny_imagenet(tmp_path / "data", num_classes=2, train_per_class=4, val_per_class=1)
    threads_before = torch.get_num_threads()
    rc = bench_train.main(["--quick", "--device", "cpu", "--width", "8", "--batch-size", "4",
                           "--steps", "2", "--windows", "1", "--warmup", "1", "--threads", "1",
                           "--with-loader", str(data_dir), "--workers", "0",
                           "--models", ",".join(models), "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    configs = bench_train.make_configs(cuda=False, compile_allowed=False)
    assert len(configs) == 2  # channels_last off / on; bf16 n/a and no compile on CPU
    expected = {(m, c.channels_last, c.bf16, c.compile) for m in models for c in configs}
    got = [(r["model"], r["channels_last"], r["bf16"], r["compile"]) for r in data["results"]]
    assert sorted(got, key=str) == sorted(expected, key=str)  # one entry each, no duplicates
    for r in data["results"]:
        assert r["error"] is None
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
        assert r["step_ms"] > 0 and r["batch_size"] == 4
        assert r["flops_per_step"] > 0
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # CUDA only
    # end-to-end rows: one per model, for its fastest configuration
    assert [r["model"] for r in data["loader"]] == models
    for r in data["loader"]:
        assert r["error"] is None and r["steps"] == 2
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
        assert 0 <= r["data_wait_share"] < 1
        best = max((x for x in data["results"] if x["model"] == r["model"]),
                   key=lambda x: x["images_per_s"])
        assert r["channels_last"] == best["channels_last"]
    assert torch.get_num_threads() == threads_before  # --threads is undone on return
    table = capsys.readouterr().out
    assert table.count("custom_cnn ") == 3  # two configurations, one end-to-end row
    assert " n/a " in table


@pytest.mark.parametrize("input_grad, backward_factor", [(True, 2), (False, 1)])
def test_flop_count_of_a_linear_layer_is_analytic(input_grad, backward_factor):
    torch.manual_seed(0)
    model = nn.Linear(10, 20)
    x = torch.randn(3, 10, requires_grad=input_grad)
    labels = torch.randint(0, 20, (3,))
    flops = bench_train.count_step_flops(model, x, labels)
    forward = 2 * 3 * 10 * 20  # one multiply-add per (row, in, out)
    assert flops.forward == forward
    # grad_weight always, grad_input only when the input needs it: 3x forward in total with
    # it, 2x for a first layer (training images do not require grad).
    assert flops.backward == backward_factor * forward
    assert flops.total == (1 + backward_factor) * forward
    assert model.weight.grad is None  # the counting step leaves no gradients behind


class _TinyAttention(nn.Module):
    """x: B x L x 8 -> q = k = v = Linear(x) as one head -> fused SDPA -> mean over L: B x 8."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.proj(x)[:, None]
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # the kernel common.cubs uses on CPU
            return F.scaled_dot_product_attention(q, q, q)[:, 0].mean(1)


def test_flop_count_includes_the_cpu_flash_attention_kernel():
    batch, length, dim = 3, 16, 8
    flops = bench_train.count_step_flops(_TinyAttention(), torch.randn(batch, length, dim),
                                         torch.randint(0, dim, (batch,)))
    projection = 2 * batch * length * dim * dim
    attention = 2 * (2 * batch * length * length * dim)  # q k^T and P v
    assert flops.forward == projection + attention
    # flash backward: recompute q k^T, then dV, dP, dQ, dK: 5 matmuls = 2.5x its forward.
    assert flops.backward == projection + 5 * attention // 2


def test_mfu_arithmetic_and_peak_table():
    # 1200 * 3 FLOPs in 1 ms on a 989 TFLOP/s GPU.
    assert bench_train.mfu(3600, 1e-3, 989e12) == pytest.approx(3600 / 1e-3 / 989e12)
    assert bench_train.mfu(3600, 1e-3, None) is None
    assert bench_train.peak_flops_for("NVIDIA H200")[0] == 989e12
    assert bench_train.peak_flops_for("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert bench_train.peak_flops_for("NVIDIA H100 PCIe")[0] == 756e12
    assert bench_train.peak_flops_for("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert bench_train.peak_flops_for("NVIDIA L4")[0] == 121e12
    assert bench_train.peak_flops_for("Tesla T4")[0] == 65e12
    assert bench_train.peak_flops_for("NVIDIA L40S") == (None, "unknown peak")
    assert bench_train.peak_flops_for("NVIDIA H100 80GB HBM3 MIG 1g.10gb")[0] is None


def test_cuda_configs_cover_every_combination():
    configs = bench_train.make_configs(cuda=True, compile_allowed=True)
    assert len(set(configs)) == 8
    assert not configs[0].compile and configs[-1].compile  # eager first
