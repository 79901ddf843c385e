#!/usr/bin/env bash
# One-shot GPU check, under 8 minutes on one H200. Run from anywhere:
#     bash bench/gpu_check.sh            # writes its figures to $OUT (default /tmp/gpu_check)
# 1. generates a full-size synthetic Tiny ImageNet (100,000 train + 10,000 val JPEGs, 64x64)
#    and a Cars-like set (500x375 JPEGs) on this machine;
# 2. measures the loader alone (images/s of ImageLoader, DALI mixed decode if importable);
# 3. runs two epochs each of T2 and T3 --placement serial (bf16, channels_last, compile) and
#    reports the second epoch (the first includes torch.compile's compilation);
# The summary table at the end is what README's performance table quotes. Model-only
# images/s and MFU are a separate, longer command: python3 bench/bench_train.py --quick.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
DATA=${DATA:-/tmp/gpu_check_data}
PROCS=$(nproc)
mkdir -p "$OUT" "$DATA"
export PYTHONUNBUFFERED=1
log() { echo "[gpu_check $(date +%T)] $*"; }

log "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
python3 - <<'EOF' || { echo "torch with CUDA is required"; exit 1; }
import torch
assert torch.cuda.is_available(), "torch sees no GPU"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
try:
    import nvidia.dali as dali
    print(f"DALI {dali.__version__}: GPU (mixed) decoding")
except ImportError:
    print("DALI not importable: the torch DataLoader fallback is measured instead")
EOF

if [ ! -f "$DATA/tiny-imagenet-200/wnids.txt" ] || [ ! -f "$DATA/cars196/cars_annos.mat" ]; then
  log "generating synthetic datasets with $PROCS processes"
  rm -rf "$DATA/tiny-imagenet-200" "$DATA/cars196"
  python3 bench/make_full_synthetic.py --tiny "$DATA" --cars "$DATA/cars196" \
      --cars-per-class 10 --procs "$PROCS" || exit 1
fi

log "loader alone"
timeout -k 10 90 python3 - "$DATA" <<'EOF' | tee "$OUT/loader.txt"
import sys, time, torch
from common.datasets import load_tiny_imagenet, load_cars196
from common.loader import ImageLoader
tiny = load_tiny_imagenet(sys.argv[1] + "/tiny-imagenet-200")
cars = load_cars196(sys.argv[1] + "/cars196")
for name, split, size, resize, bs in (("tiny 64px train", tiny.train, 64, None, 256),
                                      ("cars 224px train", cars.train, 224, None, 128),
                                      ("cars 224px eval", cars.test, 224, 256, 128)):
    loader = ImageLoader(split.files, split.labels, batch_size=bs, train=resize is None,
                         image_size=size, eval_resize=resize, device="cuda", workers=8)
    for images, _ in loader.epoch(0):  # warm-up epoch: pipeline build, nvJPEG state
        pass
    torch.cuda.synchronize(); t = time.perf_counter(); n = 0
    for images, labels in loader.epoch(1):
        n += len(labels)
    torch.cuda.synchronize(); dt = time.perf_counter() - t
    print(f"loader {name:18s} {loader.backend:5s} {n / dt:10.0f} images/s "
          f"({n} images, {images.dtype}, {tuple(images.shape[1:])})")
EOF

for task in t2 t3; do
  script=t2_resnet18.py; extra=""
  [ "$task" = t3 ] && script=t3_cubs.py && extra="--placement serial"
  log "$script $extra: 2 epochs"
  # -k: fit() acts on SIGTERM only between steps (compilation can take a minute)
  timeout -k 15 200 python3 "$script" $extra --data-dir "$DATA" --no-download --epochs 2 \
      --out "$OUT/$task" --fresh --workers 8 --compile 2>&1 | grep -v "it/s" | tail -n 8
done

log "summary (second epoch; data wait = share of step time blocked on the loader)"
python3 - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'run':22s} {'images/s':>10s} {'data wait':>10s} {'peak GiB':>9s} {'holdout acc':>12s}")
for name, path in (("T2 resnet18", out / "t2" / "metrics.jsonl"),
                   ("T3 cubs serial plain", out / "t3" / "serial_plain" / "metrics.jsonl")):
    if not path.exists():
        print(f"{name:22s} did not finish")
        continue
    rec = [json.loads(l) for l in path.read_text().splitlines()][-1]
    print(f"{name:22s} {rec['images_per_s']:10.0f} {rec['data_wait_share']:10.1%} "
          f"{rec.get('peak_mem_gib', float('nan')):9.2f} {rec['holdout_acc']:12.4f}")
EOF
log "done; figures in $OUT"
