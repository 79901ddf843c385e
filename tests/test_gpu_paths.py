"""The code paths the scripts take only on a GPU, run on the CPU.

torch.compile (inductor builds of the serial plain and parallel plus CUBS residual blocks
and of CustomCNN's MixBlock, Dynamo's whole-graph capture of every network), bf16 autocast
with channels_last for every network, fp16 with a GradScaler that overflows and resumes,
the zero-padding branch of fused_attention, and the MS loss's fp32 similarity under
autocast. What a CPU cannot run (DALI `mixed`, NCCL) is left to
bench/gpu_check.sh. Whole-network inductor builds cost 13-97 s each on 2 cores:
bench/bench_compile.py measures those.
"""
from __future__ import annotations

import pytest
import torch
import torch._inductor.config
import torch.nn.functional as F
from torch import nn

from common import cubs, engine, runtime
from common.checkpoint import load_checkpoint
from common.cubs import PLACEMENTS, VARIANTS, CUBSAttention, CUBSBlock2, cubs_resnet18, fused_attention
from common.datasets import load_tiny_imagenet
from common.evaluate import holdout_scorer
from common.loader import ImageLoader, LoaderSettings
from common.loss import multi_similarity_loss
from common.models import CustomCNN, EmbeddingNet, MixBlock, ResNet18
from common.synthetic import make_tiny_imagenet
from tests.conftest import fit
from tests.reference import naive_attention

# Small enough for CI, large enough that every stage runs: width 8, 32 x 32 inputs, batch 2;
# d = 64 is the smallest Block 1 inner size the plus variant accepts (2 tokens x 4 heads x 8).
WIDTH, SIZE, BATCH, D = 8, 32, 2, 64
BLOCK_CONFIGS = [(p, v) for p in PLACEMENTS for v in VARIANTS]


def _networks() -> dict[str, nn.Module]:
    """Every network a script trains, at test size (one fresh instance per call)."""
    nets: dict[str, nn.Module] = {
        "custom_cnn": CustomCNN(10, width=WIDTH),
        "resnet18_cifar": ResNet18(10, stem="cifar", width=WIDTH),
        # T4's: CUBS-ResNet-18 with the ImageNet stem (serial plain, its default without T3),
        # as Phase A's classifier and inside Phase B's embedding
        "t4_cubs_imagenet": cubs_resnet18(10, stem="imagenet", width=WIDTH, d=D),
        "t4_embedding_net": EmbeddingNet(cubs_resnet18(10, stem="imagenet", width=WIDTH, d=D), dim=16),
    }
    for placement, variant in BLOCK_CONFIGS:
        nets[f"cubs_{placement}_{variant}"] = cubs_resnet18(10, placement=placement, variant=variant,
                                                            width=WIDTH, d=D)
    return nets


def _grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| in the L2 norm: a distance that does not care about the outputs' scale."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------- zero-padding to head dim 8
@pytest.mark.parametrize("head_dim, scale", [(1, 1.0), (3, None)])
def test_padded_fused_attention_equals_unpadded_in_values_and_gradients(head_dim, scale, monkeypatch):
    # head dim 1 with scale 1 is the plain blocks' similarity; 3 with the default scale
    # checks that the scale is 1/sqrt of the unpadded dim.
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, head_dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    plain = fused_attention(q, k, v, scale, pad_head_dim=False)
    grads_plain = torch.autograd.grad(plain.pow(2).sum(), (q, k, v))
    dims_seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q_, *a, **kw: dims_seen.append(q_.shape[-1]) or sdpa(q_, *a, **kw))
    padded = fused_attention(q, k, v, scale, pad_head_dim=True)
    grads_padded = torch.autograd.grad(padded.pow(2).sum(), (q, k, v))
    assert dims_seen == [cubs.HEAD_DIM]  # the CUDA branch ran: the kernel saw 8 dims
    assert padded.shape == plain.shape
    # float64: zero columns add exact zeros to each dot product, so only the kernel's
    # summation order may differ; 1e-12 is ~10^4 float64 ulps at these magnitudes.
    torch.testing.assert_close(padded, plain, rtol=0, atol=1e-12)
    for gp, gu in zip(grads_padded, grads_plain):
        torch.testing.assert_close(gp, gu, rtol=0, atol=1e-12)
    reference = naive_attention(q.detach(), k.detach(), v.detach(), scale)
    torch.testing.assert_close(padded.detach(), reference, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- torch.compile
@pytest.fixture(scope="module")
def cold_inductor_cache(tmp_path_factory):
    """Inductor's on-disk cache in a fresh folder: a build that a cache left by an earlier
    run would skip is built here, as on a clean CI machine (and timed as one)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        yield


def _compiled_vs_eager(module: nn.Module, x: torch.Tensor, backend: str) -> tuple[float, float, float]:
    """(output, input-gradient, parameter-gradient) relative distances of torch.compile with
    `backend` and fullgraph=True (a graph break raises) vs eager: train mode, as the scripts
    compile for training, forward + backward through a fixed random read-out (|out|^2 of
    EmbeddingNet's unit vectors would have no gradient). The same seed before each pass
    gives CustomCNN's dropout the same mask."""
    module.train()
    torch.manual_seed(0)
    readout = torch.randn(module(x).shape)
    results = []
    for run in (module, torch.compile(module, backend=backend, fullgraph=True)):
        module.zero_grad()
        torch.manual_seed(1)
        xi = x.clone().requires_grad_()
        out = run(xi)
        (out * readout).sum().backward()
        results.append((out.detach(), xi.grad, _grads(module).clone()))
    (out_e, gx_e, gp_e), (out_c, gx_c, gp_c) = results
    return _relative(out_c, out_e), _relative(gx_c, gx_e), _relative(gp_c, gp_e)


# Serial plain is T3's default; parallel plus is the other end: both CUBS blocks read the
# same input and their outputs are added, and plus adds Block 1's multi-head SDPA and the
# gamma-gated residuals. Reverse is serial's ops in the other order, and each placement
# with the other variant pairs ops these two builds already lower (7-12 s a build on 2
# cores, so the other four would cost CI about 40 s for no new op pattern). Dynamo captures
# all six whole networks below, and bench/bench_compile.py builds all six with inductor.
INDUCTOR_BLOCK_CONFIGS = [("serial", "plain"), ("parallel", "plus")]


@pytest.mark.parametrize("placement, variant", INDUCTOR_BLOCK_CONFIGS)
def test_inductor_builds_a_cubs_residual_block_like_eager(placement, variant, cold_inductor_cache):
    # Inductor (Dynamo's capture, AOTAutograd's joint graph, inductor's lowering and fusion)
    # on layer2[0] of a CUBS network: the downsampling BasicBlock with its attention, so
    # the fusions across conv, BN, the attention and the residual add are all built.
    # Whole-network inductor builds take 13-97 s each on 2 cores (bench/bench_compile.py
    # runs all ten); the whole networks' graph capture is tested below. To fit CI, the
    # builds skip what a GPU does not run or what another test here covers: C++
    # vectorisation (a GPU runs Triton kernels, not the CPU's vector code; a third of the
    # time), and inductor's pattern-matcher rewrites except for serial plain, T3's default
    # (half the remaining time).
    # Inductor reorders and fuses fp32 sums; 1e-4 relative is ~1000 fp32 ulps, far below
    # any real bug's size (measured <= 1e-6; an injected ReLU bug gives ~1).
    torch.manual_seed(0)
    block = cubs_resnet18(10, placement=placement, variant=variant, width=WIDTH, d=D).layer2[0]
    if variant == "plus":
        # gamma = 0 makes a plus block the identity: open it so attention reaches the output.
        for m in block.modules():
            if hasattr(m, "gamma"):
                nn.init.constant_(m.gamma, 0.5)
    options = {"cpp.vec_isa_ok": False, "pattern_matcher": (placement, variant) == ("serial", "plain")}
    with torch._inductor.config.patch(options):
        distances = _compiled_vs_eager(block, torch.randn(BATCH, WIDTH, 16, 16), "inductor")
    assert max(distances) < 1e-4, distances


def test_inductor_builds_a_custom_cnn_mixblock_like_eager(cold_inductor_cache):
    # The one more network: T1's building block (a conv chain, concatenation, 1x1 fusion,
    # squeeze-excitation gate), the op patterns CustomCNN adds to the ResNet ones above.
    torch.manual_seed(0)
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False, "pattern_matcher": False}):
        distances = _compiled_vs_eager(MixBlock(2 * WIDTH, 2 * WIDTH, WIDTH), torch.randn(BATCH, 2 * WIDTH, 8, 8),
                                       "inductor")
    assert max(distances) < 1e-4, distances


@pytest.mark.parametrize("name", list(_networks()))
def test_whole_network_is_captured_as_one_graph_forward_and_backward(name):
    # Every network a script trains, whole: stem, the wiring of every block (and of the
    # attention inside each BasicBlock), pooling and head. fullgraph=True makes any graph
    # break raise. Dynamo's capture only (backend "eager" runs the captured graph with eager
    # kernels, so compiled equals eager to fp32 rounding): inductor builds the residual
    # blocks above; whole-network inductor builds are in bench/bench_compile.py.
    torch.manual_seed(0)
    distances = _compiled_vs_eager(_networks()[name], torch.randn(BATCH, 3, 16, 16), "eager")
    assert max(distances) < 1e-6, distances


# ---------------------------------------------------------------- bf16 autocast, channels_last
def test_every_network_trains_under_bf16_autocast_with_channels_last_close_to_fp32():
    # The CUDA recipe (engine.fit on bf16 GPUs) with CPU autocast. Eval mode: batch-2
    # BatchNorm statistics would amplify rounding differences; the ops' dtypes are the same.
    # bf16 keeps 8 bits (relative rounding 2^-9 = 0.2% per op). Over seeds 0 and 1, relative
    # L2 distance to fp32: outputs 0.2-1.2%; whole gradient vector 0.4-6% for the residual
    # networks, 14-18% for CustomCNN, whose 36 convolutions have no identity path, so the
    # backward pass compounds the rounding through every one of them.
    # Bounds at ~2x the worst: 3% / 12% / 35%. A wrong dtype or layout path (garbage,
    # NaN, a lost autocast) lands far above them.
    torch.manual_seed(0)
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    for name, model in _networks().items():
        model.eval()
        reference = model(x)
        # A fixed random read-out: the embedding's output has unit norm, so |out|^2 would
        # have zero gradient.
        readout = torch.randn(reference.shape)
        (reference * readout).sum().backward()
        grads_fp32 = _grads(model).clone()
        model.zero_grad()
        model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x.contiguous(memory_format=torch.channels_last))
        assert out.dtype == torch.bfloat16, name  # autocast reached the head
        (out.float() * readout).sum().backward()
        grads_bf16 = _grads(model)
        assert torch.isfinite(out).all() and torch.isfinite(grads_bf16).all(), name
        out_distance, grad_distance = _relative(out, reference), _relative(grads_bf16, grads_fp32)
        assert out_distance < 0.03, (name, out_distance)
        assert grad_distance < (0.35 if name == "custom_cnn" else 0.12), (name, grad_distance)


@pytest.mark.parametrize("placement", ["serial", "reverse", "parallel"])
@pytest.mark.parametrize("variant", ["plain", "plus"])
def test_cubs_blocks_keep_the_feature_maps_in_the_autocast_dtype(placement, variant):
    # The fp32 gate (similarity, or a sum that CUDA autocast keeps in fp32) made x * gate,
    # and every layer after the first CUBS block, fp32: twice the activation memory.
    torch.manual_seed(0)
    model = cubs_resnet18(num_classes=10, placement=placement, variant=variant, width=8, d=64)
    seen = []
    for block in model.modules():
        if isinstance(block, CUBSAttention):
            block.register_forward_hook(lambda m, inputs, out: seen.append((inputs[0].dtype, out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 8
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


def test_ms_loss_similarity_is_fp32_under_autocast():
    # T4 computes the loss inside autocast. With S = x x^T as a bf16 matmul this batch's
    # loss moves by 1.4e-4 (S near 1 rounded by up to 2^-9, times beta = 50); with S in
    # fp32 only fp32 reordering remains (bound 1e-6).
    torch.manual_seed(0)
    labels = torch.arange(8).repeat_interleave(4)
    embeddings = torch.randn(8, 16)[labels] + torch.randn(32, 16)  # 8 classes x 4, overlapping
    exact = multi_similarity_loss(embeddings, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = multi_similarity_loss(embeddings, labels)
    assert exact.item() > 0.1  # pairs are mined: the comparison is not 0 == 0
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, exact, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- fp16 with a GradScaler
def test_fp16_grad_scaler_backs_off_on_overflow_and_resumes_the_backed_off_state(tmp_path):
    # tests/test_engine.py covers fp16 + scaler + resume on a 1-conv net when no step
    # overflows. Here a CUBS network (fp16 attention on the CPU's fused kernel) meets an
    # overflow: at step 3 the loss is multiplied by 1e4, so its scaled gradient (x 2^16)
    # exceeds fp16's 65,504 in the backward pass. The scaler must skip that step, halve its
    # scale, restart its count, and a resumed run must continue from that state.
    root = make_tiny_imagenet(tmp_path / "data", num_classes=3, train_per_class=12, val_per_class=2,
                              image_size=16, seed=1)
    splits = load_tiny_imagenet(root, holdout_per_class=2)  # 30 train images: 3 batches of 8
    rt = runtime.Runtime(torch.device("cpu"), amp_dtype=torch.float16)
    train = ImageLoader(splits.train.files, splits.train.labels, LoaderSettings(batch_size=8, train=True,
                        image_size=16, backend="torch", workers=0, seed=1))
    holdout = ImageLoader(splits.holdout.files, splits.holdout.labels,
                          LoaderSettings(batch_size=8, train=False,
                                         image_size=16, backend="torch", workers=0))
    calls = []
    ce = nn.CrossEntropyLoss(label_smoothing=0.1)

    def loss_fn(logits, labels):
        loss = ce(logits, labels)
        calls.append(loss.dtype)
        return loss * 1e4 if len(calls) == 3 else loss

    def run(stop_after: int | None) -> dict:
        torch.manual_seed(0)
        model = cubs_resnet18(3, width=WIDTH, d=16)
        cfg = engine.FitConfig(epochs=2, lr=0.01, warmup_epochs=1, patience=100, stop_after_epoch=stop_after)
        return fit(model, train, holdout_scorer(holdout, rt), cfg, tmp_path / "out", rt,
                   {"task": "test", "model": "cubs"}, loss_fn=loss_fn)

    run(stop_after=1)
    scaler = load_checkpoint(tmp_path / "out" / "last.pt")["scaler"]
    # 3 steps: 2 good, the overflow (skipped, scale 2^16 -> 2^15, count reset to 0), none after
    assert scaler["scale"] == 2.0**15 and scaler["_growth_tracker"] == 0
    result = run(stop_after=None)
    assert result["finished"] and result["epochs_run"] == 2
    scaler = load_checkpoint(tmp_path / "out" / "last.pt")["scaler"]
    assert scaler["scale"] == 2.0**15 and scaler["_growth_tracker"] == 3  # counting on: 3 good steps
    assert all(dtype == torch.float32 for dtype in calls)  # the step's CE is fp32 under fp16 autocast
    # Applied, the 1e4 step would have moved the weights 1e4 times a normal step.
    assert result["history"][1]["train_loss"] < 10


# ---------------------------------------------------------------- deferred Taylor-range check
def test_a_compiled_step_beyond_the_taylor_range_is_redone_exactly(tmp_path, monkeypatch):
    # engine.fit with cubs.range_check (engine.for_training's redo_check): compiled steps
    # take the series without a branch and
    # one check per step redoes out-of-range steps in eager mode (the fused kernel). Here
    # every Block 2 starts with logits around 36 (bias 6 on q and k, residual branches not
    # zero-initialised so that they vary), far beyond 7.5, where the 33-term series is badly
    # wrong: the redone run must equal the eager run, and the same
    # compiled run without the redo must not.
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: compile_(model, backend="aot_eager"))
    # The tests above compile the same forward methods many times: past Dynamo's recompile
    # limit a frame silently runs eagerly, and no compiled step would be checked here.
    torch._dynamo.reset()
    root = make_tiny_imagenet(tmp_path / "data", num_classes=3, train_per_class=6, val_per_class=1,
                              image_size=16, seed=1)
    splits = load_tiny_imagenet(root, holdout_per_class=1)  # 15 train images: 3 batches of 4
    rt = runtime.Runtime(torch.device("cpu"), amp_dtype=None)
    train = ImageLoader(splits.train.files, splits.train.labels, LoaderSettings(batch_size=4, train=True,
                        image_size=16, backend="torch", workers=0, seed=1))

    def run(name: str, compiled: bool, redo: bool | None, bias: float = 6.0) -> tuple[torch.Tensor, dict]:
        torch.manual_seed(0)
        model = cubs_resnet18(3, width=WIDTH, d=16)
        with torch.no_grad():
            for block in model.modules():
                if isinstance(block, nn.BatchNorm2d):  # no zero-init: logits that differ
                    block.weight.fill_(1.0)
                if isinstance(block, CUBSBlock2):
                    block.qkv.bias[:2] = bias
        check = cubs.range_check(model)
        cfg = engine.FitConfig(epochs=1, lr=0.05, warmup_epochs=1, patience=100, compile=compiled)
        fitted = fit(model, train, lambda m: {"holdout_acc": 0.0}, cfg, tmp_path / name, rt,
                     {"task": "test", "model": "cubs"}, loss_fn=nn.CrossEntropyLoss(),
                     redo_check=check if redo else (lambda: False))
        # parameters and buffers: BatchNorm's running statistics and step counts too
        return torch.cat([t.detach().double().flatten() for t in model.state_dict().values()]), fitted["history"][0]

    eager, _ = run("eager", compiled=False, redo=None)
    redone, record = run("redone", compiled=True, redo=True)
    unchecked, _ = run("unchecked", compiled=True, redo=False)
    assert record["exact_redo_steps"] == len(train) == 3
    assert _relative(redone, eager) < 1e-6
    assert _relative(unchecked, eager) > 1e-3
    # Logits of about 900: the compiled series overflows to NaN, which its forward pass wrote
    # into the running statistics before the redo; the redo starts from the statistics before.
    eager, _ = run("eager_far", compiled=False, redo=None, bias=30.0)
    redone, record = run("redone_far", compiled=True, redo=True, bias=30.0)
    assert record["exact_redo_steps"] == 3 and torch.isfinite(redone).all()
    assert _relative(redone, eager) < 1e-6
